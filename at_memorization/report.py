"""Tables from run folders: ``at-mem report``.

A run folder (``at-mem train --out RUN``) holds ``config.json``, ``metrics.jsonl`` (one record per
epoch) and, after ``at-mem evaluate RUN``, ``eval/best.json`` and ``eval/last.json`` (the best and
the final checkpoint). ``report`` groups runs that differ only in their seed, and gives per group
the mean (and sample standard deviation) over seeds of:

- best and final clean / PGD-20 / CW / AutoAttack accuracy (from the eval files) and, for each
  robust metric, best minus final (the robust overfitting gap, per seed, then averaged);
- best and final per-epoch test robust accuracy (``test_robust_acc`` of ``metrics.jsonl``, PGD with
  the run's ``eval_steps``) and best minus final; "best" is the epoch of ``best.pt``
  (``records.best_record``, the trainer's rule);
- the final training robust accuracy (``train_robust_acc``, from ``--eval-train-size``);
- optionally paired differences (OTHER minus BASE, runs matched by seed).

Everything here is plain functions with explicit arguments and no torch; errors are ReportError with
a one-line message (the CLI prints it as ``Error: ...``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .records import (ATTACK_NAMES, ATTACK_TITLES, CHECKPOINT_NAMES, ROBUST_ATTACK_NAMES, NoEvaluatedEpoch, attack_of,
                      best_record, final_record)
from .runfolder import RunFolder, RunFolderError
from .settings import RunConfig, report_ignored
from .user_errors import UserError

# Settings that do not change a run's results (besides the seed, which defines the repetitions):
# declared with the settings (groups_report=False).
IGNORED_SETTINGS = report_ignored()
FORMATS = ("markdown", "csv", "json")


class ReportError(UserError, ValueError):
    """The runs cannot be tabulated (not a run, unreadable file, mixed data sets); one-line reason."""


# --------------------------------------------------------------------------- reading runs
@dataclass
class Run:
    """One run folder: its settings, its per-epoch records and its eval records (None when absent)."""

    path: Path
    config: dict
    records: list[dict]
    evals: dict = field(default_factory=dict)  # "best"/"last" -> eval record or None
    warnings: list[str] = field(default_factory=list)
    method_config: dict | None = None  # the method's resolved settings (config.json's "method")

    @property
    def unfinished(self) -> bool:
        """Fewer epochs in metrics.jsonl than the run was set up for (still training, or stopped)."""
        epochs = self.config.get("epochs")
        return isinstance(epochs, int) and self.records[-1]["epoch"] < epochs

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def method(self) -> str:
        return str(self.config.get("method"))

    @property
    def dataset(self):
        return self.config.get("dataset")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_run(run_dir: str | Path) -> Run:
    """Read one run folder; ReportError when it is not one or a file in it is unreadable."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    folder = RunFolder(run_dir)
    for path in (folder.config, folder.metrics):
        if not path.is_file():
            raise ReportError(f"{run_dir} is not a run folder (no {path.name}; `at-mem train --out` writes one)")
    try:
        document = folder.read_config()
        records = folder.read_metrics()
    except RunFolderError as error:
        raise ReportError(str(error)) from None
    config = document["config"]
    method_config = document.get("method")
    run = Run(path=run_dir, config=config, records=records,
              method_config=method_config if isinstance(method_config, dict) else None)
    if run.unfinished:
        run.warnings.append(f"{run_dir} has {run.records[-1]['epoch']} of {config['epochs']} epochs (still training or "
                            "stopped): its 'final' is its last epoch so far")
    try:
        expected = {"best": best_record(run.records)["epoch"], "last": run.records[-1]["epoch"]}
    except NoEvaluatedEpoch as error:
        raise ReportError(str(error)) from None
    for which in CHECKPOINT_NAMES:
        path = folder.eval_path(which)
        try:
            record = folder.read_eval(which)
        except RunFolderError as error:
            raise ReportError(str(error)) from None
        if record is not None and not isinstance(record, dict):
            raise ReportError(f"{path}: not a JSON object")
        for key, value in (record or {}).items():
            if attack_of(key) and not _is_number(value):
                raise ReportError(f"{path}: {key} is not a number")
        if record is not None and not isinstance(record.get("n_examples_by_attack", {}), dict):
            raise ReportError(f"{path}: n_examples_by_attack is not a JSON object")
        if record is not None and record.get("epoch") != expected[which]:
            run.warnings.append(f"{path} is for epoch {record.get('epoch')} but the run's {which} epoch is "
                                f"{expected[which]} (run `at-mem evaluate {run_dir}` again); left out")
            record = None
        elif record is not None and isinstance(record.get("eps"), (int, float)) and isinstance(config.get("eps"), (int, float)) \
                and not math.isclose(record["eps"], config["eps"], rel_tol=1e-6):
            run.warnings.append(f"{path} was measured at eps {record['eps']:.4g}, the run trained at eps {config['eps']:.4g}")
        run.evals[which] = record
    return run


