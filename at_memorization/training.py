"""The training loop: optimizer, schedule, AMP/channels_last, DDP, checkpoints, resume, metrics.

The trainer asks the method registry for the method and never branches on its name. Per epoch it
writes ``best.pt`` (when the test robust accuracy improves; ties broken by clean accuracy), then
``last.pt``, then one line of ``metrics.jsonl``. ``resume`` continues from ``last.pt`` exactly:
model, optimizer, method state, every RNG, and the data order (a pure function of seed and epoch),
so an interrupted and resumed run ends bit-identical (on CPU) to an uninterrupted one.

What protects a run folder (README, "Training"): a lock file naming the one process that may write
it (``runlock``); a fingerprint of the training data, checked on resume; ``last.pt`` rotated to
``last-prev.pt`` before each write, with an automatic fallback to it on resume; a stop requested by
SIGTERM/SIGINT (``request_stop``) that ends at a step boundary with a mid-epoch checkpoint from
which the run resumes bit-identically; deliberate changes on resume (``overrides``) recorded in
``history.jsonl``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .attacks import selection_pgd
from .data import AUGMENTATIONS, DataBundle, epoch_batches, load_data, to_float
from .evaluation import _as_float, correct_flags, default_batch_size
from .methods import MethodError, TrainingSetup, get_method
from .models import UnknownModelError, build_model, model_names
from .loggers import LOGGERS, SafeLoggers
from .randomness import capture_rng, restore_rng
from .runfolder import NonFiniteCheckpoint, RunFolder, RunFolderError
from .settings import PRESETS, RUN_SETTINGS, SETTINGS_BY_NAME, RunConfig, resume_settings  # noqa: F401  (PRESETS, RunConfig: API)
from .runtime import DistributedContext, TrainingError, eval_mode, resolve_device, seed_everything  # noqa: F401

class TrainingInterrupted(Exception):
    """A requested stop (SIGTERM, SIGINT): the run's state up to ``step`` of ``epoch`` is in last.pt."""

    def __init__(self, reason: str, epoch: int, step: int, steps: int, saved: bool):
        self.reason, self.epoch, self.step, self.steps, self.saved = reason, epoch, step, steps, saved
        where = f"epoch {epoch}, after step {step} of {steps}" if step else f"the start of epoch {epoch}"
        super().__init__(f"stopped by {reason} at {where}")


# A stop request is agreed between torchrun processes every this many steps (an all-reduce, which
# synchronizes the host with the device, so not at every step).
STOP_CHECK_EVERY = 25


def learning_rate(config: RunConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (counted from 1).

    step: ``lr * gamma ** (number of milestones < epoch)``: as the paper's code (``MultiStepLR([100,
    150])`` stepped after each epoch), epochs 1-100 train at 0.1, 101-150 at 0.01, 151-200 at 0.001.
    cosine: ``lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2``.
    """
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    milestones = config.resolve().milestones if config.milestones is None else config.milestones
    return config.lr * config.lr_gamma ** sum(epoch > m for m in milestones)


@dataclass
class Callbacks:
    """How the trainer reports progress; the CLI fills these with a progress bar and echo."""

    log: Callable[[str], None] = lambda message: None
    epoch_begin: Callable[[int, int], None] = lambda epoch, batches: None
    step: Callable[[], None] = lambda: None
    epoch_end: Callable[[dict], None] = lambda record: None


def resolved_method_settings(config: RunConfig) -> dict:
    """The method's own settings with its defaults and derivations (e.g. TE start/end) filled in,
    as a run records them in config.json's "method" (no data needed)."""
    setup = TrainingSetup(num_samples=1, num_classes=10, epochs=config.epochs, eps=config.eps,
                          step_size=config.step_size, steps=config.steps, norm=config.norm)
    return dict(get_method(config.method)(setup, **config.method_args).settings)


