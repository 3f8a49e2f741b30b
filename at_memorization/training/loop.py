"""The Trainer: epochs and steps; each other job is a collaborator's (docs/architecture.md).

Per epoch it writes ``best.pt`` (when the test robust accuracy improves; ties broken by clean
accuracy), then ``last.pt``, then one line of ``metrics.jsonl``. A resume continues from ``last.pt``
exactly (model, optimizer, method state, every RNG, the data order: a pure function of seed and
epoch), so an interrupted and resumed run ends bit-identical (on CPU) to an uninterrupted one. The
trainer asks the method registry for the method and never branches on its name.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..data import DataBundle, data_fingerprint, epoch_batches, to_float
from ..loggers import SafeLoggers
from ..loggers import check_names as check_logger_names
from ..runfolder import NonFiniteCheckpoint
from ..runtime import DistributedContext, TrainingError, seed_everything
from ..settings import RunConfig
from . import guard, runfiles
from .build import autocast, build, load_run_data
from .epoch_eval import EpochEvaluator, best_after
from .guard import TrainingInterrupted
from .schedule import learning_rate
from .start import Resumable, changed_while_starting, decide
from .state import Progress, RunInfo, dump, epoch_loop_state, own_loop_state, restore, rng_states
from .tracking import SampleTracker


@dataclass
class Callbacks:
    """How the trainer reports progress; the CLI fills these with a progress bar and echo."""

    log: Callable[[str], None] = lambda message: None
    epoch_begin: Callable[[int, int], None] = lambda epoch, batches: None
    step: Callable[[], None] = lambda: None
    epoch_end: Callable[[dict], None] = lambda record: None


class Trainer:
    """Runs one method on one model and data set, writing everything into the run folder ``out_dir``.

    ``resume=True`` continues the run in ``out_dir``; ``config`` must then be the run's saved settings,
    with ``overrides`` (deliberate changes, recorded in history.jsonl) applied: what
    :func:`resume_config` returns. ``resumable``: the run's checkpoint if the caller already read it
    (``start.open_resumable``), so that a resume reads it once.
    """

    def __init__(self, config: RunConfig, out_dir: str | Path, *, device: str | None = None,
                 resume: bool = False, callbacks: Callbacks | None = None, data: DataBundle | None = None,
                 overrides: dict | None = None, allow_data_change: bool = False, checkpoint_every_steps: int = 0,
                 loggers: tuple[str, ...] = (), resumable: Resumable | None = None):
        self.callbacks = log = callbacks or Callbacks()
        config.validate()  # a wrong value is reported before anything else happens (torchrun's group included)
        if checkpoint_every_steps < 0:
            raise TrainingError(f"--checkpoint-every-steps must be >= 0, got {checkpoint_every_steps}")
        self.checkpoint_every_steps = checkpoint_every_steps
        self.logger_names = tuple(loggers)  # experiment loggers (at_memorization.loggers), started by fit
        self._loggers: SafeLoggers | None = None
        self.overrides = dict(overrides or {})
        self.stop_reason: str | None = None  # set by request_stop (a signal handler)
        self.ctx = DistributedContext(device)
        if config.batch_size % self.ctx.world_size:
            raise TrainingError(f"batch size {config.batch_size} is not divisible by {self.ctx.world_size} processes")
        start = decide(config, out_dir, resume=resume, resumable=resumable or None, overrides=self.overrides,
                       is_main=self.ctx.is_main, log=log.log)
        self.config = config = start.config
        self.folder = start.folder
        self.out_dir = self.folder.path
        check_logger_names(self.logger_names, self.out_dir)  # and their folders writable, before the data loads
        # Every global stream (torch, Python, NumPy), so that two runs with one --seed agree in full
        # (a resumed run then restores all three from the checkpoint).
        seed_everything(config.seed)
        self.data = data or load_run_data(config, log.log)
        train = self.data.train
        self.fingerprint = data_fingerprint(train)
        self.start = start = start.with_data(self.fingerprint, allow_data_change, log.log)
        # The whole (small, uint8) training set lives on the device: batches are cut there, so a
        # step copies nothing from the host (CIFAR-10: 150 MB).
        self.train_images = train.images.to(self.ctx.device)
        self.train_labels = train.labels.to(self.ctx.device)
        self.parts = build(config, self.data, self.ctx)
        self.info = RunInfo(config, train.num_classes, tuple(train.shape), dict(self.method.settings), self.fingerprint)
        self.evaluator = EpochEvaluator(self.model, self.data, config, self.ctx)
        self.tracker = SampleTracker(config.epochs, len(train), self.ctx) if config.track_samples else None
        self.progress = Progress()
        self.lock = self.folder.lock()
        if self.ctx.is_main:  # the folder is created here, after the data loaded without error
            self.lock.acquire()
            if self.lock.notice:
                log.log(self.lock.notice)
        try:
            # rank 0, which holds the lock, tells whether the run was written since it was read; all ranks agree
            current = start.resumable is None or not self.ctx.is_main or start.resumable.still_current()
            if not guard.all_agree(self.ctx, current):
                raise changed_while_starting(start.resumable)
            if start.resumable is None:
                for note in self.method.notes:
                    log.log(note)
            else:
                self._restore(start.resumable)
        except BaseException:
            self.lock.release()
            raise

    def _restore(self, resumable: Resumable) -> None:
        self.progress = restore(self.parts, resumable.state, self.config, self.ctx, resumable.path)
        if self.tracker is not None:
            for event in self.tracker.restore(self.folder.tracking, self.start_epoch - 1, self.callbacks.log):
                self.start = self.start.with_event(*event)
        self.start, partial = self.start.resumed(self.callbacks.log), self.progress.partial
        self.callbacks.log(f"resumed from {resumable.path} at epoch {self.start_epoch}"
                           + (f", step {partial['step']}" if partial else ""))

    # The parts, by name (tests, benchmarks and the CLI read them).
    model = property(lambda self: self.parts.model)
    train_model = property(lambda self: self.parts.train_model)
    attack_model = property(lambda self: self.parts.attack_model)
    optimizer = property(lambda self: self.parts.optimizer)
    method = property(lambda self: self.parts.method)
    cuda_graphs = property(lambda self: self.parts.cuda_graphs)
    start_epoch = property(lambda self: self.progress.next_epoch)
    history = property(lambda self: self.progress.history)
    best = property(lambda self: self.progress.best)

    def close(self) -> None:
        """Release the run folder's lock (``fit`` does so when it returns or fails)."""
        self.lock.release()

    def shutdown(self) -> None:
        """After the last ``fit``: release the lock, drop the DDP wrapper and tear the process group
        down with every process. DDP holds the group's backend (gloo's threads and their tensors);
        freed only at interpreter exit, those can abort the process (exit status -6) after a
        finished run."""
        self.close()
        self.parts.train_model = self.parts.attack_model = self.parts.model
        gc.collect()
        self.ctx.shutdown()

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at the next step boundary, saving a checkpoint (safe in a signal handler)."""
        self.stop_reason = reason

    def autocast(self):
        return autocast(self.config, self.ctx)

    def evaluate_epoch(self, record: dict) -> None:
        """Test clean and PGD accuracy (and, optionally, on training points), split over ranks."""
        self.evaluator.evaluate(record)

    def _diverged(self, where: str) -> TrainingError:
        return guard.diverged(where, self.folder, self.config, self.overrides)

    def _check_finite(self, loss_sum, where: str) -> None:
        """Stop (a divergence error) unless the weights, and ``loss_sum`` if given, are finite on every
        process: checked before each checkpoint, so none holds NaN weights."""
        if not guard.all_finite(self.model, self.ctx, loss_sum):
            raise self._diverged(where)

    # ------------------------------------------------------------------ the run
    def fit(self) -> list[dict]:
        """Train to the last epoch; the lock is released however this ends."""
        try:
            return self._fit()
        except NonFiniteCheckpoint as error:  # the last guard: never a non-finite checkpoint on disk
            raise self._diverged(f"({error})") from None
        except OSError as error:  # a write failed: say why in one line, and how to go on
            raise guard.write_failed(error, self.folder) from error
        finally:
            if self._loggers is not None:
                self._loggers.close()
                self._loggers = None
            self.close()

    def repair_finished_metrics(self) -> bool:
        """A finished run whose metrics.jsonl lacks epochs its checkpoint holds (a kill between saving
        the last epoch's checkpoint and appending its line): rewrite the file from the checkpoint's
        history, which is the record; an unreadable config.json too. True when metrics.jsonl was rewritten."""
        if not self.ctx.is_main or self.start_epoch <= self.config.epochs:
            return False
        runfiles.repair_config(self.folder, self.start, self._document())
        return runfiles.repair_metrics(self.folder, self.history)

    def _document(self) -> dict:
        return runfiles.config_document(self.start, self.method.settings, self.ctx.world_size, self.ctx.device,
                                        self.fingerprint)

    def _begin(self) -> None:
        """The run's files take effect (rank 0): new-run files, or the resume's repairs; the resume's
        changes and events are written with its first checkpoint (``records``)."""
        document = self._document()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.records = runfiles.ResumeRecords(self.folder, self.start, document)
        if self.start.resumable is None:
            runfiles.write_new_run(self.folder, document, self.model, self.data)
        else:
            runfiles.record_resume(self.folder, self.start, document, self.history)
        if self.logger_names:
            self._loggers = SafeLoggers(self.logger_names, self.out_dir, self.start_epoch, self.callbacks.log)
            self._loggers.start({key: document[key] for key in ("config", "method", "derived", "world_size", "device")})

    def _fit(self) -> list[dict]:
        if self.start_epoch > self.config.epochs:  # a finished run: nothing trains, nothing is recorded
            self.repair_finished_metrics()
            return self.history
        if self.ctx.is_main:
            self._begin()
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            if self.stop_reason is not None and self.progress.partial is None and not self.ctx.enabled:
                # between epochs: the previous epoch's checkpoint is the state to resume from
                raise TrainingInterrupted(self.stop_reason, epoch, 0, 0, saved=epoch > 1)
            record = self.train_epoch(epoch)
            if self.evaluator.due(epoch):
                self.evaluate_epoch(record)
            best = best_after(record, self.best)
            improved = best is not self.best
            self.progress = Progress(epoch, self.history + [record], best)
            self._check_finite(None, f"at epoch {epoch}")
            rng = rng_states(self.ctx)
            if self.ctx.is_main:
                runfiles.save_checkpoint(self.folder, dump(self.parts, self.progress, self.info, rng),
                                         f"epoch {epoch}", self.tracker, self.records, best=improved)
                self.folder.append_metrics(record)
                if self._loggers is not None:
                    self._loggers.log_epoch(record)
            self.ctx.barrier()
            self.callbacks.epoch_end(record)
        return self.history

    # ------------------------------------------------------------------ an epoch
    def prepare_batch(self, index, generator):
        """Cut a batch out of the device-resident training set and augment it there."""
        x = self.parts.augment(to_float(self.train_images[index]), generator)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.train_labels[index], index

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of training; raises TrainingInterrupted (after saving last.pt) on a requested stop."""
        config, ctx, parts = self.config, self.ctx, self.parts  # the step reads the parts directly (hot path)
        method, model, optimizer = parts.method, parts.model, parts.optimizer
        partial = self.progress.partial if self.progress.partial and self.progress.partial["epoch"] == epoch else None
        self.progress.partial = None
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        record = {"epoch": epoch, "lr": lr}
        record.update(method.on_epoch_start(epoch))
        per_rank = config.batch_size // ctx.world_size
        batches = list(epoch_batches(len(self.data.train), per_rank, seed=config.seed, epoch=epoch, rank=ctx.rank,
                                     world_size=ctx.world_size))
        # Augmentation draws from its own generator, a pure function of (seed, epoch, rank).
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 7_919 + ctx.rank)
        sums: dict[str, torch.Tensor] = {}
        first_step, seconds_before = 0, 0.0
        if partial is not None:  # resuming a mid-epoch checkpoint: the loop state of its last step
            own = own_loop_state(partial, ctx, model)
            generator.set_state(own["augment_rng"])
            sums = {k: v.to(ctx.device) for k, v in own["sums"].items()}
            first_step, seconds_before = partial["step"], partial["train_seconds"]

        def add(name, value, weight):
            value = value.detach().float() * weight
            sums[name] = sums[name] + value if name in sums else value

        self.callbacks.epoch_begin(epoch, len(batches))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        if self.tracker is not None:
            self.tracker.begin_epoch(epoch, partial.get("track") if partial is not None else None)
        # One copy of the epoch's order to the device; batches are views of it.
        device_batches = torch.cat(batches).to(ctx.device).split(per_rank) if batches else []
        total = len(device_batches)
        for step, index in enumerate(device_batches):
            if step < first_step:
                continue
            if parts.cuda_graphs:  # a new iteration: the previous step's graph outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            x, y, index = self.prepare_batch(index, generator)
            with self.autocast():
                x_adv = method.attack(parts.attack_model, x, y, index, epoch)
            parts.train_model.train()
            method.before_loss(model, x, x_adv, y, index, epoch)
            with self.autocast():
                loss, logs = method.loss(parts.train_model, x, x_adv, y, index, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                [p.grad for p in params if p.grad is not None])))
            method.before_step(model, optimizer, epoch)
            optimizer.step()
            n = torch.full((), float(len(y)), device=ctx.device)  # a fill, not a host-to-device copy
            add("train_loss", loss, n)
            add("grad_norm", grad_norm, 1.0)
            add("_samples", n, 1.0)
            add("_steps", torch.ones((), device=ctx.device), 1.0)
            for name, value in logs.items():
                add(name, value, n)
            if self.tracker is not None:
                self.tracker.record(model, self.autocast, x_adv, y, index)
            self.callbacks.step()
            done = step + 1
            if done == total:
                break
            stop = guard.stop_agreed(ctx, self.stop_reason is not None, done)
            if stop or (self.checkpoint_every_steps and done % self.checkpoint_every_steps == 0):
                self._save_partial(epoch, done, generator, sums, seconds_before + time.perf_counter() - start)
            if stop:
                raise TrainingInterrupted(self.stop_reason or "a stop request of another process", epoch, done,
                                          total, saved=True)
        if self.tracker is not None:
            self.tracker.end_epoch(epoch)
        if ctx.enabled:
            # BatchNorm running statistics drift apart per rank (each sees its own shard); keep rank
            # 0's, which the checkpoint holds, so evaluation agrees and a resumed run is exact.
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        record["train_seconds"] = seconds_before + time.perf_counter() - start
        names = sorted(sums)
        totals = dict(zip(names, ctx.all_reduce_sum(torch.stack([sums[k] for k in names])).cpu().tolist()))
        samples, steps = totals.pop("_samples"), totals.pop("_steps")
        for name, total in totals.items():
            record[name] = total / (steps if name == "grad_norm" else samples)
        if not all(math.isfinite(v) for v in (record["train_loss"], record["grad_norm"])):
            raise self._diverged(f"at epoch {epoch} (loss {record['train_loss']}, grad norm {record['grad_norm']})")
        return record

    def _save_partial(self, epoch: int, done: int, generator, sums: dict, seconds: float) -> None:
        """A mid-epoch checkpoint: the state after ``done`` steps of ``epoch`` (resumed bit-identically)."""
        self._check_finite(sums.get("train_loss"), f"in epoch {epoch} (by step {done})")
        rng = rng_states(self.ctx)
        partial = epoch_loop_state(self.ctx, self.model, epoch, done, generator.get_state(), sums, seconds,
                                   self.tracker.partial_records() if self.tracker is not None else None)
        if not self.ctx.is_main:
            return
        state = dump(self.parts, Progress(epoch - 1, self.history, self.best, partial), self.info, rng)
        runfiles.save_checkpoint(self.folder, state, f"epoch {epoch}, step {done}", self.tracker, self.records)
