"""The ``at-mem`` command line: parse, validate, call the library, print for people.

User mistakes (unknown names, bad values, missing data, foreign checkpoints) end with one line
``Error: ...`` and exit status 1 (2 for malformed options, as click does), never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

import click

from . import __version__
from ._compat import RobustBenchUnavailable
from .checkpoint import CheckpointError
from .data import DATASETS, INPUT_NOISE_KINDS, DataError
from .methods import MethodError, UnknownMethodError, discover
from .methods.registry import all_hyperparameters
from .models import UnknownModelError, model_names

USER_ERRORS = (DataError, CheckpointError, MethodError, UnknownMethodError, UnknownModelError,
               RobustBenchUnavailable, FileNotFoundError)


def _user_errors(func):
    """Turn the library's user-facing errors into ``Error: <one line>`` and exit status 1."""
    from .training import TrainingError

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (*USER_ERRORS, TrainingError) as error:
            raise click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)

    return wrapper


class FractionType(click.ParamType):
    """A float written as a decimal or a fraction: ``0.031``, ``8/255``."""

    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(Fraction(str(value).strip()))
        except (ValueError, ZeroDivisionError):
            self.fail(f"{value!r} is not a number or a fraction like 8/255", param, ctx)


class IntListType(click.ParamType):
    name = "epochs"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [int(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of epochs like 100,150", param, ctx)


FRACTION = FractionType()
PRESETS = {
    # The paper's random-label runs: no weight decay, no data augmentation.
    "random-labels": {"label_noise": 1.0, "weight_decay": 0.0, "augment": False},
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="at-mem")
def main():
    """Adversarial training that memorizes: PGD-AT, TRADES, temporal ensembling, evaluation."""


# --------------------------------------------------------------------------- methods
@main.command("methods")
def methods_command():
    """List the installed training methods and where each comes from."""
    for entry in discover().values():
        try:
            cls = entry.load()
            description = cls.description
            options = " ".join(h.flag for h in cls.hyperparameters)
        except Exception as error:  # a broken plugin is reported, not fatal
            description, options = f"(fails to load: {type(error).__name__}: {error})", ""
        click.echo(f"{entry.name:12s} {entry.distribution} ({entry.module})")
        click.echo(f"{'':12s} {description}" + (f"  [{options}]" if options else ""))


@main.command("models")
def models_command():
    """List our registered backbones (any timm model name also works)."""
    for name in model_names():
        click.echo(name)


# --------------------------------------------------------------------------- train
def _method_options(func):
    """One CLI option per hyperparameter declared by any installed method (plugins included)."""
    for name, (hp, owners) in sorted(all_hyperparameters().items(), reverse=True):
        default = "derived" if hp.default is None else hp.default
        func = click.option(hp.flag, hp.name, type=hp.type, default=None,
                            help=f"{hp.help} [{', '.join(owners)}; default: {default}]")(func)
    return func


class _ProgressCallbacks:
    def __init__(self, quiet: bool):
        # Under torchrun only rank 0 talks; the others would repeat every line.
        self.silent = os.environ.get("RANK", "0") != "0"
        self.quiet = quiet or self.silent
        self.bar = None

    def log(self, message: str) -> None:
        if not self.silent:
            click.echo(message, err=True)

    def epoch_begin(self, epoch: int, batches: int) -> None:
        if not self.quiet:
            self.bar = click.progressbar(length=batches, label=f"epoch {epoch}", file=sys.stderr)
            self.bar.__enter__()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch_end(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
        if self.silent:
            return
        extra = "".join(f" {k}={record[k]:.4g}" for k in ("te_weight", "grad_norm") if k in record)
        click.echo(f"epoch {record['epoch']}: loss {record['train_loss']:.4f} "
                   f"test clean {record['test_clean_acc']:.4f} robust {record['test_robust_acc']:.4f} "
                   f"({record['train_seconds']:.1f}s){extra}")


@main.command("train")
@click.option("--method", default="pgd-at", show_default=True, help="Training method (see `at-mem methods`).")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="cifar10", show_default=True)
@click.option("--data-dir", default="./data", show_default=True, help="Where the data is, or is downloaded to.")
@click.option("--model", default="preactresnet18", show_default=True, help="A backbone (see `at-mem models`) or any timm model.")
@click.option("--epochs", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Global batch size (split over processes).")
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=None, help="[default: 5e-4; 0 with --preset random-labels]")
@click.option("--schedule", type=click.Choice(["step", "cosine"]), default="step", show_default=True)
@click.option("--milestones", type=IntListType(), default=None, help="Epochs after which the step schedule multiplies the lr by 0.1 [default: 50% and 75% of --epochs, i.e. 100,150 of 200: epochs 101 and 151 start at the lower lr].")
@click.option("--eps", type=FRACTION, default="8/255", show_default=True, help="Perturbation budget, e.g. 8/255.")
@click.option("--step-size", type=FRACTION, default="2/255", show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="Attack steps during training.")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default="Linf", show_default=True)
@click.option("--augment/--no-augment", default=None, help="Standard augmentation (CIFAR: crop+flip; none for SVHN/MNIST) [default: on; off with --preset random-labels].")
@click.option("--label-noise", type=float, default=None, help="Symmetric label noise rate R in [0,1]; 1 = random labels.")
@click.option("--input-noise", type=click.Choice(INPUT_NOISE_KINDS), default=None, help="Randomize the training images.")
@click.option("--input-noise-fraction", type=float, default=1.0, show_default=True)
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="random-labels: label noise 1, weight decay 0, no augmentation (the paper's setting).")
@click.option("--train-size", type=int, default=None, help="Use the first N training points.")
@click.option("--test-size", type=int, default=None, help="Use the first N test points.")
@click.option("--eval-steps", type=int, default=20, show_default=True, help="PGD steps for the per-epoch test robust accuracy.")
@click.option("--eval-train-size", type=int, default=0, show_default=True, help="Also report clean/PGD accuracy on the first N training points (on their training labels) each epoch.")
@click.option("--track-samples", is_flag=True, help="Record each training sample's adversarial correctness and loss per epoch (tracking.pt).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available].")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for attack and update (fp32 weights).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--compile", "compile", is_flag=True, help="torch.compile the model for attack and update (slow first steps).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", default=None, help="Run directory [default: runs/<method>-<dataset>-<model>-s<seed>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_method_options
@_user_errors
def train_command(method, preset, out_dir, resume, device, quiet, **options):
    """Adversarially train a model (PGD-AT, TRADES, TE, ... see `at-mem methods`)."""
    from .methods import get_method
    from .training import RunConfig, Trainer, TrainingError

    method_cls = get_method(method)
    accepted = {h.name for h in method_cls.hyperparameters}
    method_args = {}
    for name, (hp, owners) in all_hyperparameters().items():
        value = options.pop(name, None)
        if value is None:
            continue
        if name not in accepted:
            raise TrainingError(f"{hp.flag} does not apply to method {method} (it is for {', '.join(owners)})")
        method_args[name] = value
    for key, value in PRESETS.get(preset, {}).items():
        if options.get(key) is None:
            options[key] = value
    if options["weight_decay"] is None:
        options["weight_decay"] = 5e-4
    if options["augment"] is None:
        options["augment"] = True
    if options["label_noise"] is None:
        options["label_noise"] = 0.0
    if options["milestones"] is None:
        # Distinct epochs: a repeated milestone would multiply the lr by 0.1 twice at once.
        options["milestones"] = sorted({max(1, round(f * options["epochs"])) for f in (0.5, 0.75)})
    config = RunConfig(method=method, method_args=method_args, **options)
    out_dir = Path(out_dir or f"runs/{method}-{config.dataset}-{config.model}-s{config.seed}")
    trainer = Trainer(config, out_dir, device=device, resume=resume, callbacks=_ProgressCallbacks(quiet))
    if trainer.start_epoch > config.epochs:
        click.echo(f"{out_dir} already finished all {config.epochs} epochs")
        return
    say = click.echo if trainer.ctx.is_main else (lambda *a, **k: None)
    say(f"training {method} on {config.dataset} ({len(trainer.data.train)} train / "
               f"{len(trainer.data.test)} test) with {config.model} on {trainer.ctx.device}; writing {out_dir}", err=True)
    trainer.fit()
    best = trainer.best
    say(f"done: best epoch {best['epoch']} (test robust {best['test_robust_acc']:.4f}, "
               f"clean {best['test_clean_acc']:.4f}); checkpoints in {out_dir}")


# --------------------------------------------------------------------------- evaluate
@main.command("evaluate")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--attack", "attacks", multiple=True, type=click.Choice(["clean", "pgd20", "cw", "autoattack", "all"]),
              default=("all",), show_default=True, help="Repeat for several.")
