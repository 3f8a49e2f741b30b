"""Whether a run starts new or resumes, and with what: decided once, before any data is loaded.

A resume reads its checkpoint once (:func:`open_resumable`): the command line reads the saved
method from it, :func:`settings_to_resume` derives the settings to continue with, and the trainer
restores from the same loaded state. The saved-vs-given rule is the declaration's
(``settings.resume_settings``), applied here and nowhere else in training. What happened (a
fallback, overrides, a data change, a repaired config.json, the resume itself) becomes history
events, which the trainer writes once training starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch

from ..atomic import WriteError, check_writable_folder
from ..methods import TrainingSetup, get_method
from ..models import UnknownModelError, model_names
from ..runfolder import RunFolder, RunFolderError
from ..runtime import TrainingError
from ..settings import SETTINGS_BY_NAME, RunConfig, SettingError, resume_settings

Log = Callable[[str], None]


def method_setup(config: RunConfig, num_samples: int, num_classes: int) -> TrainingSetup:
    """What a method is told about the run (its attack's defaults are the run settings)."""
    return TrainingSetup(num_samples=num_samples, num_classes=num_classes, epochs=config.epochs, eps=config.eps,
                         step_size=config.step_size, steps=config.steps, norm=config.norm)


def resolved_method_settings(config: RunConfig) -> dict:
    """The method's own settings with its defaults and derivations (e.g. TE start/end) filled in,
    as a run records them in config.json's "method" (no data needed)."""
    return dict(get_method(config.method)(method_setup(config, 1, 10), **config.method_args).settings)


def _stamp(folder: RunFolder) -> tuple:
    """What identifies the versions of the resumable checkpoints (``last.pt`` and ``last-prev.pt``):
    another writer changes one of them (or its presence) whatever it does."""
    stamps = []
    for path in (folder.last, folder.previous):
        try:
            info = path.stat()
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size))
    return tuple(stamps)


@dataclass(frozen=True)
class Resumable:
    """The checkpoint a run resumes from, read once (before the run folder's lock is taken, so that
    every check fails before any data is loaded). ``folder`` is the RunFolder that read it (it knows
    which checkpoint is good); ``stamp`` identifies both resumable files as they were read, so that
    a write by another process in between is seen once the lock is held (:func:`unchanged_since`)."""

    folder: RunFolder
    path: Path
    state: dict
    passed_over: str | None  # why a newer checkpoint was passed over (a fallback), or None
    stamp: tuple

    @property
    def saved_config(self) -> dict:
        return dict(self.state.get("config") or {})

    @property
    def saved_method(self) -> dict:
        return dict((self.state.get("method") or {}).get("config") or {})

    @property
    def method_name(self) -> str:
        return str(self.saved_config.get("method", SETTINGS_BY_NAME["method"].default))

    @property
    def epochs_done(self) -> int:
        """Finished epochs (a mid-epoch checkpoint's epoch is not finished)."""
        partial = self.state.get("partial")
        return partial["epoch"] - 1 if partial else self.state["epoch"]

    def still_current(self) -> bool:
        """Whether both resumable files are as they were read (no other process wrote the run since)."""
        try:
            return _stamp(self.folder) == self.stamp
        except OSError:
            return False


def open_resumable(run_dir: str | Path) -> Resumable:
    """The run's resumable checkpoint (``last.pt``, else ``last-prev.pt``): the one load of a resume."""
    folder = RunFolder(run_dir)
    if not folder.holds_run():
        raise TrainingError(f"--resume: {folder.last} not found (nothing to resume)")
    stamp = _stamp(folder)  # before the read: a write during it shows as a change
    path, state, passed_over = folder.load_resumable()
    return Resumable(folder, path, state, passed_over, stamp)


def _hyperparameters(method: str) -> dict:
    return {h.name: h for h in get_method(method).hyperparameters}


def settings_to_resume(resumable: Resumable, overrides: dict | None = None, *, given: dict | None = None,
                       given_method: dict | None = None) -> tuple[RunConfig, dict]:
    """The settings to continue ``resumable`` with, and the changes {name: [old, new]} (see
    :func:`resume_config`)."""
    method_cls = get_method(resumable.method_name)
    hyperparameters = _hyperparameters(resumable.method_name)
    for name in given_method or {}:
        if name not in hyperparameters:
            raise TrainingError(f"--{name.replace('_', '-')} does not apply to method "
                                f"{method_cls.name or resumable.method_name}")
    return resume_settings(resumable.saved_config, resumable.saved_method, dict(given or {}),
                           dict(given_method or {}), dict(overrides or {}), hyperparameters)


