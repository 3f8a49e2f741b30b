"""The ``at-mem`` command line: parse, validate, call the library, print for people.

User mistakes (unknown names, bad values, missing data, foreign checkpoints) end with one line
``Error: ...`` and exit status 1 (2 for malformed options, as click does), never a traceback.

Starting is fast: this module imports no torch, timm or torchattacks (nor does the package
``__init__`` when launched as ``at-mem``), so ``at-mem --help``, ``methods``, ``models`` and a
mistyped option answer at once. Each command imports what it needs when it runs; the analysis
commands are imported only when one of them is called (``LAZY_COMMANDS``); ``at-mem train``'s
options for the methods' settings come from the method catalog (method_catalog.py, cached), not
from the method classes. tests/test_cli_startup.py checks that torch stays out of these paths.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
from pathlib import Path

import click

from . import _quiet  # noqa: F401  (first: keeps third-party deprecation warnings out of CLI output)
from . import __version__
from .records import ATTACK_NAMES, CHECKPOINT_NAMES
from .loggers import LOGGERS
from .settings import RUN_SETTINGS, SETTINGS_BY_NAME, RunConfig, Setting, SettingError, parse_overrides, read_settings
from .user_errors import one_line_errors as _user_errors

_ANALYSIS = "at_memorization.analysis.commands"
# Commands imported only when called: name -> ("module:attribute", the first paragraph of its help,
# which `at-mem --help` shortens as click does; tests/test_cli_startup.py checks both).
LAZY_COMMANDS = {
    "gradient-stability": (f"{_ANALYSIS}:gradient_stability_command",
                           "||grad L(theta+delta) - grad L(theta)|| / ||delta|| for the PGD-AT, TRADES and clean "
                           "losses."),
    "measures": (f"{_ANALYSIS}:measures_command",
                 "Complexity measures of one or more checkpoints; with several, their Kendall tau with the robust "
                 "gap."),
    "memorization": (f"{_ANALYSIS}:memorization_command",
                     "Which training samples' adversarial examples are fitted late, and robust overfitting."),
    "plot": (f"{_ANALYSIS}:plot_command",
             "Training curves of one or more runs side by side (accuracies, robust gap, grad norm, TE weight)."),
}


class LazyGroup(click.Group):
    """A group that knows some commands by name, import path and help only (``lazy``), and imports
    such a command when it is called or its own help is asked for, not to list it in the group's help."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:
            module, _, attribute = self.lazy[name][0].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        commands = [(name, self.commands.get(name) or click.Command(name, help=self.lazy[name][1]))
                    for name in self.list_commands(ctx)]
        commands = [(name, command) for name, command in commands if not command.hidden]
        if commands:
            limit = formatter.width - 6 - max(len(name) for name, _ in commands)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in commands])


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="at-mem")
def main():
    """Adversarial training that memorizes: PGD-AT, TRADES, temporal ensembling, evaluation."""


def resolved_method_settings(config) -> dict:
    """The method's resolved settings of a config (--print-config; imports training, and torch)."""
    from .training import resolved_method_settings as resolve

    return resolve(config)


def with_threads(config):
    """A new run's settings with its thread count (--print-config; imports training, and torch)."""
    from .training import with_threads as fill

    return fill(config)


