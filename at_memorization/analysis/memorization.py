"""Robust overfitting as memorization: which training samples' adversarial examples are fitted late.

Input: a run trained with ``--track-samples``, whose ``tracking.pt`` holds, per epoch ``e`` and
training sample ``i``, ``adv_correct[e, i]`` (the training adversarial example of ``i`` in epoch
``e`` is classified as its training label, eval mode) and ``adv_loss[e, i]``.

Definitions (epochs counted from 1, over the run's completed epochs ``1..E``):

* **fit epoch** of ``i``: the first epoch ``e`` such that ``adv_correct[e', i] = 1`` for every
  ``e' >= e``; ``None`` when the sample's adversarial example is wrong at epoch ``E`` (not fitted).
* **onset of robust overfitting**: the epoch ``e*`` of the best test robust accuracy.
* **late** samples: fit epoch ``> late_after`` (default ``e*``), i.e. fitted only once the test
  robust accuracy has stopped improving: the memorized (hard, atypical or mislabelled) ones.
* **diverging epochs**: epochs ``e > e*`` where the training robust accuracy rises while the test
  robust accuracy falls (``train_robust_acc`` from ``--eval-train-size`` when logged, else the
  tracked fraction of fitted adversarial examples).
* **noisy** samples: training label != original label (from ``labels.pt``).

Following Dong et al. (ICLR 2022, Sec. 4): robust overfitting comes with the model fitting the
adversarial examples of hard / atypical training samples late in training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_labels, load_tracking as load_tracking_file
from ..records import best_record
from ..runfolder import RunFolder
from .common import read_metrics
from ..user_errors import AnalysisError


def load_tracking(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: no such run directory")
    path = RunFolder(run_dir).tracking
    if not path.is_file():
        raise AnalysisError(f"{path} not found: train the run with --track-samples to record per-sample "
                            f"adversarial correctness")
    try:  # the trainer's checks: a dict of uint8 flags and float16 losses of one (epochs, samples) shape
        tracked = load_tracking_file(path, None, None)
    except CheckpointError as error:
        raise AnalysisError(str(error)) from None
    if bool((tracked["adv_correct"] > 1).any()):  # flags read as booleans: any other value would count as fitted
        raise AnalysisError(f"{path}: tracking entry 'adv_correct' holds values other than 0 and 1")
    return tracked


def fit_epochs(adv_correct: torch.Tensor) -> torch.Tensor:
    """Per sample, the first epoch (from 1) after which it stays correct to the end; 0 = not fitted."""
    correct = adv_correct.bool()
    epochs = correct.shape[0]
    # stays[e, i]: correct at every epoch from e to the end
    stays = torch.flip(torch.cumprod(torch.flip(correct, [0]).to(torch.int64), 0), [0]).bool()
    count = stays.sum(0)  # number of trailing correct epochs
    return torch.where(count > 0, epochs - count + 1, torch.zeros_like(count))


def _group_stats(fit: torch.Tensor, mask: torch.Tensor, late: torch.Tensor, final_loss: torch.Tensor) -> dict:
    n = int(mask.sum())
    if n == 0:
        return {"count": 0}
    fitted = (fit > 0) & mask
    return {
        "count": n,
        "fitted_at_end": int(fitted.sum()), "fraction_fitted_at_end": fitted.sum().item() / n,
        "late": int((late & mask).sum()), "fraction_late": (late & mask).sum().item() / n,
        "mean_fit_epoch": fit[fitted].float().mean().item() if fitted.any() else None,
        "mean_final_adv_loss": final_loss[mask].float().mean().item(),
    }


def memorization_report(run_dir: str | Path, *, late_after: int | None = None, max_listed: int = 200) -> dict:
    """The memorization report of one tracked run (see the module docstring for the definitions)."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    records = read_metrics(run_dir)
    tracked = load_tracking(run_dir)
    epochs = len(records)
    if tracked["adv_correct"].shape[0] < epochs:
        raise AnalysisError(f"{folder.tracking} has {tracked['adv_correct'].shape[0]} epochs but "
                            f"{folder.metrics.name} has {epochs}")
    recorded = tracked.get("recorded")
    if recorded is not None and not bool(recorded[:epochs].all()):
        missing = [e + 1 for e in range(epochs) if not recorded[e]]
        raise AnalysisError(f"{folder.tracking} has no per-sample records for epoch(s) "
                            f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} "
                            f"({folder.tracking.name} was lost before the run resumed); zeros there would read as "
                            "'never fitted'")
    correct = tracked["adv_correct"][:epochs]
    losses = tracked["adv_loss"][:epochs].float()
    n = correct.shape[1]
    fit = fit_epochs(correct)

    skipped = [r["epoch"] for r in records if "test_robust_acc" not in r]
    if skipped:
        raise AnalysisError(f"{run_dir} was not evaluated at every epoch (--eval-every; e.g. epoch {skipped[0]}): "
                            f"the memorization report compares per-epoch test accuracy; train with --eval-every 1")
    test_robust = [r["test_robust_acc"] for r in records]
    tracked_acc = correct.float().mean(1).tolist()
    train_robust_source = "train_robust_acc" if all("train_robust_acc" in r for r in records) else "tracked adv_correct"
    train_robust = [r["train_robust_acc"] for r in records] if train_robust_source == "train_robust_acc" else tracked_acc
    best_index = records.index(best_record(records[:epochs]))
    best_epoch = records[best_index]["epoch"]
    late_after = best_epoch if late_after is None else int(late_after)
    if not 0 <= late_after <= epochs:
        raise AnalysisError(f"late-after must be in [0, {epochs}] (epochs of the run), got {late_after}")
    diverging = [records[i]["epoch"] for i in range(1, epochs)
                 if records[i]["epoch"] > best_epoch and train_robust[i] > train_robust[i - 1]
                 and test_robust[i] < test_robust[i - 1]]

    late = fit > late_after
    newly_fitted = [int((fit == e).sum()) for e in range(1, epochs + 1)]
    late_order = torch.argsort(fit.masked_fill(~late, epochs + 1), stable=True)[: int(late.sum())]
    final_loss = losses[-1]

    labels_file = folder.labels
    noisy = None
    if labels_file.is_file():
        try:
            labels = load_labels(labels_file, n)
        except CheckpointError as error:
            raise AnalysisError(str(error)) from None
        noisy = labels["labels"] != labels["clean_labels"]

    report = {
        "run_dir": str(run_dir), "run": run_dir.name, "epochs": epochs, "samples": n,
        "best_epoch": best_epoch, "best_test_robust_acc": test_robust[best_index],
        "final_test_robust_acc": test_robust[-1], "robust_overfitting": test_robust[best_index] - test_robust[-1],
        "train_robust_source": train_robust_source,
        "final_train_robust_acc": train_robust[-1],
        "final_robust_gap": train_robust[-1] - test_robust[-1],
        "late_after": late_after,
        "fitted_at_end": int((fit > 0).sum()), "never_fitted": int((fit == 0).sum()),
        "late": int(late.sum()), "fraction_late": late.sum().item() / n,
        "late_in_diverging_epochs": int(sum(int((fit == e).sum()) for e in diverging)),
        "diverging_epochs": diverging,
        "per_epoch": {
            "epoch": [r["epoch"] for r in records],
            "test_robust_acc": test_robust, "train_robust_acc": train_robust,
            "tracked_adv_acc": tracked_acc, "newly_fitted": newly_fitted,
            "fitted_so_far": [sum(newly_fitted[:e]) / n for e in range(1, epochs + 1)],
            "mean_adv_loss": losses.mean(1).tolist(),
            "mean_adv_loss_late": losses[:, late].mean(1).tolist() if late.any() else None,
            "mean_adv_loss_early": (losses[:, (fit > 0) & ~late].mean(1).tolist()
                                    if ((fit > 0) & ~late).any() else None),
        },
        "late_samples": late_order[:max_listed].tolist(),
        "late_samples_fit_epoch": fit[late_order[:max_listed]].tolist(),
    }
    if noisy is not None:
        clean = ~noisy
        report["noisy_labels"] = {
            "noisy": _group_stats(fit, noisy, late, final_loss),
            "clean": _group_stats(fit, clean, late, final_loss),
            "fraction_of_late_that_are_noisy": (late & noisy).sum().item() / max(int(late.sum()), 1),
        }
    return report


SUMMARY_KEYS = ("epochs", "samples", "best_epoch", "best_test_robust_acc", "final_test_robust_acc",
                "robust_overfitting", "final_train_robust_acc", "final_robust_gap", "late_after", "late",
                "fraction_late", "never_fitted", "late_in_diverging_epochs")


def compare_runs(reports: list[dict]) -> dict:
    """One row per run with the headline numbers, for comparing runs (e.g. PGD-AT vs PGD-AT+TE)."""
    rows = []
    for report in reports:
        row = {"run_dir": report["run_dir"], **{k: report[k] for k in SUMMARY_KEYS}}
        if "noisy_labels" in report:
            row["noisy_fraction_fitted"] = report["noisy_labels"]["noisy"].get("fraction_fitted_at_end")
            row["clean_fraction_fitted"] = report["noisy_labels"]["clean"].get("fraction_fitted_at_end")
        rows.append(row)
    return {"runs": rows}