def read_runs(run_dirs) -> list[Run]:
    """Read several run folders (the same folder given twice counts once); all of one data set."""
    runs, seen, skipped, files = [], set(), [], []
    for run_dir in run_dirs:
        key = Path(run_dir).resolve()
        if key in seen:
            continue
        seen.add(key)
        if Path(run_dir).is_file():  # `report runs/*` also matches the logs beside the run folders
            files.append(str(run_dir))
            continue
        folder = RunFolder(run_dir)
        try:
            no_epoch_yet = folder.metrics.is_file() and not folder.metrics_text().strip()
        except RunFolderError as error:
            raise ReportError(str(error)) from None
        if no_epoch_yet:
            skipped.append(f"{run_dir} has not finished an epoch yet: left out")
            continue
        runs.append(read_run(run_dir))
    if files:
        skipped.insert(0, f"{len(files)} file(s) given are not run folders, left out: {', '.join(files[:3])}"
                          + (", ..." if len(files) > 3 else ""))
    if not runs:
        raise ReportError("no run folders given" if not skipped else f"no run to report ({skipped[0]})")
    runs[0].warnings[:0] = skipped
    first = runs[0]
    for run in runs[1:]:
        if run.dataset != first.dataset:
            raise ReportError(f"runs of different data sets in one table: {first.path} is {first.dataset}, "
                              f"{run.path} is {run.dataset}")
    return runs


# --------------------------------------------------------------------------- grouping
def _config_defaults() -> dict:
    """RunConfig's defaults, so that a config.json written before a setting existed compares equal."""
    return RunConfig().resolve().to_dict()


def settings(config: dict, method_config: dict | None = None) -> dict:
    """The settings that change results: the config (missing keys at RunConfig's defaults) less
    IGNORED_SETTINGS, with the method's resolved settings (config.json's "method": defaults filled in,
    so ``--te-weight 300`` and the default 300 are one setting); else ``method_args``, flattened."""
    flat = {}
    for key, value in (_config_defaults() | config).items():
        if key in IGNORED_SETTINGS or key == "method_args":
            continue
        flat[key] = value
    method_settings = method_config if method_config is not None else config.get("method_args")
    if isinstance(method_settings, dict):
        flat.update(method_settings)
    return flat


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _show(value) -> str:
    if isinstance(value, float):
        text = repr(value)  # the shortest exact form: 0.2 and 0.20001 must not print alike
        return text[:-2] if text.endswith(".0") else text
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class Group:
    """Runs with the same settings, differing only in seed."""

    label: str
    method: str
    settings: dict
    runs: list[Run]

    @property
    def seeds(self) -> list:
        return [run.seed for run in self.runs]


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by settings (order of first appearance; runs in a group by seed).

    A group's label is its method; groups that share a method get the settings that differ between
    them appended, e.g. ``pgd-at (label_noise=0.2)``. Two runs with the same settings and seed are
    an error (they would count twice).
    """
    keyed: dict[str, list[Run]] = {}
    for run in runs:
        keyed.setdefault(_canonical(settings(run.config, run.method_config)), []).append(run)
    groups = []
    for members in keyed.values():
        by_seed = {}
        for run in members:
            if _canonical(run.seed) in by_seed:
                raise ReportError(f"{by_seed[_canonical(run.seed)].path} and {run.path} have the same settings and "
                                  f"seed ({run.seed}); give only one of them")
            by_seed[_canonical(run.seed)] = run
        members = sorted(members, key=lambda r: (not isinstance(r.seed, (int, float)), r.seed if isinstance(r.seed, (int, float)) else 0, str(r.seed)))
        groups.append(Group(label=members[0].method, method=members[0].method,
                            settings=settings(members[0].config, members[0].method_config),
                            runs=members))
    by_method: dict[str, list[Group]] = {}
    for group in groups:
        by_method.setdefault(group.method, []).append(group)
    for same in by_method.values():
        if len(same) < 2:
            continue
        keys = sorted({k for g in same for k in g.settings})
        differing = [k for k in keys if len({_canonical(g.settings.get(k)) for g in same}) > 1]
        for group in same:
            group.label = f"{group.method} ({', '.join(f'{k}={_show(group.settings.get(k))}' for k in differing)})"
    return groups


# --------------------------------------------------------------------------- metrics
def metric_keys() -> list[str]:
    """The report's metrics, in column order."""
    keys = ["epochs", "best_epoch"]
    keys += [f"{which}_{attack}" for which in ("best", "final") for attack in ATTACK_NAMES]
    keys += [f"gap_{attack}" for attack in ROBUST_ATTACK_NAMES]
    keys += ["best_robust_per_epoch", "final_robust_per_epoch", "gap_robust_per_epoch", "final_train_robust"]
    return keys