def _one_failure_for_all(command):
    """A multi-process run (torchrun, srun) ends as one: the process that fails tells the others
    (``runtime.report_failure``; they stop within a second with its message), and a process whose
    collective broke because another one failed prints that one's line instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        launched = os.environ.get("WORLD_SIZE") or (os.environ.get("SLURM_NTASKS", "1") if "SLURM_STEP_ID" in
                                                     os.environ else "1")  # torchrun's, or srun's tasks
        if int(launched or "1") <= 1:  # one process: nothing to tell (and no torch import for a quick refusal)
            return command(*args, **kwargs)
        from .runtime import peer_failure, report_failure

        try:
            return command(*args, **kwargs)
        except click.ClickException as error:  # one line already: a user's mistake, a refusal
            report_failure(error.format_message())
            raise
        except Exception as error:
            # a collective broken by another process's end (gloo: "Connection closed by peer"): its
            # message, which may still be on its way, says what happened
            failure = peer_failure(wait_s=2.0) if isinstance(error, RuntimeError) else None
            if failure is not None:
                raise click.ClickException(f"{failure}; this process stops too") from None
            report_failure(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            raise

    return wrapper


# --------------------------------------------------------------------------- methods, models
@main.command("methods")
def methods_command():
    """List the installed training methods, where each comes from, and each one's settings with
    their defaults for the paper's 200 epochs (some, such as TE's schedule, scale with --epochs)."""
    from .method_catalog import method_catalog

    for method in method_catalog():
        description = f"(fails to load: {method.error})" if method.error else method.description
        click.echo(f"{method.name:12s} {method.distribution} ({method.module})")
        click.echo(f"{'':12s} {description}" + (f"  [{method.options}]" if method.options else ""))


@main.command("models")
def models_command():
    """List our backbones, their parameter counts and descriptions (any timm model name also works)."""
    from .model_catalog import COUNTED_FOR_TEXT, MODELS

    width = max(len(name) for name in MODELS)
    click.echo(f"{'model':{width}s}  {'parameters':>10s}  description")
    for name in sorted(MODELS):
        click.echo(f"{name:{width}s}  {MODELS[name].parameters:>10,d}  {MODELS[name].description}")
    click.echo(f"(parameters for {COUNTED_FOR_TEXT}; any other timm model name works too, e.g. --model resnet50)")


# --------------------------------------------------------------------------- train
class SettingType(click.ParamType):
    """A declared setting's type on the command line (bounds are checked with the other settings,
    so that a value from a file and from a flag get the same message)."""

    def __init__(self, setting: Setting):
        self.setting = setting
        self.name = {int: "integer", float: "number", list: "epochs", str: "text", bool: "boolean"}[setting.type]

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self.setting.parse_text(value, check_bounds=False)
        except SettingError as error:
            self.fail(str(error), param, ctx)


def _setting_option(setting: Setting, owners: list[str] | None = None) -> click.Option:
    """The ``at-mem train`` option of one declared setting (its default shown, never restated)."""
    where = f"{', '.join(owners)}; " if owners else ""
    help_text = f"{setting.help} [{where}default: {setting.default_text()}]"
    if setting.type is bool:
        flags = f"{setting.flag}/--no-{setting.flag[2:]}" if setting.switch else setting.flag
        return click.Option([flags, setting.name], is_flag=True, default=None, help=help_text)
    kind = click.Choice(setting.choices) if setting.choices else SettingType(setting)
    return click.Option([setting.flag, setting.name], type=kind, default=None, help=help_text)


def _setting_options() -> list[click.Option]:
    """One option per run setting (RUN_SETTINGS), then one per installed method's setting (plugins
    included, from the method catalog: no method class is imported)."""
    from .method_catalog import hyperparameter_owners

    return ([_setting_option(setting) for setting in RUN_SETTINGS]
            + [_setting_option(hp, owners) for _, (hp, owners) in sorted(hyperparameter_owners().items())])


class SettingsCommand(click.Command):
    """A command whose first options are ``_setting_options()``, made when first needed (to parse its
    arguments or show its help), so that ``at-mem --help`` reads no method catalog."""

    def __init__(self, *args, **kwargs):
        self._settings_added = True
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:
        if not self._settings_added:
            self._params[:0] = _setting_options()
            self._settings_added = True
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params, self._settings_added = value, False


class _ProgressCallbacks:
    """Training progress: steps done, rate and ETA (in place on a terminal, a line every 30 s in a
    log file), then one line per epoch."""

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
            from .progress import Progress

            self.bar = Progress(f"epoch {epoch}", batches, unit="steps")

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def epoch_end(self, record: dict) -> None:
        self.close_bar()
        if self.silent:
            return
        from .method_catalog import logged_values  # what the methods declare they log, without naming it here

        shown = {value.key for value in logged_values()} | {"grad_norm"}
        extra = "".join(f" {k}={v:.4g}" for k, v in record.items() if k in shown)  # in the order logged
        tested = (f"test clean {record['test_clean_acc']:.4f} robust {record['test_robust_acc']:.4f}"
                  if "test_robust_acc" in record else "not evaluated (--eval-every)")
        click.echo(f"epoch {record['epoch']}: loss {record['train_loss']:.4f} {tested} "
                   f"({record['train_seconds']:.1f}s){extra}")


@main.command("train", cls=SettingsCommand)  # the run's and the methods' settings first (SettingsCommand)
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda when available].")
@click.option("--out", "out_dir", default=None, help="Run directory [default: runs/<method>-<dataset>-<model>-s<seed>].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Settings from a TOML file (see configs/) or a run's config.json; flags given on the command "
                   "line win over the file.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved settings (defaults and derivations filled in) as JSON and exit.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped, with its saved "
              "settings (settings given again must equal them).")
@click.option("--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="With --resume: change a setting deliberately, e.g. lr=0.01 or epochs=300 (repeatable; recorded "
                   "in RUN/history.jsonl; derived settings such as milestones keep their saved values unless "
                   "overridden too).")
@click.option("--allow-data-change", is_flag=True,
              help="With --resume: continue although the training data differ from the run's (recorded).")
@click.option("--checkpoint-every-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also write last.pt every N steps within an epoch (0: at the end of each epoch only).")
@click.option("--logger", "loggers", multiple=True, type=click.Choice(list(LOGGERS)),
              help="Also log to TensorBoard (RUN/tensorboard/) or Weights & Biases (repeatable; pip install "
                   "\".[tensorboard]\" or \".[wandb]\"); metrics.jsonl stays the record, a logger failure is a warning.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_one_failure_for_all
@_user_errors
def train_command(out_dir, config_file, print_config, resume, overrides, allow_data_change,
                  checkpoint_every_steps, device, quiet, loggers, **options):
    """Adversarially train a model (PGD-AT, TRADES, TE, ... see `at-mem methods`).

    SIGTERM or Ctrl-C stops at the next step with a checkpoint; the same command with --resume
    continues exactly (exit status 128 + the signal's number).
    """
    from .method_catalog import hyperparameter_owners  # the declarations, without importing the classes

    owners = hyperparameter_owners()
    hyperparameters = {name: hp for name, (hp, _) in owners.items()}
    given, given_method = {}, {}
    if config_file:
        values = _settings_from_file(config_file, hyperparameters)
        file_out, file_device = values.pop("out", None), values.pop("device", None)
        out_dir, device = out_dir or file_out, device or file_device  # the command line wins
        given, given_method = read_settings(values, hyperparameters, f"--config {config_file}")
    ctx = click.get_current_context()
    for name, value in options.items():  # the command line wins over the file
        if value is not None and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            (given_method if name in hyperparameters and name not in SETTINGS_BY_NAME else given)[name] = value
    if out_dir is not None and not print_config:
        from .runfolder import RunFolder

        RunFolder(out_dir).check_free()  # a folder another process writes: say so before importing torch
    from .methods import get_method
    from .training import Trainer, TrainingError, TrainingInterrupted, open_resumable, settings_to_resume

    resumable, override_values = None, {}
    if resume:
        if out_dir is None:
            raise click.ClickException("--resume needs --out RUN (the run folder to continue)")
        resumable = open_resumable(out_dir)  # the one read of the checkpoint; the trainer restores from it
        if overrides:  # read with the saved method's settings
            method_cls = get_method(resumable.method_name)
            override_values = parse_overrides(overrides, {h.name: h for h in method_cls.hyperparameters})
        config, _ = settings_to_resume(resumable, override_values, given=given, given_method=given_method)
    else:
        if overrides:
            raise TrainingError("--override applies to --resume only; for a new run give the setting as its own option")
        method_cls = get_method(given.get("method", SETTINGS_BY_NAME["method"].default))
        accepted = {h.name for h in method_cls.hyperparameters}
        for name in given_method:
            if name not in accepted:
                owner_names = owners[name][1]
                raise TrainingError(f"--{name.replace('_', '-')} does not apply to method {method_cls.name} "
                                    f"(it is for {', '.join(owner_names)})")
        config = RunConfig(**given, method_args=given_method)
        config.validate()
    if print_config:
        resolved = with_threads(config.resolve())  # as the run would record them
        method_settings = resolved_method_settings(resolved)
        click.echo(json.dumps({"config": {**resolved.to_dict(), "method_args": method_settings},
                               "method": method_settings,
                               "derived": config.derived_names() + ([] if config.threads else ["threads"])},
                              indent=2))
        return
    resolved = config.resolve()
    out_dir = Path(out_dir or f"runs/{resolved.method}-{resolved.dataset}-{resolved.model}-s{resolved.seed}")
    callbacks = _ProgressCallbacks(quiet)
    with _stop_on_signals() as stop:
        try:
            trainer = Trainer(config, out_dir, device=device, resume=resume, callbacks=callbacks,
                              overrides=override_values, allow_data_change=allow_data_change,
                              checkpoint_every_steps=checkpoint_every_steps, loggers=loggers, resumable=resumable)
        except StoppedBeforeStart as stopped:
            raise TrainingInterruptedBeforeStart(stopped.name, stopped.signum) from None
        if trainer.start_epoch > resolved.epochs:
            repaired = trainer.repair_finished_metrics()
            trainer.shutdown()
            if repaired:
                click.echo(f"{out_dir} already finished all {resolved.epochs} epochs; nothing was trained; its "
                           "metrics.jsonl lacked epochs its checkpoint holds and was rewritten from the checkpoint")
                return
            click.echo(f"{out_dir} already finished all {resolved.epochs} epochs; nothing was trained or recorded "
                       f"(to train longer: --resume --override epochs=N)")
            return
        stop.trainer = trainer
        say = click.echo if trainer.ctx.is_main else (lambda *a, **k: None)
        say(f"training {resolved.method} on {resolved.dataset} ({len(trainer.data.train)} train / "
            f"{len(trainer.data.test)} test) with {resolved.model} on {trainer.ctx.device}; writing {out_dir}", err=True)
        try:
            try:
                trainer.fit()
            finally:
                stop.finish()  # from here on a late Ctrl-C must not abort the reporting below
            trainer.shutdown()
        except TrainingInterrupted as stopped:
            callbacks.close_bar()
            resume_hint = (f"continue with: at-mem train --resume --out {out_dir}" if stopped.saved else
                           "nothing was trained yet: start again with the same command")
            where = f"; saved {trainer.folder.last}" if stopped.step else ""
            say(f"{stopped}{where}; {resume_hint}", err=True)
            trainer.shutdown()  # every process stopped at the same step
            sys.exit(128 + stop.signum if stop.signum else 1)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once; the files on disk are complete
            callbacks.close_bar()
            trainer.shutdown()
            good = trainer.folder.last_good
            say("interrupted at once by a second SIGINT; " + (
                f"{good[0]} holds the last complete checkpoint ({good[1]}); continue with: at-mem train --resume "
                f"--out {out_dir}" if good else "no checkpoint was written: start again with the same command"),
                err=True)
            sys.exit(130)
    best = trainer.best
    if stop.signum:  # a stop requested while the last epoch was evaluated or saved: the run is complete
        say(f"{signal_name(stop.signum)} arrived after the last training step: the run finished all "
            f"{resolved.epochs} epochs and is saved in {out_dir}", err=True)
        sys.exit(128 + stop.signum)
    say(f"done: best epoch {best['epoch']} (test robust {best['test_robust_acc']:.4f}, "
        f"clean {best['test_clean_acc']:.4f}); checkpoints in {out_dir}")


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


class _SignalStop:
    """SIGTERM/SIGINT ask the trainer to stop at the next step (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.trainer = None
        self.signum = None
        self.done = False

    def __call__(self, signum, frame):
        import signal

        self.signum = signum
        name = signal.Signals(signum).name
        if self.trainer is None:  # still loading: nothing to save
            raise StoppedBeforeStart(name, signum)
        if self.done:  # already stopping and reporting: nothing more to do
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        click.echo(f"\n{name}: stopping after the current step and saving a checkpoint ...", err=True)
        self.trainer.request_stop(name)

    def finish(self) -> None:
        """Training is over: further signals are noted, not acted on (the run's files are complete)."""
        import signal

        self.done = True
        if self.signum is not None:
            signal.signal(signal.SIGINT, self)


class StoppedBeforeStart(BaseException):
    """A signal while the run was still starting (data loading, a download): a BaseException, as
    KeyboardInterrupt, so that no loader's ``except Exception`` turns the stop into a load error."""

    def __init__(self, name, signum):
        super().__init__(name)
        self.name, self.signum = name, signum


class TrainingInterruptedBeforeStart(click.ClickException):
    def __init__(self, name, signum):
        super().__init__(f"stopped by {name} before training started; nothing was saved")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _stop_on_signals():
    import signal

    handler = _SignalStop()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield handler
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _settings_from_file(path, hyperparameters: dict) -> dict:
    """The table of a TOML settings file or a run's config.json (its "config" object), raw: the
    values are checked by ``read_settings`` against their declarations. ``out`` and ``device`` may
    be given too (they are not run settings)."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise click.ClickException(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:  # tomllib.TOMLDecodeError is a ValueError
        raise click.ClickException(f"--config {path}: not a readable TOML/JSON settings file "
                                   f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if path.suffix == ".json" and isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        raw = dict(raw["config"])  # a run folder's config.json
    if not isinstance(raw, dict):
        raise click.ClickException(f"--config {path}: expected a table of settings")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in ("out", "out_dir", "device"):
            if not (value is None or isinstance(value, str)):
                raise click.ClickException(f"--config {path}: {key} must be text, got {value!r}")
            values["out" if name != "device" else "device"] = value
        else:
            values[key] = value
    return values


# --------------------------------------------------------------------------- evaluate
def _checkpoint_names(value: str | None) -> tuple[str, ...]:
    if value is None:
        return CHECKPOINT_NAMES
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CHECKPOINT_NAMES]
    if unknown or not names:
        raise click.ClickException(f"--checkpoints {value!r}: unknown name {unknown[0]!r}; use best, last or best,last"
                                   if unknown else "--checkpoints: give best, last or best,last")
    return tuple(n for n in CHECKPOINT_NAMES if n in names)


def _echo_accuracies(record: dict, indent: str = "") -> None:
    for key, value in record.items():
        if key.endswith("_acc"):
            click.echo(f"{indent}{key}: {value:.4f}")


@main.command("evaluate")
@click.argument("checkpoint", type=click.Path())
@click.option("--attack", "attacks", multiple=True, type=click.Choice([*ATTACK_NAMES, "all"]),
              default=("all",), show_default=True, help="Repeat for several.")
@click.option("--n-examples", type=int, default=10000, show_default=True, help="The first N test points (RobustBench: 10000).")
@click.option("--checkpoints", "checkpoint_names", default=None, metavar="best,last",
              help="With a run folder: which of its checkpoints [default: best,last].")
@click.option("--dataset", type=click.Choice(SETTINGS_BY_NAME["dataset"].choices), default=None,
              help="[default: the checkpoint's]")
@click.option("--data-dir", default=None, help="[default: the checkpoint's]")
@click.option("--eps", type=SettingType(SETTINGS_BY_NAME["eps"]), default=None, help="[default: the checkpoint's training eps]")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default=None, help="[default: the checkpoint's]")
@click.option("--batch-size", type=int, default=None, help="[default: 1024 on CUDA, 256 on CPU]")
@click.option("--device", default=None, help="[default: cuda when available]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write the results as JSON here (a checkpoint file only).")
@click.option("--model-card", type=click.Path(dir_okay=False), default=None,
              help="Also write a RobustBench model_info JSON here (needs autoattack; a checkpoint file only).")
@_user_errors
def evaluate_command(checkpoint, attacks, n_examples, checkpoint_names, dataset, data_dir, eps, norm, batch_size,
                     device, seed, output, model_card):
    """Evaluate a checkpoint: clean, PGD-20, CW and AutoAttack (RobustBench's protocol).

    CHECKPOINT is a checkpoint file, or a run folder (`at-mem train --out`): then its best.pt and
    last.pt are evaluated into RUN/eval/best.json and RUN/eval/last.json, merged with the results of
    earlier calls for the same checkpoint (each accuracy keeps its n_examples in n_examples_by_attack).
    """
    from .atomic import check_writable_folder, write_text_atomic
    from .checkpoint import load_checkpoint
    from .evaluation import ALL_ATTACKS, default_batch_size, write_model_card
    from .run_evaluation import EvaluationOptions, evaluate_checkpoint, evaluate_run
    from .runfolder import RunFolder
    from .runtime import resolve_device

    run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else None
    if run_dir is not None:
        for flag, value in (("--output", output), ("--model-card", model_card)):
            if value:
                raise click.ClickException(f"{flag} does not apply to a run folder: the results go to "
                                           f"{RunFolder(run_dir).eval_path('best')} and "
                                           f"{RunFolder(run_dir).eval_path('last').name}")
        names = _checkpoint_names(checkpoint_names)
    elif checkpoint_names is not None:
        raise click.ClickException(f"--checkpoints applies to a run folder only; {checkpoint} is not a folder")
    if eps is not None and eps < 0:
        raise click.ClickException(f"eps must be >= 0, got {eps}")
    SETTINGS_BY_NAME["seed"].check(seed)  # the run setting's bounds: a one-line SettingError
    if n_examples <= 0:
        raise click.ClickException(f"--n-examples must be positive, got {n_examples}")
    if batch_size is not None and batch_size <= 0:
        raise click.ClickException(f"--batch-size must be positive, got {batch_size}")
    for flag, target in (("--output", output), ("--model-card", model_card)):
        if target:  # before minutes of attacks, not after them
            if Path(target).is_dir():
                raise click.ClickException(f"{flag} {target} is a folder; give a file name")
            check_writable_folder(Path(target).parent, flag)
    chosen = ALL_ATTACKS if "all" in attacks else tuple(a for a in ALL_ATTACKS if a in attacks)
    if model_card and "autoattack" not in chosen:
        raise click.ClickException("--model-card needs --attack autoattack (or all)")
    state = load_checkpoint(checkpoint) if run_dir is None else None
    device = str(resolve_device(device))
    options = EvaluationOptions(chosen, n_examples, dataset, data_dir, eps, norm,
                                batch_size or default_batch_size(device), device, seed,
                                log=lambda message: click.echo(message, err=True), show_progress=True)
    if run_dir is not None:
        for name, record in evaluate_run(run_dir, options, names).items():
            click.echo(f"{name} (epoch {record['epoch']}):")
            _echo_accuracies(record, "  ")
            click.echo(f"wrote {RunFolder(run_dir).eval_path(name)}")
        return

    record = evaluate_checkpoint(state, checkpoint, options)
    _echo_accuracies(record)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(record, indent=2) + "\n", output)
        click.echo(f"wrote {output}")
    if model_card:
        write_model_card(model_card, dataset=record["dataset"], eps=record["eps"], clean_acc=record["clean_acc"],
                         autoattack_acc=record["autoattack_acc"],
                         extra={"name": Path(checkpoint).stem, "method": record["method"],
                                "n_examples": record["n_examples"]})
        click.echo(f"wrote {model_card}")


# --------------------------------------------------------------------------- report
@main.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv", "json"]), default="markdown", show_default=True)
@click.option("--paired", multiple=True, metavar="BASE:OTHER",
              help="Also OTHER minus BASE per seed, e.g. pgd-at:pgd-at-te (group labels; repeatable).")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write the table here [default: stdout].")
@_user_errors
def report_command(runs, fmt, paired, output):
    """A table from run folders: runs differing only in --seed are one row (mean ± std).

    Reads RUN/config.json, RUN/metrics.jsonl and, when present, RUN/eval/best.json and
    RUN/eval/last.json (from `at-mem evaluate RUN`).
    """
    from .atomic import write_text_atomic
    from .report import report

    text, warnings = report(runs, fmt=fmt, paired=paired)
    for warning in warnings:
        if output or fmt != "markdown":  # the markdown on stdout already carries them
            click.echo(f"warning: {warning}", err=True)
    if not output:
        click.echo(text, nl=False)
        return
    write_text_atomic(text, output)
    click.echo(f"wrote {output}")


# --------------------------------------------------------------------------- reproduce
@main.command("reproduce")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The study's folder: runs/, logs/, report.md, README.md (a rerun continues it).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tasks (runs or evaluations) at once; the CPU threads are split between them.")
@click.option("--device", "devices", default=None, metavar="DEV[,DEV...]",
              help="cpu, cuda, cuda:N, or a list: task slot i uses the i-th (mod the list) [default: the plan's, "
                   "else cuda when available].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per task [default: the CPUs divided by --jobs].")
@click.option("--data-dir", default=None, help="Where the data is, for every run [default: the plan's].")
@click.option("--only", "only", multiple=True, metavar="PATTERN",
              help="Only the runs whose name (ARM-sSEED) matches, e.g. '*-s0' (repeatable); the report covers every "
                   "finished run.")
@click.option("--dry-run", is_flag=True, help="List the tasks and what is done; run nothing.")
@click.option("--prepare", is_flag=True,
              help="Write OUT/plan.toml and OUT/settings/NAME.json for every run, run nothing (to train runs by "
                   "hand, e.g. under torchrun; a later call evaluates and reports them).")
@_user_errors
def reproduce_command(plan, out_dir, jobs, devices, threads, data_dir, only, dry_run, prepare):
    """Train, evaluate and report a whole study from a plan (configs/plans/*.toml).

    Every (arm, seed) run goes to OUT/runs/ARM-sSEED; each run's best and final checkpoints are
    evaluated as the plan says; OUT/report.md (+ .json), the curves and OUT/README.md follow. The
    same command again does only what is missing and resumes unfinished runs exactly. Ctrl-C or
    SIGTERM stops every run at its next step with a checkpoint. Exit status 1 when a task failed
    (the others still run), 128 + the signal's number when stopped.
    """
    from .reproduce import Options, reproduce

    device_list = tuple(d.strip() for d in devices.split(",") if d.strip()) if devices else ()
    if devices is not None and not device_list:
        raise click.ClickException("--device: give cpu, cuda, cuda:N or a comma-separated list")
    options = Options(out=Path(out_dir), jobs=jobs, devices=device_list, threads=threads, data_dir=data_dir,
                      only=tuple(only), dry_run=dry_run, prepare=prepare, echo=lambda line: click.echo(line, err=True))
    sys.exit(reproduce(plan, options))


if __name__ == "__main__":  # pragma: no cover
    main()
