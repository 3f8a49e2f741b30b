"""The rules over a run's records, stated once: which epoch is the best, which is final, the names of
the attacks ``at-mem evaluate`` measures and of the checkpoints it evaluates, and the format of an
evaluation record (``RUN/eval/<checkpoint>.json``) with the merge of a new one into an earlier one.

The trainer decides ``best.pt`` with :func:`improves`; the report, the plots, the memorization
analysis and ``at-mem reproduce`` find that epoch again in ``metrics.jsonl`` with :func:`best_record`,
which is built on the same function, so the two cannot disagree.

Plain functions over plain dicts: no torch, no files (``runfolder`` reads and writes them).
"""

from __future__ import annotations

import math

from .user_errors import UserError

# The attacks of `at-mem evaluate` with their titles in tables, in the order they run and are
# reported (RobustBench's); an evaluation record holds "<name>_acc" for each one it measured.
ATTACK_TITLES = {"clean": "clean", "pgd20": "PGD-20", "cw": "CW", "autoattack": "AutoAttack"}
ATTACK_NAMES = tuple(ATTACK_TITLES)
ROBUST_ATTACK_NAMES = tuple(name for name in ATTACK_NAMES if name != "clean")
# The checkpoints of a run folder that `at-mem evaluate RUN` evaluates (best.pt and last.pt).
CHECKPOINT_NAMES = ("best", "last")
# What makes two eval records measurements of the same checkpoint (besides its epoch).
SAME_CHECKPOINT_KEYS = ("dataset", "norm", "model", "method")
_PER_ATTACK = ("n_examples_by_attack", "seed_by_attack")


class NoEvaluatedEpoch(UserError, ValueError):
    """The records hold no epoch with a test evaluation yet (``--eval-every``); one line."""


# --------------------------------------------------------------------------- the best and final epochs
def _rank(record: dict) -> tuple:
    return record["test_robust_acc"], record.get("test_clean_acc", 0.0)


def improves(record: dict, best: dict) -> bool:
    """Whether the epoch ``record`` beats ``best``: a higher test robust accuracy, or an equal one with
    a higher test clean accuracy. Strict: an exact tie keeps ``best`` (the earlier epoch)."""
    return _rank(record) > _rank(best)


def evaluated(records: list[dict]) -> list[dict]:
    """The epochs with a test evaluation (all, unless the run was trained with ``--eval-every N``)."""
    found = [r for r in records if "test_robust_acc" in r]
    if not found:
        span = f"epochs {records[0]['epoch']}-{records[-1]['epoch']}" if records else "no epochs"
        raise NoEvaluatedEpoch(f"no evaluated epoch among {span} (--eval-every): nothing to compare yet")
    return found


def best_record(records: list[dict]) -> dict:
    """The epoch of ``best.pt``: the first evaluated epoch that no later one :func:`improves` on."""
    found = evaluated(records)
    best = found[0]
    for record in found[1:]:
        if improves(record, best):
            best = record
    return best


def final_record(records: list[dict]) -> dict:
    """The last evaluated epoch (the last epoch of a finished run, which is always evaluated)."""
    return evaluated(records)[-1]


# --------------------------------------------------------------------------- eval records
def attack_of(key: str) -> str | None:
    """``pgd20_acc`` -> ``pgd20``; None for keys that are not accuracies."""
    return key[:-len("_acc")] if key.endswith("_acc") else None


def eval_record(checkpoint: str, state_info: dict, results: dict, *, n_examples: int, eps: float, norm: str,
                seed: int, device: str) -> dict:
    """One ``at-mem evaluate`` result: the checkpoint's identity, the settings, and ``results``.

    ``state_info`` holds ``epoch``, ``dataset``, ``model`` and ``method``. The per-attack
    ``n_examples_by_attack`` and ``seed_by_attack`` say on how many points and with which seed
    each accuracy was measured (they matter once records are merged).
    """
    measured = [a for a in (attack_of(k) for k in results) if a]
    return {"checkpoint": str(checkpoint), "epoch": state_info.get("epoch"), "dataset": state_info.get("dataset"),
            "model": state_info.get("model"), "method": state_info.get("method"), "n_examples": n_examples,
            "eps": eps, "norm": norm, "seed": seed, "device": device, **results,
            "n_examples_by_attack": {a: n_examples for a in measured},
            "seed_by_attack": {a: seed for a in measured}}


def same_checkpoint(previous: dict, new: dict) -> str | None:
    """None when both records measure the same checkpoint at the same threat model, else why not."""
    if previous.get("epoch") != new.get("epoch"):
        return f"epoch {previous.get('epoch')} (now {new.get('epoch')})"
    for key in SAME_CHECKPOINT_KEYS:
        if previous.get(key) != new.get(key):
            return f"{key} {previous.get(key)!r} (now {new.get(key)!r})"
    old_eps, new_eps = previous.get("eps"), new.get("eps")
    if not (isinstance(old_eps, (int, float)) and isinstance(new_eps, (int, float))
            and math.isclose(old_eps, new_eps, rel_tol=1e-9, abs_tol=1e-12)):
        return f"eps {old_eps} (now {new_eps})"
    return None


def merge_eval_records(previous, new: dict, requested=None) -> tuple[dict, str | None]:
    """``new`` merged into ``previous`` (results of other attacks are kept), and why not when it is not.

    The new record's settings (n_examples, seed, device, ...) and accuracies win; accuracies of
    attacks it did not run are kept from ``previous`` with their own ``n_examples_by_attack`` and
    ``seed_by_attack`` entries. With ``requested`` (the attacks asked for), an accuracy measured on
    the side (RobustBench's benchmark also returns the clean accuracy) only fills a gap. When
    ``previous`` is for another checkpoint or threat model (see ``same_checkpoint``) or is not a
    record at all, it is replaced, and the second value says why.
    """
    if previous is None:
        return dict(new), None
    if not isinstance(previous, dict):
        return dict(new), "it is not a JSON object"
    reason = same_checkpoint(previous, new)
    if reason is not None:
        return dict(new), f"it held results for {reason}"
    if requested is not None:
        side = [a for a in new["n_examples_by_attack"] if a not in requested and f"{a}_acc" in previous]
        if side:
            new = {k: v for k, v in new.items() if attack_of(k) not in side}
            for per_attack in _PER_ATTACK:
                new[per_attack] = {a: v for a, v in new[per_attack].items() if a not in side}
    merged = dict(previous)
    for per_attack in _PER_ATTACK:
        old = dict(previous.get(per_attack) or {})
        # Records written before the per-attack keys existed: their accuracies share the record's values.
        single = "n_examples" if per_attack == "n_examples_by_attack" else "seed"
        for attack in (attack_of(k) for k in previous):
            if attack and attack not in old and previous.get(single) is not None:
                old[attack] = previous[single]
        merged[per_attack] = {**old, **new[per_attack]}
    for key, value in new.items():
        if key not in _PER_ATTACK:
            merged[key] = value
    # Keep the per-attack tables after the accuracies, as in a fresh record.
    for per_attack in _PER_ATTACK:
        merged[per_attack] = merged.pop(per_attack)
    return merged, None