PERCENT_KEYS = tuple(k for k in metric_keys() if k not in ("epochs", "best_epoch"))
PAIRED_KEYS = PERCENT_KEYS  # every best, final and best-minus-final metric


def run_metrics(run: Run) -> dict[str, tuple[float | None, int | None]]:
    """Each metric of one run as (value or None, number of test points it was measured on or None)."""
    records, config = run.records, run.config
    best, final = best_record(records), final_record(records)
    out: dict[str, tuple] = {"epochs": (final["epoch"], None), "best_epoch": (best["epoch"], None)}
    for which, name in (("best", "best"), ("final", "last")):
        record = run.evals.get(name) or {}
        by_attack = record.get("n_examples_by_attack") or {}
        for attack in ATTACK_NAMES:
            value = record.get(f"{attack}_acc")
            n = by_attack.get(attack, record.get("n_examples")) if value is not None else None
            out[f"{which}_{attack}"] = (value, n)
    for attack in ROBUST_ATTACK_NAMES:
        (b, nb), (f, nf) = out[f"best_{attack}"], out[f"final_{attack}"]
        out[f"gap_{attack}"] = (b - f, nb if nb == nf else None) if b is not None and f is not None else (None, None)
    test_n = config.get("test_size")
    out["best_robust_per_epoch"] = (best["test_robust_acc"], test_n)
    out["final_robust_per_epoch"] = (final["test_robust_acc"], test_n)
    out["gap_robust_per_epoch"] = (best["test_robust_acc"] - final["test_robust_acc"], test_n)
    train_n = config.get("eval_train_size") or None
    if train_n and isinstance(config.get("train_size"), int):
        train_n = min(train_n, config["train_size"])  # the trainer measures at most the whole training set
    train_robust = final.get("train_robust_acc")
    out["final_train_robust"] = (train_robust, train_n if train_robust is not None else None)
    return out