def _as_text(value) -> str:
    """A setting's value as ``--override`` reads it back (lists as 2,3)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def resume_config(run_dir: str | Path, overrides: dict | None = None, *, given: dict | None = None,
                  given_method: dict | None = None) -> tuple[RunConfig, dict]:
    """The settings to continue the run in ``run_dir`` with: its checkpoint's, with ``overrides``
    applied, and the changes {name: [old, new]}. The declared rule (``at_memorization.settings``):
    derived values (milestones, TE's schedule, ...) stay as saved unless overridden. ``given`` and
    ``given_method``: settings stated again (e.g. the same command line); each must equal the saved
    value. Everything is checked before any data is loaded. Then::

        config, _ = resume_config("runs/x", {"epochs": 13})
        Trainer(config, "runs/x", resume=True, overrides={"epochs": 13}).fit()
    """
    folder = RunFolder(run_dir)
    if not folder.holds_run():
        raise TrainingError(f"--resume: {folder.last} not found (nothing to resume)")
    _, state, _ = folder.load_resumable()
    saved = dict(state.get("config") or {})
    method_cls = get_method(str(saved.get("method", SETTINGS_BY_NAME["method"].default)))
    hyperparameters = {h.name: h for h in method_cls.hyperparameters}
    for name in given_method or {}:
        if name not in hyperparameters:
            raise TrainingError(f"--{name.replace('_', '-')} does not apply to method {method_cls.name or saved.get('method')}")
    saved_method = dict((state.get("method") or {}).get("config") or {})
    return resume_settings(saved, saved_method, dict(given or {}), dict(given_method or {}), dict(overrides or {}),
                           hyperparameters)


def check_writable_folder(path: str | Path, what: str = "--out") -> None:
    """Fail before any work if ``path`` cannot be (or be made into) a folder we can write in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrainingError(f"{what} {path} is a file, not a folder")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TrainingError(f"{what} {path}: {ancestor} is a file, so no folder can be made under it")
    try:  # a real write, not os.access: also right for root, read-only mounts and ACLs
        fd, probe = tempfile.mkstemp(prefix=".at-mem-write-probe.", suffix=".tmp", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise TrainingError(f"{what} {path}: cannot write in {ancestor} ({error.strerror or error})") from None


def data_fingerprint(dataset) -> str:
    """SHA-256 of the training images and labels actually used (subset, noise included)."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(dataset.images.shape), tuple(dataset.labels.shape))).encode())
    digest.update(dataset.images.contiguous().numpy().data)
    digest.update(dataset.labels.to(torch.int64).contiguous().numpy().data)
    return digest.hexdigest()


class Trainer:
    """Runs one method on one model and data set, writing everything into the run folder ``out_dir``.

    ``resume=True`` continues the run in ``out_dir``; ``config`` must then be the run's saved
    settings, with ``overrides`` (deliberate changes, recorded in history.jsonl) applied: what
    :func:`resume_config` returns. The trainer owns the loop; the files are the run folder's
    (:class:`RunFolder`) and the settings' rules are the declaration's (``at_memorization.settings``).
    """

    def __init__(self, config: RunConfig, out_dir: str | Path, *, device: str | None = None,
                 resume: bool = False, callbacks: Callbacks | None = None, data: DataBundle | None = None,
                 overrides: dict | None = None, allow_data_change: bool = False, checkpoint_every_steps: int = 0,
                 loggers: tuple[str, ...] = ()):
        # which settings are left to their derivation (recorded in config.json), then derive them
        self._derived = config.derived_names() + sorted(
            h.name for h in get_method(config.method).hyperparameters
            if h.default is None and config.method_args.get(h.name) is None)
        config = config.resolve()
        config.validate()
        self.config = config
        self.folder = RunFolder(out_dir)
        self.out_dir = self.folder.path
        self.callbacks = callbacks or Callbacks()
        self.overrides = dict(overrides or {})
        self.allow_data_change = allow_data_change
        if checkpoint_every_steps < 0:
            raise TrainingError(f"--checkpoint-every-steps must be >= 0, got {checkpoint_every_steps}")
        self.checkpoint_every_steps = checkpoint_every_steps
        self.stop_reason: str | None = None  # set by request_stop (a signal handler)
        self._partial: dict | None = None  # a mid-epoch checkpoint's loop state, on resume
        self._events: list[tuple[str, dict]] = []  # history events, written once training starts
        self._rewrite_config = False  # config.json to be (re)written when training starts
        self.logger_names = tuple(loggers)  # experiment loggers (at_memorization.loggers), started by fit
        unknown = [name for name in self.logger_names if name not in LOGGERS]
        if unknown:
            raise TrainingError(f"unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)}")
        self._loggers: SafeLoggers | None = None
        if self.overrides and not resume:
            raise TrainingError("--override applies to --resume only; for a new run give the setting as its own option")
        self.ctx = DistributedContext(device)
        if config.batch_size % self.ctx.world_size:
            raise TrainingError(f"batch size {config.batch_size} is not divisible by {self.ctx.world_size} processes")
        # Before minutes of data loading: a folder we cannot write, or one another process writes.
        check_writable_folder(self.out_dir)
        if self.ctx.is_main:  # under torchrun, rank 0 holds the lock for all ranks
            self.folder.check_free()
        if resume and not self.folder.holds_run():
            raise TrainingError(f"--resume: {self.folder.last} not found (nothing to resume)")
        if not resume and self.folder.holds_run():
            raise TrainingError(f"{self.out_dir} already holds a run; use --resume to continue it or another --out")

        # Unknown names fail before minutes of data loading.
        if not timm.is_model(config.model):
            raise UnknownModelError(f"unknown model {config.model!r}: ours are {', '.join(model_names())}; "
                                    "any timm model name also works")
        method_cls = get_method(config.method)
        # The method's settings are checked (types, bounds, its own rules) before the data load too.
        method_cls(self._setup(num_samples=1, num_classes=10), **config.method_args)
        # Every global stream (torch, Python, NumPy), so that two runs with one --seed agree in full
        # (a resumed run then restores all three from the checkpoint).
        seed_everything(config.seed)
        self.data = data or load_data(config.dataset, config.data_dir, train_size=config.train_size,
                                      test_size=config.test_size, label_noise=config.label_noise,
                                      input_noise=config.input_noise,
                                      input_noise_fraction=config.input_noise_fraction, seed=config.seed)
        train = self.data.train
        for flag, asked, got in (("--train-size", config.train_size, len(train)),
                                 ("--test-size", config.test_size, len(self.data.test))):
            if asked is not None and asked > got:
                self.callbacks.log(f"{flag} {asked}: the data has {got} points; all {got} are used")
        self.fingerprint = data_fingerprint(train)
        in_chans, height, _ = train.shape
        # The whole (small, uint8) training set lives on the device: batches are cut there, so a
        # step copies nothing from the host (CIFAR-10: 150 MB).
        self.train_images = train.images.to(self.ctx.device)
        self.train_labels = train.labels.to(self.ctx.device)
        self.model = build_model(config.model, train.num_classes, in_chans, height,
                                 drop_rate=config.drop_rate).to(self.ctx.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.setup = self._setup(num_samples=len(train), num_classes=train.num_classes)
        self.method = method_cls(self.setup, **config.method_args).to(self.ctx.device)
        self._hyperparameters = {h.name: h for h in method_cls.hyperparameters}
        if self.ctx.enabled:
            # One random stream per rank (attack random starts, dropout): otherwise every shard of
            # a global batch would get the same noise. Rank 0 keeps the single-process stream.
            torch.manual_seed(config.seed + 7_919 * self.ctx.rank)
        self.train_model = self.model
        if self.ctx.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None)
        self.attack_model = self.model
        on_cuda = self.ctx.device.type == "cuda"
        # On CUDA, compile with CUDA graphs: a PGD-10 step of PreActResNet-18 issues ~2,250 kernel
        # launches and the GPU idled 77% of the step waiting for them (profiled on an H200);
        # replaying graphs measured 2.3-2.9x the eager throughput in the benchmark (docs/benchmarks.md;
        # not yet in a run with a smaller last batch: see dynamic=False below). DDP's hooks cannot
        # be captured, so a DDP-wrapped update is compiled without graphs. dynamic=False: the last,
        # smaller batch of an epoch gets its own static graph instead of turning every batch's graph
        # into a dynamic-shape one (what dynamo does by default on a second shape).
        self._cuda_graphs = config.compile and on_cuda
        if config.compile:  # one compiled module for attack and update, unless DDP wraps the latter
            self.attack_model = torch.compile(self.model, mode="reduce-overhead" if on_cuda else None, dynamic=False)
            self.train_model = (self.attack_model if self.train_model is self.model
                                else torch.compile(self.train_model, dynamic=False))
        self._set_attack_mode(config.attack_bn)
        if on_cuda:  # fixed input shapes: let cuDNN time its convolution algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        # fused: one kernel for the whole parameter update on CUDA (the same SGD arithmetic)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, fused=True if on_cuda else None)
        self.augment = AUGMENTATIONS[self.data.info.augmentation if config.augment else "none"]
        self.start_epoch = 1
        self.history: list[dict] = []
        self.best = {"epoch": 0, "test_robust_acc": -1.0, "test_clean_acc": -1.0}
        self.tracked = None
        # per-epoch evaluation: its sets and attack, made on first use (evaluate_epoch)
        self._evaluation_sets: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._evaluation_attack = None
        if config.track_samples:
            n = len(train)
            # "recorded": which epochs hold real records (a lost tracking.pt leaves earlier epochs unrecorded)
            self.tracked = {"adv_correct": torch.zeros(config.epochs, n, dtype=torch.uint8),
                            "adv_loss": torch.zeros(config.epochs, n, dtype=torch.float16),
                            "recorded": torch.zeros(config.epochs, dtype=torch.uint8)}
        self.lock = self.folder.lock()
        if self.ctx.is_main:  # the folder is created here, after the data loaded without error
            self.lock.acquire()
            if self.lock.notice:
                self.callbacks.log(self.lock.notice)
        try:
            if resume:
                self._resume()
            else:
                for note in self.method.notes:
                    self.callbacks.log(note)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, num_samples: int, num_classes: int) -> TrainingSetup:
        c = self.config
        return TrainingSetup(num_samples=num_samples, num_classes=num_classes, epochs=c.epochs, eps=c.eps,
                             step_size=c.step_size, steps=c.steps, norm=c.norm)

    def _set_attack_mode(self, mode: str) -> None:
        """The model's mode during the training attack (``--attack-bn``), for every method: set once on
        the method's attack object, the one ``method.attack`` uses for ``self.attack_model`` at every step
        (the bare module, or the compiled one; never the DDP wrapper). torchattacks' ``Attack.__call__``
        switches the model to the mode its ``set_model_training_mode`` names (eval by default) and back
        after the call. "train" is the whole model in train mode, as Rice et al.'s and AWP's ``attack_pgd``
        (called with the model in ``model.train()``): BatchNorm normalizes with each attack batch's
        statistics and updates its running statistics, dropout draws masks. What runs outside the attack
        object keeps its own mode: TE's ensemble forward (eval, the paper's), the per-epoch evaluation
        and ``--track-samples`` (eval)."""
        if mode == "eval":  # torchattacks' default: nothing to set, the step is as before the setting existed
            return
        try:
            attack = self.method.make_attack(self.attack_model)
        except NotImplementedError:
            attack = None
        if not callable(getattr(attack, "set_model_training_mode", None)):
            raise TrainingError(f"--attack-bn {mode}: method {self.config.method} does not build a torchattacks "
                                f"attack (build_attack), so its attack mode cannot be set; use --attack-bn eval")
        attack.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)

    def close(self) -> None:
        """Release the run folder's lock (``fit`` does so when it returns or fails)."""
        self.lock.release()

    def shutdown(self) -> None:
        """After the last ``fit``: release the lock, drop the DDP wrapper and tear the process group
        down with every process. DDP holds the group's backend (gloo's threads and their tensors);
        freed only at interpreter exit, those can abort the process (exit status -6) after a
        finished run."""
        self.close()
        self.train_model = self.attack_model = self.model
        gc.collect()
        self.ctx.shutdown()

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at the next step boundary, saving a checkpoint (safe in a signal handler)."""
        self.stop_reason = reason

    # ------------------------------------------------------------------ checkpoints
    def _rng_states(self) -> list[dict]:
        """Every rank's generator states (a collective call under torchrun)."""
        if not self.ctx.enabled:
            return [capture_rng()]
        states = [None] * self.ctx.world_size
        dist.all_gather_object(states, capture_rng())
        return states

    def _checkpoint(self, epoch: int, rng_states: list[dict]) -> dict:
        train = self.data.train
        return ckpt.make_checkpoint(
            model=self.model, model_name=self.config.model, num_classes=train.num_classes, in_chans=train.shape[0],
            img_size=train.shape[1], dataset=self.config.dataset, optimizer_state=self.optimizer.state_dict(),
            schedule=self.config.schedule, lr=learning_rate(self.config, epoch), method_name=self.config.method,
            method_settings=self.method.settings, method_state=self.method.state_dict(), epoch=epoch,
            config=self.config.to_dict(), rng_states=rng_states, best=self.best, history=self.history,
            data_fingerprint=self.fingerprint)

    def _check_resume_config(self, state: dict) -> None:
        """The settings must be the checkpoint's, except those a resume may change: the overrides
        (recorded) and the ones that do not change results (``free_on_resume``)."""
        saved, current = state.get("config", {}), self.config.to_dict()
        for key in self.overrides:
            setting = SETTINGS_BY_NAME.get(key) or self._hyperparameters.get(key)
            if setting is None or not setting.overridable:
                raise TrainingError(f"--override {key}: cannot change on resume (it changes what the saved state "
                                    f"means)")
        saved_method = dict(state.get("method", {}).get("config") or {})
        compared = [(s.name, saved.get(s.name, s.default), current[s.name]) for s in RUN_SETTINGS
                    if not s.free_on_resume and s.name not in self.overrides and s.name in saved]
        compared += [(name, saved_method.get(name), value) for name, value in self.method.settings.items()
                     if name not in self.overrides and name in saved_method]
        for key, was, given in compared:
            if was != given:
                raise TrainingError(f"--resume: the configuration differs from the saved run in {key!r} (saved "
                                    f"{was!r}, given {given!r}); to change it deliberately add --override "
                                    f"{key}=VALUE (at_memorization.training.resume_config applies overrides)")
        changes = {}
        for key in self.overrides:
            old = saved_method.get(key) if key in self._hyperparameters else saved.get(key)
            new = self.method.settings[key] if key in self._hyperparameters else current[key]
            if old != new:
                changes[key] = [old, new]
        done = state["partial"]["epoch"] - 1 if state.get("partial") else state["epoch"]
        if self.config.epochs < done:
            raise TrainingError(f"--override epochs={self.config.epochs}: the run has already finished {done} epochs; "
                                f"epochs can only grow (or stay at {done})")
        if changes:
            self.callbacks.log("resuming with changed settings: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
            self._events.append(("override", {"epoch": done + 1, "changes": changes}))
            self._rewrite_config = True

    def _check_resume_data(self, state: dict) -> None:
        saved = state.get("data_fingerprint")
        if saved is None:
            self.callbacks.log("note: this run predates data fingerprints; the training data are not checked")
        elif saved != self.fingerprint:
            if not self.allow_data_change:
                raise TrainingError(
                    f"--resume: the training data differ from the run's (fingerprint {saved[:12]}, now "
                    f"{self.fingerprint[:12]}: other files in --data-dir, or another subset or noise); use the "
                    f"run's data, or add --allow-data-change to continue on these deliberately")
            self.callbacks.log(f"warning: continuing on different training data (--allow-data-change): "
                               f"fingerprint {saved[:12]} -> {self.fingerprint[:12]}")
            self._events.append(("data-change", {"epoch": state["epoch"] + 1, "fingerprint": [saved, self.fingerprint]}))
            self._rewrite_config = True

    def _resume(self) -> None:
        path, state, passed_over = self.folder.load_resumable()
        if passed_over:
            self.callbacks.log(f"warning: {passed_over}; resuming from the previous checkpoint {path} instead")
            self._events.append(("fallback", {"path": str(path), "reason": passed_over}))
        self._check_resume_config(state)
        self._check_resume_data(state)
        ckpt.load_weights_into(self.model, state["model"], path, model_name=self.config.model)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            # load_state_dict restores the saved hyperparameters too: an --override of momentum or
            # weight decay must reach the optimizer (the lr is set at every epoch)
            for group in self.optimizer.param_groups:
                group["momentum"], group["weight_decay"] = self.config.momentum, self.config.weight_decay
            self.method.load_state_dict(state["method"]["state"])
        except (MethodError, ckpt.CheckpointError):  # already one line, naming the problem
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ckpt.CheckpointError(f"{path}: the optimizer or method state does not fit this run "
                                       f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''})") from error
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = state["epoch"] + 1
        self._partial = state.get("partial")
        if self._partial is not None:
            self.start_epoch = self._partial["epoch"]
        self._resume_tracking(state)
        per_rank = state.get("rng_per_rank") or []
        restore_rng(per_rank[self.ctx.rank] if len(per_rank) == self.ctx.world_size else state["rng"])
        try:
            derived = self.folder.read_config().get("derived")
            if isinstance(derived, list):
                self._derived = [name for name in derived if name not in self.overrides]
        except RunFolderError as error:  # e.g. a truncated config.json: the checkpoint holds the settings
            self.callbacks.log(f"warning: {str(error).splitlines()[0]}; rewriting it from {path}")
            self._events.append(("config-repaired", {"from": str(path)}))
            self._rewrite_config = True
        where = f"epoch {self.start_epoch}" + (f", step {self._partial['step']}" if self._partial else "")
        self.callbacks.log(f"resumed from {path} at {where}")
        self._events.append(("resumed", {"path": str(path), "epoch": self.start_epoch,
                                         "step": self._partial["step"] if self._partial else 0}))

    def _resume_tracking(self, state: dict) -> None:
        if self.tracked is None:
            return
        done = self.start_epoch - 1
        path = self.folder.tracking
        if path.is_file():
            try:
                # any number of epochs: the file may be from before or after an --override epochs=N
                tracked = ckpt.load_tracking(path, None, self.tracked["adv_correct"].shape[1])
            except ckpt.CheckpointError as error:
                raise TrainingError(f"--resume: {error}; delete it to resume without the per-sample records of "
                                    f"epochs 1-{done}") from None
            saved_epochs = tracked["adv_correct"].shape[0]
            recorded = tracked.get("recorded")
            if not isinstance(recorded, torch.Tensor):
                # a file from before the "recorded" flag: every finished epoch was recorded
                recorded = (torch.arange(saved_epochs) < done).to(torch.uint8)
            # epochs after the checkpoint's are trained again (the file may have been written for a
            # checkpoint that never made it to disk)
            tracked["recorded"] = recorded.to(torch.uint8) * (torch.arange(saved_epochs) < done)
            # An extended (or shortened) run: its rows grow (or go) with the epochs; new ones unrecorded.
            rows = min(saved_epochs, self.config.epochs)
            for key, values in tracked.items():
                self.tracked[key][:rows] = values[:rows]
        elif done > 0:
            self.callbacks.log(f"warning: {path} is missing: the per-sample records of epochs 1-{done} are lost and "
                               f"marked as not recorded (at-mem memorization will refuse this run)")
            self._events.append(("tracking-lost", {"epochs": [1, done]}))

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, index, generator):
        """Cut a batch out of the device-resident training set and augment it there."""
        x = self.augment(to_float(self.train_images[index]), generator)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.train_labels[index], index

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training; raises TrainingInterrupted (after saving last.pt) on a requested stop."""
        config, ctx, method = self.config, self.ctx, self.method
        partial, self._partial = (self._partial if self._partial and self._partial["epoch"] == epoch else None), None
        lr = learning_rate(config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        record = {"epoch": epoch, "lr": lr}
        record.update(method.on_epoch_start(epoch))
        train = self.data.train
        per_rank = config.batch_size // ctx.world_size
        batches = list(epoch_batches(len(train), per_rank, seed=config.seed, epoch=epoch, rank=ctx.rank,
                                     world_size=ctx.world_size))
        # Augmentation draws from its own generator, a pure function of (seed, epoch, rank).
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 7_919 + ctx.rank)
        sums: dict[str, torch.Tensor] = {}
        first_step, seconds_before = 0, 0.0
        if partial is not None:  # resuming a mid-epoch checkpoint: the loop state of its last step
            generator.set_state(partial["augment_rng"])
            sums = {k: v.to(ctx.device) for k, v in partial["sums"].items()}
            first_step, seconds_before = partial["step"], partial["train_seconds"]

        def add(name, value, weight):
            value = value.detach().float() * weight
            sums[name] = sums[name] + value if name in sums else value

        self.callbacks.epoch_begin(epoch, len(batches))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.tracked is not None:
            self._epoch_track = {k: self.tracked[k][epoch - 1].to(ctx.device) for k in ("adv_correct", "adv_loss")}
            if partial is not None and partial.get("track") is not None:
                self._epoch_track = {k: v.to(ctx.device) for k, v in partial["track"].items()}
        # One copy of the epoch's order to the device; batches are views of it.
        device_batches = torch.cat(batches).to(ctx.device).split(per_rank) if batches else []
        total = len(device_batches)
        for step, index in enumerate(device_batches):
            if step < first_step:
                continue
            if self._cuda_graphs:  # a new iteration: the previous step's graph outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            x, y, index = self._prepare(index, generator)
            with self._autocast():
                x_adv = method.attack(self.attack_model, x, y, index, epoch)
            self.train_model.train()
            method.before_loss(self.model, x, x_adv, y, index, epoch)
            with self._autocast():
                loss, logs = method.loss(self.train_model, x, x_adv, y, index, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                [p.grad for p in params if p.grad is not None])))
            method.before_step(self.model, self.optimizer, epoch)
            self.optimizer.step()
            n = torch.full((), float(len(y)), device=ctx.device)  # a fill, not a host-to-device copy
            add("train_loss", loss, n)
            add("grad_norm", grad_norm, 1.0)
            add("_samples", n, 1.0)
            add("_steps", torch.ones((), device=ctx.device), 1.0)
            for name, value in logs.items():
                add(name, value, n)
            if self.tracked is not None:
                self._track(epoch, x_adv, y, index)
            self.callbacks.step()
            done = step + 1
            if done == total:
                break
            stop = self._stop_agreed(done)
            if stop or (self.checkpoint_every_steps and done % self.checkpoint_every_steps == 0):
                self._save_partial(epoch, done, generator, sums, seconds_before + time.perf_counter() - start)
            if stop:
                raise TrainingInterrupted(self.stop_reason or "a stop request of another process", epoch, done,
                                          total, saved=True)
        if self.tracked is not None:
            for key, values in self._epoch_track.items():
                self.tracked[key][epoch - 1] = values.cpu()
            self.tracked["recorded"][epoch - 1] = 1
        if ctx.enabled:
            # BatchNorm running statistics drift apart per rank (each sees its own shard); keep rank
            # 0's, which the checkpoint holds, so evaluation agrees and a resumed run is exact.
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        record["train_seconds"] = seconds_before + time.perf_counter() - start
        names = sorted(sums)
        totals = ctx.all_reduce_sum(torch.stack([sums[k] for k in names])).cpu().tolist()
        totals = dict(zip(names, totals))
        samples, steps = totals.pop("_samples"), totals.pop("_steps")
        for name, total in totals.items():
            record[name] = total / (steps if name == "grad_norm" else samples)
        if not all(math.isfinite(v) for v in (record["train_loss"], record["grad_norm"])):
            raise self._diverged(f"at epoch {epoch} (loss {record['train_loss']}, grad norm {record['grad_norm']})")
        return record

    def _diverged(self, where: str) -> TrainingError:
        """The divergence error: it names a checkpoint that was checked to be finite (the run folder
        never writes others) and a command that continues from it, or says that none exists."""
        lower = f"{self.config.lr / 10:g}"
        good = self.folder.last_good
        if good is not None:
            # this session's other overrides too: the good checkpoint may predate them
            again = "".join(f" --override {key}={_as_text(value)}" for key, value in self.overrides.items()
                            if key != "lr")
            return TrainingError(
                f"training diverged {where}; the last good checkpoint is {good[0]} ({good[1]}), checked to be finite; "
                f"continue from it with a lower learning rate: at-mem train --resume --out {self.out_dir}{again} "
                f"--override lr={lower}")
        return TrainingError(f"training diverged {where}; no checkpoint was written yet ({self.folder.init} holds the "
                             f"initial weights); start again with a lower learning rate: the same command with "
                             f"--lr {lower}")

    def _stop_agreed(self, done: int) -> bool:
        """Whether to stop after this step; under torchrun all processes decide together."""
        if not self.ctx.enabled:
            return self.stop_reason is not None
        if done % STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([1.0 if self.stop_reason else 0.0], device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _save_partial(self, epoch: int, done: int, generator, sums: dict, seconds: float) -> None:
        """A mid-epoch checkpoint: the state after ``done`` steps of ``epoch`` (resumed bit-identically)."""
        self._check_finite(sums.get("train_loss"), f"in epoch {epoch} (by step {done})")
        rng_states = self._rng_states()
        if not self.ctx.is_main:
            return
        state = self._checkpoint(epoch - 1, rng_states)
        state["partial"] = {
            "epoch": epoch, "step": done, "augment_rng": generator.get_state(), "train_seconds": seconds,
            "sums": {k: v.detach().cpu() for k, v in sums.items()},
            "track": {k: v.cpu() for k, v in self._epoch_track.items()} if self.tracked is not None else None,
        }
        if self.tracked is not None:
            self.folder.save_tracking(self.tracked)
        self._save_last(state, f"epoch {epoch}, step {done}")

    def _track(self, epoch, x_adv, y, index) -> None:
        """Per-sample adversarial correctness and loss (eval mode) on this step's examples."""
        with eval_mode(self.model), torch.no_grad(), self._autocast():
            logits = self.model(x_adv).float()
        correct = (logits.argmax(1) == y).to(torch.uint8)
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").to(torch.float16)
        if self.ctx.enabled:
            gathered = [[torch.empty_like(t) for _ in range(self.ctx.world_size)] for t in (index, correct, losses)]
            for out, t in zip(gathered, (index, correct, losses)):
                dist.all_gather(out, t)
            index, correct, losses = (torch.cat(g) for g in gathered)
        # Written on the device; copied to the host once per epoch (no sync per step).
        self._epoch_track["adv_correct"][index] = correct
        self._epoch_track["adv_loss"][index] = losses

    def _shard(self, n: int) -> torch.Tensor:
        return torch.arange(self.ctx.rank, n, self.ctx.world_size)

    def evaluation_splits(self) -> list[str]:
        """What ``evaluate_epoch`` measures: ``"test"``, and ``"train"`` with ``--eval-train-size``."""
        return ["test"] + (["train"] if self.config.eval_train_size else [])

    def _evaluation_set(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's share of a split as float images and labels on the device, and the split's
        size; made once per run (the data do not change within a process), not once per epoch."""
        cached = self._evaluation_sets.get(prefix)
        if cached is None:
            dataset = self.data.test if prefix == "test" else self.data.train
            n = len(dataset) if prefix == "test" else min(self.config.eval_train_size, len(dataset))
            images, labels, _ = dataset.batch(self._shard(n))
            # the same values as correct_flags' per-batch uint8 -> [0, 1] conversion, done once
            cached = (_as_float(images).to(self.ctx.device), labels.to(self.ctx.device), n)
            self._evaluation_sets[prefix] = cached
        return cached

    def evaluate_split(self, prefix: str, record: dict) -> None:
        """Clean and PGD accuracy on one split (``evaluation_splits``), into ``record``."""
        config = self.config
        if self._evaluation_attack is None or self._evaluation_attack.model is not self.model:
            self._evaluation_attack = selection_pgd(self.model, config.eps, config.step_size, config.eval_steps,
                                                    config.norm)
        images, labels, n = self._evaluation_set(prefix)
        counts = []
        for attack_or_none in (None, self._evaluation_attack):
            flags = correct_flags(self.model, images, labels, batch_size=default_batch_size(self.ctx.device),
                                  device=self.ctx.device, attack=attack_or_none, seed=config.seed)
            counts.append(flags.sum())
        counts = self.ctx.all_reduce_sum(torch.stack(counts).float().to(self.ctx.device)).cpu().tolist()
        record[f"{prefix}_clean_acc"] = counts[0] / n
        record[f"{prefix}_robust_acc"] = counts[1] / n

    def evaluate_epoch(self, record: dict) -> None:
        """Test clean and PGD accuracy (and, optionally, on training points), split over ranks.

        The evaluation sets (float, on the device) and the attack object are made on the first
        call and reused; the batches, attack and random stream are as before, so the accuracies
        are the same (tests/test_evaluation_epoch.py checks them against the former code). The cached
        sets cost 4 bytes per pixel on the device (CIFAR-10's 10,000 test images: 123 MB)."""
        for prefix in self.evaluation_splits():
            self.evaluate_split(prefix, record)

    def fit(self) -> list[dict]:
        """Train to the last epoch; the lock is released however this ends."""
        try:
            return self._fit()
        except NonFiniteCheckpoint as error:  # the last guard: never a non-finite checkpoint on disk
            raise self._diverged(f"({error})") from None
        except OSError as error:  # a write failed: say why in one line, and how to go on
            reason = str(error) if isinstance(error, ckpt.WriteError) else (
                f"cannot write {error.filename or 'a run file'}: {error.strerror or error} [Errno {error.errno}]")
            good = self.folder.last_good
            kept = (f"nothing is lost: {good[0]} holds the last complete checkpoint ({good[1]}); once fixed, run "
                    f"the same command with --resume" if good is not None else
                    "no checkpoint was written yet; once fixed, run the same command again")
            raise TrainingError(f"{reason} (free space, raise the file size limit or fix the folder's "
                                f"permissions); {kept}") from error
        finally:
            if self._loggers is not None:
                self._loggers.close()
                self._loggers = None
            self.close()

    def repair_finished_metrics(self) -> bool:
        """A finished run whose metrics.jsonl lacks epochs its checkpoint holds (a kill between saving
        the last epoch's checkpoint and appending its line): rewrite the file from the checkpoint's
        history, which is the record. True when it was rewritten; nothing else is written."""
        if not self.ctx.is_main or self.start_epoch <= self.config.epochs:
            return False
        try:
            recorded = [r.get("epoch") for r in self.folder.read_metrics(allow_empty=True)]
        except RunFolderError:
            recorded = None  # unreadable: rewritten from the history
        if recorded == [h.get("epoch") for h in self.history]:
            return False
        self.folder.rewrite_metrics(self.history)
        return True

    def _fit(self) -> list[dict]:
        folder = self.folder
        if self.start_epoch > self.config.epochs:  # a finished run: nothing trains, nothing is recorded
            self.repair_finished_metrics()
            return self.history
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.start_epoch == 1 and self._partial is None and not folder.holds_run():
                folder.remove_stale_temporaries()  # e.g. of a run killed before its first checkpoint
                self._write_run_files()
            else:  # resumed: the events take effect now, and metrics.jsonl may hold an epoch written
                # after the last checkpoint
                folder.remove_stale_temporaries()
                folder.rewrite_metrics(self.history)
                if self._rewrite_config:
                    self._write_config()
                for event, details in self._events:
                    folder.record_event(event, **details)
            if self.logger_names:
                self._loggers = SafeLoggers(self.logger_names, self.out_dir, self.start_epoch, self.callbacks.log)
                self._loggers.start({"config": self.config.to_dict(), "method": dict(self.method.settings),
                                     "derived": self._derived, "world_size": self.ctx.world_size,
                                     "device": str(self.ctx.device)})
        self._events = []
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            if self.stop_reason is not None and self._partial is None and not self.ctx.enabled:
                # between epochs: the previous epoch's checkpoint is the state to resume from
                raise TrainingInterrupted(self.stop_reason, epoch, 0, 0, saved=epoch > 1)
            record = self.train_epoch(epoch)
            improved = False
            if epoch % self.config.eval_every == 0 or epoch == self.config.epochs:
                self.evaluate_epoch(record)
                improved = (record["test_robust_acc"], record["test_clean_acc"]) > (
                    self.best["test_robust_acc"], self.best["test_clean_acc"])
            self.history.append(record)
            if improved:
                self.best = {"epoch": epoch, "test_robust_acc": record["test_robust_acc"],
                             "test_clean_acc": record["test_clean_acc"]}
            self._check_finite(None, f"at epoch {epoch}")
            rng_states = self._rng_states()
            if self.ctx.is_main:
                state = self._checkpoint(epoch, rng_states)
                if self.tracked is not None:
                    folder.save_tracking(self.tracked)
                if improved:
                    folder.save_best(state)
                self._save_last(state, f"epoch {epoch}")
                folder.append_metrics(record)
                if self._loggers is not None:
                    self._loggers.log_epoch(record)
            self.ctx.barrier()
            self.callbacks.epoch_end(record)
        return self.history

    def _save_last(self, state: dict, what: str) -> None:
        self.folder.save_last(state, what)

    def _check_finite(self, loss_sum, where: str) -> None:
        """Stop (a divergence error) unless the weights, and ``loss_sum`` if given, are finite on
        every process: checked before each checkpoint, so none holds NaN weights."""
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        values = torch.stack([torch.linalg.vector_norm(torch.stack(norms))]
                             + ([loss_sum.reshape(()).float()] if loss_sum is not None else []))
        finite = torch.isfinite(values).all().float().reshape(1)
        if self.ctx.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite.item()):
            raise self._diverged(where)

    def _write_config(self) -> None:
        """config.json: the settings (run and method, resolved) and which were derived."""
        self.folder.write_config({
            "config": self.config.to_dict(), "method": dict(self.method.settings),
            "derived": self._derived, "world_size": self.ctx.world_size, "device": str(self.ctx.device),
            "data_fingerprint": self.fingerprint})

    def _write_run_files(self) -> None:
        """Files written once at the start: settings, initial weights, the (possibly noisy) labels."""
        self._write_config()
        ckpt.save_atomic(ckpt.cpu_state_dict(self.model), self.folder.init)
        ckpt.save_atomic({"labels": self.data.train.labels, "clean_labels": self.data.clean_train_labels},
                         self.folder.labels)
        self.folder.start_metrics()
