"""The analysis commands of ``at-mem``: gradient-stability, measures, memorization, plot.

``at-mem`` imports this module only when one of them is called (``LAZY_COMMANDS`` in
``at_memorization/cli.py`` names them); ``register(group)`` adds them all to another click group.
They parse and validate, call the analysis functions, write JSON/PNG files and print a summary;
the library's user-facing errors become one ``Error: ...`` line (``one_line_errors``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..atomic import write_text_atomic
from ..user_errors import one_line_errors


class FloatListType(click.ParamType):
    name = "numbers"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        try:
            values = [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers like 1e-3,1e-2", param, ctx)
        if not values or any(v <= 0 for v in values):
            self.fail(f"{value!r}: give one or more positive numbers", param, ctx)
        return values


def _positive(name, value):
    if value is not None and value <= 0:
        raise click.ClickException(f"{name} must be positive, got {value}")


def _write_json(path, obj, plot_path=None, plot=None) -> None:
    """The results as JSON at ``path``; with ``plot_path``, also ``plot(plot_path)``'s PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(obj, indent=2) + "\n", path)
    click.echo(f"wrote {path}")
    if plot_path:
        click.echo(f"wrote {plot(plot_path)}")


def _check_seed(seed) -> None:
    """A run's seed bounds (NumPy's seeding takes 0 <= seed < 2**32): a one-line SettingError."""
    from ..settings import SETTINGS_BY_NAME

    SETTINGS_BY_NAME["seed"].check(seed)


def _device(device):
    from ..runtime import resolve_device

    return str(resolve_device(device))


def _fmt(value):
    return "n/a" if value is None else f"{value:.4g}"


# --------------------------------------------------------------------------- gradient-stability
@click.command("gradient-stability")
@click.argument("checkpoint", type=click.Path())
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also write a PNG here.")
@click.option("--data-dir", default=None, help="[default: the checkpoint's]")
@click.option("--n-batches", type=int, default=2, show_default=True, help="Training batches the losses are computed on.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--radii", type=FloatListType(), default="1e-3,1e-2,1e-1,1", show_default=True,
              help="Norms of the random weight perturbations delta.")
@click.option("--draws", type=int, default=3, show_default=True, help="Random directions per radius.")
@click.option("--beta", type=float, default=None, help="TRADES beta [default: the run's, else 6].")
@click.option("--device", default=None, help="[default: cuda when available]")
@click.option("--seed", type=int, default=0, show_default=True)
def gradient_stability_command(checkpoint, output, plot_path, data_dir, n_batches, batch_size, radii, draws, beta,
                               device, seed):
    """||grad L(theta+delta) - grad L(theta)|| / ||delta|| for the PGD-AT, TRADES and clean losses.

    CHECKPOINT is a checkpoint file or a run directory (its last.pt). Adversarial examples are
    generated at theta and held fixed while the weights are perturbed; the model is in eval mode.
    """
    from .gradient_stability import gradient_stability_for_checkpoint
    from .plots import plot_gradient_stability

    for name, value in (("--n-batches", n_batches), ("--batch-size", batch_size), ("--draws", draws)):
        _positive(name, value)
    _check_seed(seed)
    result = gradient_stability_for_checkpoint(checkpoint, radii=radii, n_batches=n_batches, batch_size=batch_size,
                                               draws=draws, data_dir=data_dir, device=_device(device), seed=seed,
                                               beta=beta)
    for name, values in result["losses"].items():
        ratios = " ".join(f"{r:g}:{m:.4g}" for r, m in zip(result["radii"], values["ratio_mean"]))
        relative = " ".join(f"{m:.3g}" for m in values["relative_change_mean"])
        click.echo(f"{name:7s} loss {values['loss']:.4f} |grad| {values['grad_norm']:.4g}  ratio by |delta| {ratios}"
                   f"  (relative change {relative})")
    _write_json(output, result, plot_path, lambda path: plot_gradient_stability([result], path))