def summary(values: list[float]) -> dict:
    """mean and sample standard deviation (ddof=1; None for fewer than two values)."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def group_metrics(group: Group) -> dict[str, dict]:
    """Per metric: mean, std, n, and the per-seed ``seeds``, ``values``, ``runs``, ``n_examples``."""
    per_run = [run_metrics(run) for run in group.runs]
    out = {}
    for key in metric_keys():
        seeds, values, runs, n_examples = [], [], [], []
        for run, metrics in zip(group.runs, per_run):
            value, n = metrics[key]
            if value is None:
                continue
            seeds.append(run.seed)
            values.append(value)
            runs.append(str(run.path))
            n_examples.append(n)
        out[key] = {**summary(values), "seeds": seeds, "values": values, "runs": runs, "n_examples": n_examples}
    return out


def _split_pair(spec: str, labels: list[str]) -> tuple[str, str]:
    """``BASE:OTHER`` -> (BASE, OTHER); a label may itself contain ':'."""
    if ":" not in spec:
        raise ReportError(f"--paired {spec!r}: write BASE:OTHER, e.g. pgd-at:pgd-at-te")
    candidates = [(spec[:i], spec[i + 1:]) for i, c in enumerate(spec) if c == ":"]
    for base, other in candidates:
        if base in labels and other in labels:
            return base, other
    base, other = candidates[0]
    missing = base if base not in labels else other
    raise ReportError(f"--paired {spec!r}: no group labelled {missing!r} in the table (labels: {', '.join(labels)})")


def paired_differences(groups: list[Group], spec: str) -> dict:
    """OTHER minus BASE per metric, over the seeds both groups ran (and both measured)."""
    labels = [g.label for g in groups]
    base_label, other_label = _split_pair(spec, labels)
    if base_label == other_label:
        raise ReportError(f"--paired {spec!r}: BASE and OTHER are the same group")
    base = next(g for g in groups if g.label == base_label)
    other = next(g for g in groups if g.label == other_label)
    base_runs = {_canonical(r.seed): r for r in base.runs}
    pairs = [(base_runs[_canonical(r.seed)], r) for r in other.runs if _canonical(r.seed) in base_runs]
    if not pairs:
        raise ReportError(f"--paired {spec!r}: no seed in common ({base_label}: seeds "
                          f"{', '.join(map(str, base.seeds))}; {other_label}: seeds {', '.join(map(str, other.seeds))})")
    warnings = []
    unequal = [(b, o) for b, o in pairs if b.records[-1]["epoch"] != o.records[-1]["epoch"]]
    for b, o in unequal:
        warnings.append(f"--paired {spec}: seed {o.seed} left out: {b.path} is at epoch {b.records[-1]['epoch']}, "
                        f"{o.path} at epoch {o.records[-1]['epoch']}")
    pairs = [pair for pair in pairs if pair not in unequal]
    if not pairs:
        raise ReportError(f"--paired {spec!r}: no seed where both runs reached the same epoch")
    metrics = {}
    pair_metrics = [(run_metrics(b), run_metrics(o), o.seed) for b, o in pairs]
    for key in PAIRED_KEYS:
        seeds, diffs, n_examples = [], [], []
        for base_m, other_m, seed in pair_metrics:
            (b, nb), (o, no) = base_m[key], other_m[key]
            if b is not None and o is not None:
                seeds.append(seed)
                diffs.append(o - b)
                n_examples.append(nb if nb == no else None)
                if nb != no:
                    warnings.append(f"--paired {spec}: {key} of seed {seed} compares {nb} with {no} test points")
        metrics[key] = {**summary(diffs), "seeds": seeds, "values": diffs, "n_examples": n_examples}
    return {"base": base_label, "other": other_label, "seeds": [o.seed for _, o in pairs], "n_pairs": len(pairs),
            "metrics": metrics, "warnings": warnings}


# --------------------------------------------------------------------------- the report
def build_report(runs: list[Run], paired: list[str] = ()) -> dict:
    """The report as plain data (what ``--format json`` prints): fractions, per-seed values included."""
    groups = group_runs(runs)
    pairs = [paired_differences(groups, spec) for spec in paired]
    eval_steps = {g.label: g.settings.get("eval_steps") for g in groups}
    return {
        "dataset": runs[0].dataset,
        "metrics": {key: metric_title(key, _common(eval_steps.values())) for key in metric_keys()},
        "groups": [{"label": g.label, "method": g.method, "settings": g.settings, "seeds": g.seeds,
                    "n_seeds": len(g.runs), "runs": [str(r.path) for r in g.runs], "metrics": group_metrics(g)}
                   for g in groups],
        "paired": pairs,
        "warnings": [w for run in runs for w in run.warnings] + [w for p in pairs for w in p["warnings"]],
    }


def _common(values):
    values = list(values)
    return values[0] if values and all(v == values[0] for v in values) else None


def metric_title(key: str, eval_steps=None) -> str:
    per_epoch = f"PGD-{eval_steps} (per epoch)" if eval_steps is not None else "PGD (per epoch, eval_steps)"
    titles = {"epochs": "epochs", "best_epoch": "best epoch",
              "best_robust_per_epoch": f"best {per_epoch}", "final_robust_per_epoch": f"final {per_epoch}",
              "gap_robust_per_epoch": f"best-final {per_epoch}",
              "final_train_robust": f"final train {per_epoch}"}
    if key in titles:
        return titles[key]
    which, attack = key.split("_", 1)
    return f"{'best-final' if which == 'gap' else which} {ATTACK_TITLES[attack]}"


def _number(value: float, percent: bool) -> str:
    if percent:
        return f"{100 * value:.1f}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _cell(stats: dict, percent: bool, n_total: int | None = None) -> str:
    if stats["mean"] is None:
        return "-"
    text = _number(stats["mean"], percent)
    if stats["std"] is not None and (percent or stats["std"] > 0):  # epochs: "40", not "40 ± 0"
        text += " ± " + (_number(stats["std"], percent) if percent else f"{stats['std']:.1f}")
    if n_total is not None and stats["n"] < n_total:
        text += f" (n={stats['n']})"
    return text


def _n_examples_text(values) -> str | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _notes(report: dict) -> list[str]:
    """Lines under the markdown table: on how many test points each metric was measured."""
    groups = report["groups"]
    lines = ["Accuracies in %, mean ± sample std (ddof=1) over seeds; (n=k): only k seeds have the metric; "
             "best-final per seed, then averaged. best = the epoch of best.pt (highest per-epoch test robust accuracy)."]
    parts = []
    for which_attack in ATTACK_NAMES:
        keys = [f"best_{which_attack}", f"final_{which_attack}"]
        by_group = {}
        for group in groups:
            ns = [n for k in keys for n in group["metrics"][k]["n_examples"]]
            text = _n_examples_text(ns)
            if text:
                by_group[group["label"]] = text
        if not by_group:
            continue
        if len(set(by_group.values())) == 1:
            parts.append(f"{ATTACK_TITLES[which_attack]} {next(iter(by_group.values()))}")
        else:
            parts.append(f"{ATTACK_TITLES[which_attack]} " + ", ".join(f"{v} ({k})" for k, v in by_group.items()))
    if parts:
        lines.append("Test points per eval metric (first N of the test set, from eval/*.json): " + "; ".join(parts) + ".")
    sizes = {g["label"]: g["settings"].get("test_size") for g in groups}
    steps = {g["label"]: g["settings"].get("eval_steps") for g in groups}
    train = {g["label"]: g["settings"].get("eval_train_size") for g in groups}

    def describe(mapping, fmt):
        if _common(mapping.values()) is not None or len(set(map(str, mapping.values()))) == 1:
            return fmt(next(iter(mapping.values())))
        return ", ".join(f"{fmt(v)} ({k})" for k, v in mapping.items())

    lines.append("Per-epoch metrics (metrics.jsonl): test robust = PGD-" + describe(steps, str) + " on "
                 + describe(sizes, lambda v: "the full test set" if v is None else f"{v} test points")
                 + "; train robust = the same PGD on " + describe(train, lambda v: "-" if not v else f"{v} training points")
                 + " (their training labels).")
    return lines


def to_markdown(report: dict) -> str:
    groups = report["groups"]
    keys = [k for k in metric_keys() if k in ("epochs", "best_epoch", "best_robust_per_epoch", "final_robust_per_epoch",
                                              "gap_robust_per_epoch", "final_train_robust")
            or any(g["metrics"][k]["n"] for g in groups)]
    header = ["method", "seeds"] + [report["metrics"][k] for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        cells = [group["label"], str(group["n_seeds"])]
        cells += [_cell(group["metrics"][k], k in PERCENT_KEYS, group["n_seeds"]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _notes(report)
    for warning in report["warnings"]:
        lines.append(f"Warning: {warning}")
    if report["paired"]:
        pkeys = [k for k in PAIRED_KEYS if any(p["metrics"][k]["n"] for p in report["paired"])]
        header = ["OTHER - BASE (same seed)", "pairs"] + [report["metrics"][k] for k in pkeys]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for pair in report["paired"]:
            cells = [f"{pair['other']} - {pair['base']}", str(pair["n_pairs"])]
            cells += [_cell(pair["metrics"][k], True, pair["n_pairs"]) for k in pkeys]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Paired differences in percentage points: OTHER minus BASE per seed, mean ± sample std over pairs."]
    return "\n".join(lines) + "\n"


def to_csv(report: dict) -> str:
    """One row per group, then one per --paired (kind 'paired'); means and stds in %, one decimal."""
    keys = metric_keys()
    header = ["kind", "label", "method", "n", "seeds"]
    for key in keys:
        header += [f"{key}_mean", f"{key}_std"]
        if key not in ("epochs", "best_epoch"):
            header.append(f"{key}_n_examples")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)

    def cells(metrics: dict, key: str, with_n: bool):
        stats = metrics.get(key)
        percent = key in PERCENT_KEYS
        if stats is None or stats["mean"] is None:
            row = ["", ""]
        else:
            row = [_number(stats["mean"], percent) if percent else f"{stats['mean']:g}",
                   "" if stats["std"] is None else (_number(stats["std"], percent) if percent else f"{stats['std']:.3g}")]
        if with_n:
            row.append(_n_examples_text((stats or {}).get("n_examples") or []) or "")
        return row

    for group in report["groups"]:
        row = ["group", group["label"], group["method"], group["n_seeds"], " ".join(map(str, group["seeds"]))]
        for key in keys:
            row += cells(group["metrics"], key, key not in ("epochs", "best_epoch"))
        writer.writerow(row)
    for pair in report["paired"]:
        row = ["paired", f"{pair['other']} - {pair['base']}", "", pair["n_pairs"], " ".join(map(str, pair["seeds"]))]
        for key in keys:
            row += cells(pair["metrics"], key, key not in ("epochs", "best_epoch"))
        writer.writerow(row)
    return buffer.getvalue()


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2) + "\n"


def render(report: dict, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ReportError(f"unknown format {fmt!r}; use {', '.join(FORMATS)}")
    return {"markdown": to_markdown, "csv": to_csv, "json": to_json}[fmt](report)


def report(run_dirs, *, fmt: str = "markdown", paired=()) -> tuple[str, list[str]]:
    """Read the run folders and render the table; returns (text, warnings)."""
    data = build_report(read_runs(run_dirs), list(paired))
    return render(data, fmt), data["warnings"]
