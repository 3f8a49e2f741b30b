"""Figures (matplotlib, Agg backend: no display needed). Each function writes one PNG and returns its path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..atomic import write_atomic  # noqa: E402
from ..logged import LoggedValue  # noqa: E402
from ..method_catalog import logged_values  # noqa: E402
from ..report import best_record, final_record  # noqa: E402

ACC_CURVES = (("train_clean_acc", "train clean", "tab:blue", "--"), ("train_robust_acc", "train robust", "tab:red", "--"),
              ("test_clean_acc", "test clean", "tab:blue", "-"), ("test_robust_acc", "test robust", "tab:red", "-"))


def _save(fig, path) -> Path:
    """The figure as a PNG at ``path``, written atomically: a failed write is a one-line WriteError."""
    path = Path(path)
    try:
        write_atomic(path, "wb", lambda handle: fig.savefig(handle, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _epoch_axis(ax, last_epoch: int | None = None) -> None:
    """Whole epochs on the x axis (no 2.5, 7.5 ticks); one range for every panel of a figure."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if last_epoch is not None:
        ax.set_xlim(0.5, last_epoch + 0.5)


def _series(records, key):
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _logged_series(records, value: LoggedValue):
    """A declared value's series, read under its key or an older name (``aliases``), per record: a run
    resumed across a rename holds both."""
    keys = (value.key, *value.aliases)
    points = [(r["epoch"], next(r[key] for key in keys if r.get(key) is not None)) for r in records
              if any(r.get(key) is not None for key in keys)]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(runs: list[tuple[str, list[dict]]], path, planned: list[int | None] | None = None) -> Path:
    """One column per run: accuracies (best and final epoch marked), robust gap, grad norm, and a row per
    value a method declares to plot (``Method.logged``, e.g. the TE weight) that one of the runs logged.

    ``planned``: each run's number of epochs (its config); a run that has not reached it has its last
    evaluated epoch marked "last so far", not "final". All columns share one epoch axis.

    The robust generalization gap is ``train_robust_acc - test_robust_acc`` when the run logged
    ``--eval-train-size`` accuracies, else ``train_adv_acc - test_robust_acc`` (the training-time
    adversarial accuracy, train mode), and the panel says which.
    """
    if not runs:
        raise ValueError("no runs to plot")
    plotted = [value for value in logged_values()
               if value.plot and any(_logged_series(records, value)[0] for _, records in runs)]
    rows = 3 + len(plotted)
    fig, axes = plt.subplots(rows, len(runs), figsize=(4.2 * len(runs), 2.6 * rows), squeeze=False)
    planned = planned or [None] * len(runs)
    last_epoch = max([r["epoch"] for _, records in runs for r in records] + [p for p in planned if p])
    for col, (name, records) in enumerate(runs):
        ax = axes[0][col]
        for key, label, color, style in ACC_CURVES:
            epochs, values = _series(records, key)
            if epochs:
                ax.plot(epochs, values, style, color=color, label=label)
        if not any("train_robust_acc" in r for r in records):
            epochs, values = _series(records, "train_adv_acc")
            ax.plot(epochs, values, ":", color="tab:red", label="train adv (training)")
        best = best_record(records)
        final = final_record(records)
        ax.plot([best["epoch"]], [best["test_robust_acc"]], "*", color="black", markersize=12,
                label=f"best ep {best['epoch']}: {best['test_robust_acc']:.3f}")
        unfinished = planned[col] is not None and records[-1]["epoch"] < planned[col]
        which = f"last so far (of {planned[col]})" if unfinished else "final"
        ax.plot([final["epoch"]], [final["test_robust_acc"]], "o", color="black", fillstyle="none", markersize=9,
                label=f"{which} ep {final['epoch']}: {final['test_robust_acc']:.3f}")
        ax.axvline(best["epoch"], color="gray", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)

        ax = axes[1][col]
        train_key = "train_robust_acc" if any("train_robust_acc" in r for r in records) else "train_adv_acc"
        gap = [(r["epoch"], r[train_key] - r["test_robust_acc"]) for r in records
               if train_key in r and "test_robust_acc" in r]
        if gap:
            ax.plot([g[0] for g in gap], [g[1] for g in gap], color="tab:purple")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_ylabel("robust gap")
        ax.set_title(f"{train_key.replace('_acc', '')} - test robust", fontsize=8)
        ax.grid(alpha=0.3)

        ax = axes[2][col]
        epochs, values = _series(records, "grad_norm")
        ax.plot(epochs, values, color="tab:green", label="grad norm")
        ax.set_ylabel("grad norm (mean/epoch)")
        ax.grid(alpha=0.3)
        epochs, values = _series(records, "train_loss")
        if epochs:
            twin = ax.twinx()
            twin.plot(epochs, values, color="tab:orange", lw=0.9, ls="--")
            twin.set_ylabel("train loss", color="tab:orange", fontsize=8)

        for ax, value in zip(axes[3:, col], plotted):
            epochs, values = _logged_series(records, value)
            if epochs:
                ax.plot(epochs, values, color="tab:brown")
            else:
                ax.text(0.5, 0.5, f"no {value.label}", ha="center", va="center", transform=ax.transAxes)
            ax.set_ylabel(value.label)
            ax.grid(alpha=0.3)
        axes[-1][col].set_xlabel("epoch")
        for row in range(rows):
            _epoch_axis(axes[row][col], last_epoch)
    fig.tight_layout()
    return _save(fig, path)


