"""Evaluating checkpoints of runs: ``evaluate_checkpoint`` (one file) and ``evaluate_run`` (a run
folder's best.pt and last.pt into ``RUN/eval/best.json`` and ``last.json``, merged with earlier results).

Plain functions with explicit arguments, as ``at-mem evaluate`` calls them; errors are one-line
``RunEvaluationError`` / ``CheckpointError`` / ``DataError``; ``log`` receives progress lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .atomic import check_writable_folder
from .checkpoint import build_model_from_checkpoint, load_checkpoint, run_setting
from .data import load_split
from . import evaluation
from .progress import Progress
from .records import CHECKPOINT_NAMES, eval_record
from .runfolder import RunFolder, RunFolderError
from .user_errors import UserError


class RunEvaluationError(UserError, ValueError):
    """The checkpoint or run cannot be evaluated with the given options; one-line reason."""


@dataclass
class EvaluationOptions:
    """What to measure: attacks, test points and threat model (None: the checkpoint's own)."""

    attacks: tuple[str, ...]
    n_examples: int = 10000
    dataset: str | None = None
    data_dir: str | None = None
    eps: float | None = None
    norm: str | None = None
    batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    log: Callable[[str], None] = lambda message: None
    show_progress: bool = False  # progress lines on stderr: points done, rate, ETA (AutoAttack: per attack)
    _splits: dict = field(default_factory=dict, repr=False)  # test sets loaded once per call

    def settings(self, state: dict) -> dict:
        """The options, with the checkpoint's own values where none were given."""
        eps = run_setting(state, "eps") if self.eps is None else self.eps
        if eps < 0:
            raise RunEvaluationError(f"eps must be >= 0, got {eps}")
        return {"dataset": self.dataset or state["dataset"],
                "data_dir": self.data_dir or run_setting(state, "data_dir"),
                "eps": eps, "norm": self.norm or run_setting(state, "norm")}

    def test_split(self, dataset: str, data_dir: str):
        key = (dataset, str(data_dir))
        if key not in self._splits:
            self._splits[key] = load_split(dataset, data_dir, train=False, size=self.n_examples)
        return self._splits[key]


def evaluate_checkpoint(state: dict, checkpoint: str | Path, options: EvaluationOptions) -> dict:
    """Evaluate one loaded checkpoint; the record ``at-mem evaluate --output`` writes."""
    s = options.settings(state)
    dataset, data_dir = s["dataset"], s["data_dir"]
    model = build_model_from_checkpoint(state, path=checkpoint)
    test = options.test_split(dataset, data_dir)
    if test.num_classes != state["num_classes"]:
        raise RunEvaluationError(f"{dataset} has {test.num_classes} classes but the checkpoint's model has "
                                 f"{state['num_classes']}")
    expected_shape = (state.get("in_chans", test.shape[0]), state.get("img_size", test.shape[1]))
    if (test.shape[0], test.shape[1]) != expected_shape:
        raise RunEvaluationError(f"{dataset} images are {test.shape[0]}x{test.shape[1]}x{test.shape[2]} but the "
                                 f"checkpoint's model was trained on {expected_shape[0]}-channel "
                                 f"{expected_shape[1]}x{expected_shape[1]} images")

    bars: list[Progress] = []

    def progress(name):
        for bar in bars:
            bar.close()
        bars.clear()
        options.log(f"{name} on {len(test)} points ...")
        if not options.show_progress:
            return None
        if name == "autoattack":  # pyautoattack reports per attack (and per batch in the note)
            bars.append(Progress(name, len(evaluation.AUTOATTACK_STANDARD), unit="attacks"))
        else:
            bars.append(Progress(name, len(test), unit="points"))
        return bars[0]

    try:
        results = evaluation.evaluate(model, test.images, test.labels, attacks=options.attacks, eps=s["eps"],
                                      norm=s["norm"], device=options.device, batch_size=options.batch_size,
                                      seed=options.seed, dataset=dataset, data_dir=data_dir, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    info = {"epoch": state.get("epoch"), "dataset": dataset, "model": state["model_name"],
            "method": state.get("method", {}).get("name")}
    record = eval_record(checkpoint, info, results, n_examples=len(test), eps=s["eps"], norm=s["norm"],
                         seed=options.seed, device=str(options.device))
    if len(test) < options.n_examples:  # the whole test split: say so, so that a rerun asking for more knows
        record["test_split_size"] = len(test)
    return record


def _same_weights(a: dict, b: dict) -> bool:
    if a.get("epoch") != b.get("epoch") or a["model"].keys() != b["model"].keys():
        return False
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def evaluate_run(run_dir: str | Path, options: EvaluationOptions,
                 names: tuple[str, ...] = CHECKPOINT_NAMES) -> dict[str, dict]:
    """Evaluate RUN/best.pt and/or RUN/last.pt into RUN/eval/<name>.json, each merged with the results
    of earlier calls for the same checkpoint. Returns {name: the new record}; identical weights
    (best is last) are evaluated once."""
    folder = RunFolder(run_dir)
    if not folder.last.is_file():
        raise RunEvaluationError(f"{folder.path} is not a run folder (no {folder.last.name}): give a checkpoint file "
                                 "or an `at-mem train --out` folder")
    unknown = [n for n in names if n not in CHECKPOINT_NAMES]
    if unknown or not names:
        raise RunEvaluationError(f"unknown checkpoint name {unknown[0]!r}; use best, last or best,last" if unknown
                                 else "no checkpoint named: give best, last or best,last")
    for name in names:
        if not folder.checkpoint(name).is_file():
            raise RunEvaluationError(f"{folder.checkpoint(name)} not found (use --checkpoints to leave it out)")
    previous = {}
    for name in names:  # unreadable earlier results stop us before minutes of attacks
        try:
            previous[name] = folder.read_eval(name)
        except RunFolderError as error:
            raise RunEvaluationError(f"{error}; fix or remove it") from None
    check_writable_folder(folder.eval_dir, "the results folder")  # before minutes of attacks, not after them
    states = {name: load_checkpoint(folder.checkpoint(name)) for name in names}
    done: dict[str, dict] = {}
    for name in names:
        state, checkpoint = states[name], folder.checkpoint(name)
        twin = next((other for other in done if _same_weights(states[other], state)), None)
        if twin is not None:
            options.log(f"{checkpoint.name} is epoch {state.get('epoch')}, the same weights as "
                        f"{folder.checkpoint(twin).name}: evaluated once")
            record = {**done[twin], "checkpoint": str(checkpoint)}
        else:
            options.log(f"{checkpoint.name} (epoch {state.get('epoch')}):")
            record = evaluate_checkpoint(state, checkpoint, options)
        done[name] = record
        # merged into the file as it is now: another evaluation of this run may have written it since
        _, replaced = folder.merge_eval(name, record, requested=options.attacks)
        if replaced:
            options.log(f"{folder.eval_path(name)}: {replaced}; overwriting it")
    return done