def resume_config(run_dir: str | Path, overrides: dict | None = None, *, given: dict | None = None,
                  given_method: dict | None = None) -> tuple[RunConfig, dict]:
    """The settings to continue the run in ``run_dir`` with: its checkpoint's, with ``overrides``
    applied, and the changes {name: [old, new]}. The declared rule (``at_memorization.settings``):
    derived values (milestones, TE's schedule, ...) stay as saved unless overridden. ``given`` and
    ``given_method``: settings stated again (e.g. the same command line); each must equal the saved
    value. Everything is checked before any data is loaded. Then::

        config, _ = resume_config("runs/x", {"epochs": 13})
        Trainer(config, "runs/x", resume=True, overrides={"epochs": 13}).fit()

    which reads the checkpoint twice (here, then in the trainer); to read it once, as ``at-mem train
    --resume`` does, keep what was read::

        resumable = open_resumable("runs/x")
        config, _ = settings_to_resume(resumable, {"epochs": 13})
        Trainer(config, "runs/x", resume=True, overrides={"epochs": 13}, resumable=resumable).fit()
    """
    return settings_to_resume(open_resumable(run_dir), overrides, given=given, given_method=given_method)


@dataclass(frozen=True)
class Start:
    """How a run starts: its settings (resolved, checked), the folder, and for a resume the loaded
    checkpoint and what the resume changes. Events are written to history.jsonl once training starts."""

    config: RunConfig
    folder: RunFolder
    derived: tuple[str, ...]  # settings left to their derivation (config.json's "derived")
    resumable: Resumable | None = None
    overrides: tuple[str, ...] = ()  # the names --override gave (they are no longer derived)
    events: tuple[tuple[str, dict], ...] = ()
    rewrite_config: bool = False  # config.json must be written again when training starts

    @property
    def resume(self) -> bool:
        return self.resumable is not None

    def with_event(self, event: str, details: dict, *, rewrite_config: bool = False) -> "Start":
        return dataclasses.replace(self, events=self.events + ((event, details),),
                                   rewrite_config=self.rewrite_config or rewrite_config)

    def with_data(self, fingerprint: str, allow_data_change: bool, log: Log) -> "Start":
        """The data check of a resume (the fingerprint is known once the data are loaded)."""
        if self.resumable is None:
            return self
        start, state = self, self.resumable.state
        saved = state.get("data_fingerprint")
        if saved is None:
            log("note: this run predates data fingerprints; the training data are not checked")
        elif saved != fingerprint:
            if not allow_data_change:
                raise TrainingError(
                    f"--resume: the training data differ from the run's (fingerprint {saved[:12]}, now "
                    f"{fingerprint[:12]}: other files in --data-dir, or another subset or noise); use the "
                    f"run's data, or add --allow-data-change to continue on these deliberately")
            log(f"warning: continuing on different training data (--allow-data-change): "
                f"fingerprint {saved[:12]} -> {fingerprint[:12]}")
            start = start.with_event("data-change", {"epoch": state["epoch"] + 1, "fingerprint": [saved, fingerprint]},
                                     rewrite_config=True)
        return start

    def resumed(self, log: Log) -> "Start":
        """The resume takes effect (the lock is held, the state restored): the saved record of which
        settings were derived (config.json, rewritten from the checkpoint if unreadable), then the
        resume's own event."""
        start, state, path = self, self.resumable.state, self.resumable.path
        try:
            derived = start.folder.read_config().get("derived")
            if isinstance(derived, list):
                start = dataclasses.replace(start, derived=tuple(n for n in derived if n not in self.overrides))
        except RunFolderError as error:  # e.g. a truncated config.json: the checkpoint holds the settings
            log(f"warning: {str(error).splitlines()[0]}; rewriting it from {path}")
            start = start.with_event("config-repaired", {"from": str(path)}, rewrite_config=True)
        partial = state.get("partial")
        return start.with_event("resumed", {"path": str(path), "epoch": partial["epoch"] if partial else state["epoch"] + 1,
                                            "step": partial["step"] if partial else 0, "threads": self.config.threads})


def _derived_names(config: RunConfig) -> tuple[str, ...]:
    """The settings an unresolved config leaves to their derivation, the method's included."""
    return tuple(config.derived_names() + sorted(
        h.name for h in get_method(config.method).hyperparameters
        if h.derived is not None and config.method_args.get(h.name) is None))