@click.option("--n-examples", type=int, default=10000, show_default=True, help="The first N test points (RobustBench: 10000).")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=None, help="[default: the checkpoint's]")
@click.option("--data-dir", default=None, help="[default: the checkpoint's]")
@click.option("--eps", type=FRACTION, default=None, help="[default: the checkpoint's training eps]")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default=None, help="[default: the checkpoint's]")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None, help="[default: cuda when available]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
@click.option("--model-card", type=click.Path(dir_okay=False), default=None,
              help="Also write a RobustBench model_info JSON here (needs autoattack).")
@_user_errors
def evaluate_command(checkpoint, attacks, n_examples, dataset, data_dir, eps, norm, batch_size, device, seed,
                     output, model_card):
    """Evaluate a checkpoint: clean, PGD-20, CW and AutoAttack (RobustBench's protocol)."""
    import torch

    from .checkpoint import build_model_from_checkpoint, load_checkpoint
    from .data import load_split
    from .evaluation import ALL_ATTACKS, evaluate, write_model_card

    state = load_checkpoint(checkpoint)
    config = state.get("config", {})
    dataset = dataset or state["dataset"]
    data_dir = data_dir or config.get("data_dir", "./data")
    eps = config.get("eps", 8 / 255) if eps is None else eps
    norm = norm or config.get("norm", "Linf")
    if eps < 0:
        raise click.ClickException(f"eps must be >= 0, got {eps}")
    if n_examples <= 0:
        raise click.ClickException(f"--n-examples must be positive, got {n_examples}")
    if batch_size <= 0:
        raise click.ClickException(f"--batch-size must be positive, got {batch_size}")
    chosen = ALL_ATTACKS if "all" in attacks else tuple(a for a in ALL_ATTACKS if a in attacks)
    if model_card and "autoattack" not in chosen:
        raise click.ClickException("--model-card needs --attack autoattack (or all)")
    from .training import resolve_device

    device = str(resolve_device(device))
    model = build_model_from_checkpoint(state)
    test = load_split(dataset, data_dir, train=False, size=n_examples)
    if test.num_classes != state["num_classes"]:
        raise click.ClickException(f"{dataset} has {test.num_classes} classes but the checkpoint's model has {state['num_classes']}")
    expected_shape = (state.get("in_chans", test.shape[0]), state.get("img_size", test.shape[1]))
    if (test.shape[0], test.shape[1]) != expected_shape:
        raise click.ClickException(f"{dataset} images are {test.shape[0]}x{test.shape[1]}x{test.shape[2]} but the "
                                   f"checkpoint's model was trained on {expected_shape[0]}-channel "
                                   f"{expected_shape[1]}x{expected_shape[1]} images")

    def progress(name):
        click.echo(f"{name} on {len(test)} points ...", err=True)
        return None

    results = evaluate(model, test.images, test.labels, attacks=chosen, eps=eps, norm=norm, device=device,
                       batch_size=batch_size, seed=seed, dataset=dataset, data_dir=data_dir, progress=progress)
    record = {"checkpoint": str(checkpoint), "epoch": state.get("epoch"), "dataset": dataset, "model": state["model_name"],
              "method": state.get("method", {}).get("name"), "n_examples": len(test), "eps": eps, "norm": norm,
              "seed": seed, "device": str(device), **results}
    for key, value in results.items():
        if key.endswith("_acc"):
            click.echo(f"{key}: {value:.4f}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(record, indent=2) + "\n")
        click.echo(f"wrote {output}")
    if model_card:
        write_model_card(model_card, dataset=dataset, eps=eps, clean_acc=results["clean_acc"],
                         autoattack_acc=results["autoattack_acc"],
                         extra={"name": Path(checkpoint).stem, "method": record["method"], "n_examples": len(test)})
        click.echo(f"wrote {model_card}")


from .analysis.commands import register as _register_analysis  # noqa: E402  (needs `main` above)

_register_analysis(main)

if __name__ == "__main__":  # pragma: no cover
    main()