GROUP_PANELS = (("test_robust_acc", "test robust accuracy"), ("train_robust_acc", "train robust accuracy"),
                ("robust_gap", "robust gap (train - test)"), ("test_clean_acc", "test clean accuracy"))


def _mean_band(runs: list[list[dict]], key: str):
    """Per epoch over the runs that logged ``key``: epochs, mean, min, max."""
    by_epoch: dict[int, list[float]] = {}
    for records in runs:
        for r in records:
            if key == "robust_gap":
                value = (r["train_robust_acc"] - r["test_robust_acc"]) if "train_robust_acc" in r and \
                    "test_robust_acc" in r else None
            else:
                value = r.get(key)
            if value is not None:
                by_epoch.setdefault(r["epoch"], []).append(value)
    epochs = sorted(by_epoch)
    values = [by_epoch[e] for e in epochs]
    return (epochs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def plot_groups(groups: list[tuple[str, list[list[dict]]]], path) -> Path:
    """Methods overlaid, one panel per quantity: the mean over a group's seeds (line) and their
    range (band), with each group's best epoch of the mean curve marked; lr drops as dotted lines."""
    if not groups:
        raise ValueError("no runs to plot")
    panels = [p for p in GROUP_PANELS if any(_mean_band(runs, p[0])[0] for _, runs in groups)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drops = set()
    for _, runs in groups:
        for records in runs:
            # step-schedule drops only (a cosine schedule lowers the lr a little every epoch)
            drops.update(b["epoch"] for a, b in zip(records, records[1:]) if b.get("lr", 0) < 0.5 * a.get("lr", 0))
    for ax, (key, title) in zip(axes[0], panels):
        for i, (label, runs) in enumerate(groups):
            epochs, mean, low, high = _mean_band(runs, key)
            if not epochs:
                continue
            color = colors[i % len(colors)]
            seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
            ax.plot(epochs, mean, color=color, label=label + seeds)
            if len(runs) > 1:
                ax.fill_between(epochs, low, high, color=color, alpha=0.15, lw=0)
            if key == "test_robust_acc":
                best = max(range(len(mean)), key=lambda j: mean[j])
                ax.plot([epochs[best]], [mean[best]], "*", color=color, markersize=10)
        for epoch in sorted(drops):
            ax.axvline(epoch - 0.5, color="gray", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("mean over seeds (band: min-max)")
    fig.tight_layout()
    return _save(fig, path)


def plot_gradient_stability(results: list[dict], path) -> Path:
    """Per checkpoint (columns), log-log against ``||delta||``: the ratio
    ``||grad L(theta+delta) - grad L(theta)|| / ||delta||`` and (second row, when present) the
    scale-free relative change ``||grad L(theta+delta) - grad L(theta)|| / ||grad L(theta)||``."""
    if not results:
        raise ValueError("no results to plot")
    relative = all("relative_change_mean" in v for r in results for v in r["losses"].values())
    rows = 2 if relative else 1
    fig, axes = plt.subplots(rows, len(results), figsize=(4.5 * len(results), 3.4 * rows), squeeze=False)
    styles = {"pgd-at": ("tab:red", "o-"), "trades": ("tab:blue", "s-"), "clean": ("tab:gray", "^--")}
    for col, result in enumerate(results):
        title = Path(result.get("checkpoint", "")).parent.name or result.get("method", "")
        for row in range(rows):
            ax = axes[row][col]
            for name, values in result["losses"].items():
                color, style = styles.get(name, (None, "o-"))
                if row == 0:
                    ax.errorbar(result["radii"], values["ratio_mean"], yerr=values["ratio_std"], fmt=style,
                                color=color, label=f"{name} loss", capsize=2)
                else:
                    ax.plot(result["radii"], values["relative_change_mean"], style, color=color, label=f"{name} loss")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("||delta|| (weight perturbation)")
            ax.set_ylabel("||g(θ+δ) - g(θ)|| / ||δ||" if row == 0 else "||g(θ+δ) - g(θ)|| / ||g(θ)||")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_memorization(reports: list[dict], path) -> Path:
    """Per run: newly fitted (stably) adversarial examples per epoch, with test/train robust accuracy."""
    if not reports:
        raise ValueError("no reports to plot")
    fig, axes = plt.subplots(1, len(reports), figsize=(4.5 * len(reports), 3.4), squeeze=False)
    for ax, report in zip(axes[0], reports):
        per = report["per_epoch"]
        colors = ["tab:orange" if e > report["late_after"] else "tab:gray" for e in per["epoch"]]
        ax.bar(per["epoch"], [c / report["samples"] for c in per["newly_fitted"]], color=colors, alpha=0.7)
        ax.plot(per["epoch"], per["test_robust_acc"], "r-", label="test robust")
        ax.plot(per["epoch"], per["train_robust_acc"], "r--", label="train robust")
        ax.axvline(report["best_epoch"], color="black", lw=0.8, ls=":", label=f"best epoch {report['best_epoch']}")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        _epoch_axis(ax)
        ax.set_ylabel("fraction of samples / accuracy")
        ax.set_title(f"{report['run']}: {report['late']} late of {report['samples']}", fontsize=10)
        # the bars' two colours need their own legend entries (one labelled bar container shows one)
        handles, _ = ax.get_legend_handles_labels()
        handles[:0] = [Patch(color="tab:gray", alpha=0.7, label="newly fitted, stays fitted"),
                       Patch(color="tab:orange", alpha=0.7, label=f"... late (after epoch {report['late_after']})")]
        ax.legend(handles=handles, fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