def decide(config: RunConfig, out_dir: str | Path, *, resume: bool, resumable: Resumable | None = None,
           overrides: dict | None = None, is_main: bool = True, log: Log = lambda message: None) -> Start:
    """Start new or resume: every check that needs no data, in the order a user wants the errors."""
    derived = _derived_names(config)
    config = config.resolve()
    config.validate()
    overrides = dict(overrides or {})
    if overrides and not resume:
        raise TrainingError("--override applies to --resume only; for a new run give the setting as its own option")
    folder = resumable.folder if resumable is not None else RunFolder(out_dir)
    if resumable is not None and Path(out_dir).resolve() != folder.path.resolve():
        raise TrainingError(f"the checkpoint given to resume is {resumable.path}, which is not in {out_dir}")
    # Before minutes of data loading: a folder we cannot write, or one another process writes.
    try:
        check_writable_folder(folder.path, "--out")
    except WriteError as error:  # the trainer's callers catch TrainingError
        raise TrainingError(str(error)) from None
    if is_main:  # under torchrun, rank 0 holds the lock for all ranks
        folder.check_free()
    if resume and not folder.holds_run():
        raise TrainingError(f"--resume: {folder.last} not found (nothing to resume)")
    if not resume and folder.holds_run():
        raise TrainingError(f"{folder.path} already holds a run; use --resume to continue it or another --out")
    # Unknown names fail before minutes of data loading.
    if not timm.is_model(config.model):
        raise UnknownModelError(f"unknown model {config.model!r}: ours are {', '.join(model_names())}; "
                                "any timm model name also works")
    method_cls = get_method(config.method)
    # The method's settings are checked (types, bounds, its own rules) before the data load too.
    method_settings = dict(method_cls(method_setup(config, 1, 10), **config.method_args).settings)
    if not resume:
        return Start(config=with_threads(config), folder=folder,
                     derived=derived + (() if config.threads else ("threads",)))
    resumable = resumable or open_resumable(folder.path)
    config = _resumed_threads(config, resumable, log)
    start = Start(config=config, folder=folder, derived=derived)
    start = dataclasses.replace(start, resumable=resumable, overrides=tuple(overrides))
    if resumable.passed_over:
        log(f"warning: {resumable.passed_over}; resuming from the previous checkpoint {resumable.path} instead")
        start = start.with_event("fallback", {"path": str(resumable.path), "reason": resumable.passed_over})
    changes = _check_against_saved(config, method_settings, resumable, overrides,
                                   {h.name: h for h in method_cls.hyperparameters})
    if config.epochs < resumable.epochs_done:
        raise TrainingError(f"--override epochs={config.epochs}: the run has already finished "
                            f"{resumable.epochs_done} epochs; epochs can only grow (or stay at {resumable.epochs_done})")
    if changes:
        log("resuming with changed settings: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        start = start.with_event("override", {"epoch": resumable.epochs_done + 1, "changes": changes}, rewrite_config=True)
    return start


def with_threads(config: RunConfig) -> RunConfig:
    """A new run's settings with the thread count it computes with: the process's when not given."""
    return dataclasses.replace(config, threads=config.threads or torch.get_num_threads())


def _resumed_threads(config: RunConfig, resumable: Resumable, log: Log) -> RunConfig:
    """The thread count a resume computes with: the run's recorded one unless given (on a CPU the count
    changes how sums are split, so another count would not continue the run bit for bit)."""
    now = torch.get_num_threads()
    threads = config.threads or resumable.saved_config.get("threads") or now
    if threads != now and threads == resumable.saved_config.get("threads"):
        log(f"note: computing with {threads} thread{'s' if threads > 1 else ''} as this run started (this process "
            f"has {now}); --override threads={now} changes it, and the results with it")
    return dataclasses.replace(config, threads=threads)


def _check_against_saved(config: RunConfig, method_settings: dict, resumable: Resumable, overrides: dict,
                         hyperparameters: dict) -> dict:
    """The settings must be the checkpoint's, except the overrides (returned as changes) and those that
    do not change results (``free_on_resume``): the declared rule, ``settings.resume_settings``. A
    setting the checkpoint does not record (saved before it existed) is not compared."""
    saved, saved_method = resumable.saved_config, resumable.saved_method
    current = config.to_dict()
    for key in overrides:
        setting = SETTINGS_BY_NAME.get(key) or hyperparameters.get(key)
        if setting is None or not setting.overridable:
            raise TrainingError(f"--override {key}: cannot change on resume (it changes what the saved state means)")
    given = {k: v for k, v in current.items() if k in saved and k in SETTINGS_BY_NAME}
    given_method = {k: v for k, v in method_settings.items() if k in saved_method}
    applied = {k: (method_settings[k] if k in hyperparameters else current[k]) for k in overrides}
    try:
        _, changes = resume_settings(saved, saved_method, given, given_method, applied, hyperparameters,
                                     complete=True)
    except SettingError as error:  # the trainer's callers catch TrainingError; the message is the rule's
        raise TrainingError(str(error)) from None
    return changes


def changed_while_starting(resumable: Resumable) -> TrainingError:
    """The refusal when another process wrote the run between the read and the lock: nothing is lost
    (this process has written nothing), and the same command then reads the new checkpoint."""
    return TrainingError(f"{resumable.folder.path} was written by another process while this one was starting "
                         f"(after it read {resumable.path.name}); run the same command again")