# --------------------------------------------------------------------------- measures
@click.command("measures")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--data-dir", default=None, help="[default: each checkpoint's]")
@click.option("--n-points", type=int, default=512, show_default=True, help="Training points for margins, sharpness, flatness, input gradients.")
@click.option("--gap-points", type=int, default=512, show_default=True, help="Train and test points for the measured generalization gap.")
@click.option("--margin-percentile", type=float, default=10.0, show_default=True)
@click.option("--sigma", type=float, default=0.01, show_default=True, help="PAC-Bayes sharpness: std of the Gaussian weight noise.")
@click.option("--draws", type=int, default=3, show_default=True, help="PAC-Bayes sharpness: noise draws.")
@click.option("--awp-gamma", type=float, default=5e-3, show_default=True, help="AWP flatness: relative layer-wise radius.")
@click.option("--awp-steps", type=int, default=3, show_default=True)
@click.option("--target", type=click.Choice(["robust_gap", "clean_gap"]), default="robust_gap", show_default=True,
              help="The measured gap the measures are ranked against.")
@click.option("--device", default=None, help="[default: cuda when available]")
@click.option("--seed", type=int, default=0, show_default=True)
def measures_command(checkpoints, output, data_dir, n_points, gap_points, margin_percentile, sigma, draws, awp_gamma,
                     awp_steps, target, device, seed):
    """Complexity measures of one or more checkpoints; with several, their Kendall tau with the robust gap.

    Each CHECKPOINT is a checkpoint file or a run directory (its last.pt).
    """
    from .common import resolve_checkpoint
    from .measures import MEASURES, compare_checkpoints, measure_checkpoint

    for name, value in (("--n-points", n_points), ("--gap-points", gap_points), ("--sigma", sigma),
                        ("--draws", draws), ("--awp-gamma", awp_gamma), ("--awp-steps", awp_steps)):
        _positive(name, value)
    _check_seed(seed)
    if not 0 <= margin_percentile <= 100:
        raise click.ClickException(f"--margin-percentile must be in [0, 100], got {margin_percentile}")
    device = _device(device)
    for path in checkpoints:  # fail before hours of work on a typo in the last path
        resolve_checkpoint(path)
    results = []
    for path in checkpoints:
        click.echo(f"measuring {path} ...", err=True)
        results.append(measure_checkpoint(path, n_points=n_points, gap_points=gap_points,
                                          margin_percentile=margin_percentile, sigma=sigma, draws=draws,
                                          awp_gamma=awp_gamma, awp_steps=awp_steps, data_dir=data_dir,
                                          device=device, seed=seed))
    out = {"checkpoints": results}
    header = f"{'measure':28s}" + "".join(f"{Path(r['checkpoint']).parent.name[:16]:>17s}" for r in results)
    click.echo(header)
    for measure in MEASURES:
        click.echo(f"{measure:28s}" + "".join(f"{_fmt(r['measures'].get(measure)):>17s}" for r in results))
    for key in ("train_robust_acc", "test_robust_acc", "robust_gap", "clean_gap"):
        click.echo(f"{key:28s}" + "".join(f"{r['gaps'][key]:>17.4f}" for r in results))
    if len(results) > 1:
        ranking = compare_checkpoints(results, target=target)
        out["ranking"] = ranking
        click.echo(f"Kendall tau with {target}:")
        for measure, info in ranking["measures"].items():
            click.echo(f"  {measure:28s} {_fmt(info['kendall_tau'])}")
    _write_json(output, out)


# --------------------------------------------------------------------------- memorization
@click.command("memorization")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--late-after", type=int, default=None,
              help="A sample is late when it is fitted (for good) after this epoch [default: each run's best epoch].")
@click.option("--max-listed", type=int, default=200, show_default=True, help="Late sample indices listed per run.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also write a PNG here.")
def memorization_command(run_dirs, output, late_after, max_listed, plot_path):
    """Which training samples' adversarial examples are fitted late, and robust overfitting.

    Each RUN_DIR must come from `at-mem train --track-samples`.
    """
    from .memorization import compare_runs, memorization_report
    from .plots import plot_memorization

    if max_listed < 0:
        raise click.ClickException(f"--max-listed must be >= 0, got {max_listed}")
    reports = [memorization_report(d, late_after=late_after, max_listed=max_listed) for d in run_dirs]
    for r in reports:
        line = (f"{r['run']}: best epoch {r['best_epoch']}/{r['epochs']} (test robust {r['best_test_robust_acc']:.4f}"
                f" -> final {r['final_test_robust_acc']:.4f}); {r['late']}/{r['samples']} samples fitted after epoch "
                f"{r['late_after']}, {r['never_fitted']} never fitted")
        if "noisy_labels" in r:
            noisy, clean = r["noisy_labels"]["noisy"], r["noisy_labels"]["clean"]
            line += (f"; fitted at end: noisy {noisy.get('fitted_at_end', 0)}/{noisy['count']}, "
                     f"clean {clean.get('fitted_at_end', 0)}/{clean['count']}")
        click.echo(line)
    out = {"reports": reports}
    if len(reports) > 1:
        out["comparison"] = compare_runs(reports)
    _write_json(output, out, plot_path, lambda path: plot_memorization(reports, path))


# --------------------------------------------------------------------------- plot
@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="The PNG to write.")
@click.option("--by-method", is_flag=True,
              help="Overlay the methods in one figure: runs that differ only in --seed are one line "
                   "(mean over seeds, band: min-max), grouped as `at-mem report` groups them.")
def plot_command(run_dirs, output, by_method):
    """Training curves of one or more runs side by side (accuracies, robust gap, grad norm, TE weight)."""
    from .common import read_metrics
    from .plots import plot_groups, plot_runs

    if not output.lower().endswith(".png"):
        raise click.ClickException(f"--output must be a .png file, got {output}")
    if by_method:
        from ..report import group_runs, read_runs

        groups = group_runs(read_runs(run_dirs))
        click.echo(f"wrote {plot_groups([(g.label, [r.records for r in g.runs]) for g in groups], output)}")
        return
    runs = [(Path(d).name, read_metrics(d)) for d in run_dirs]
    click.echo(f"wrote {plot_runs(runs, output, planned=[_planned_epochs(d) for d in run_dirs])}")


def _planned_epochs(run_dir) -> int | None:
    """The run's --epochs (None when its config.json is unreadable: the plot then says "final")."""
    from ..runfolder import RunFolder, RunFolderError

    try:
        epochs = RunFolder(run_dir).read_config()["config"].get("epochs")
    except RunFolderError:
        return None
    return epochs if isinstance(epochs, int) else None


COMMANDS = (gradient_stability_command, measures_command, memorization_command, plot_command)
for _command in COMMANDS:  # the CLI's one-line error handling, once
    _command.callback = one_line_errors(_command.callback)


def register(group: click.Group) -> None:
    """Add the analysis commands to ``group``."""
    for command in COMMANDS:
        group.add_command(command)
