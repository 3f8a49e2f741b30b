"""The one owner of a run folder (``at-mem train --out RUN``): its file names, its lock, and every
read and write of its files.

What a run folder holds::

    config.json     the settings (run and method, resolved; which were derived), device, data fingerprint
    metrics.jsonl   one JSON object per finished epoch (the record of truth for report, plot, analysis)
    history.jsonl   what happened besides training: resumes, overrides, fallbacks, repairs
    last.pt         the newest checkpoint (end of an epoch, or mid-epoch with "partial")
    last-prev.pt    the checkpoint before it, kept for a fallback
    best.pt         the epoch with the highest test robust accuracy
    init.pt, labels.pt, tracking.pt, eval/best.json, eval/last.json, .lock

Guarantees (each tested in tests/test_settings_and_run_folder.py and tests/test_run_safety.py):

- Every file is written atomically (a temporary file, fsync, rename): a reader sees the old or the
  new version, never a partial one.
- A checkpoint with non-finite weights is never written to ``last.pt`` or ``best.pt``
  (:class:`NonFiniteCheckpoint`).
- ``last.pt`` is rotated to ``last-prev.pt`` only when it is known to be good (written by this
  process, or read back on resume): an unreadable ``last.pt`` never replaces a good ``last-prev.pt``.
- :attr:`RunFolder.last_good` always names a checkpoint that was checked to be readable and finite,
  so an error message can point at it.
- ``load_resumable`` passes over unreadable or non-finite checkpoints (``last.pt``, then
  ``last-prev.pt``); it suggests ``best.pt`` as a last resort only after checking it.
- A history event is written by the caller once it took effect (the trainer writes a resume's events,
  and the settings it changes, with the resume's first checkpoint, not when they are requested).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: concurrent merges of one eval record are not serialized
    fcntl = None

from .records import CHECKPOINT_NAMES, merge_eval_records
from .atomic import link_or_copy, write_text_atomic
from .runlock import LOCK_NAME, RunLock, check_free
from .user_errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
HISTORY = "history.jsonl"
LAST = "last.pt"
PREVIOUS = "last-prev.pt"
BEST = "best.pt"
INIT = "init.pt"
LABELS = "labels.pt"
TRACKING = "tracking.pt"
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"  # --logger tensorboard's event files
WANDB_ID = "wandb-id.txt"  # --logger wandb's run id, so that a resume continues the same W&B run
WANDB_DIR = "wandb"  # --logger wandb's files (wandb.init(dir=RUN) writes them there)


class RunFolderError(UserError, ValueError):
    """A run folder's file is missing or unreadable; the message names it, in one line."""


class NonFiniteCheckpoint(ValueError):
    """Refused to write a checkpoint whose weights are not finite (the run diverged)."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in_folder(name: str) -> property:
    return property(lambda self: self.path / name)


class RunFolder:
    """A run folder: ``RunFolder(path).metrics`` is its metrics file, ``.read_metrics()`` its records."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # (path, what) of the newest checkpoint known to be readable and finite; None: none yet
        self.last_good: tuple[Path, str] | None = None
        self._last_is_good = False  # whether last.pt itself is that checkpoint (then it may be rotated)

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ names
    def file(self, name: str) -> Path:
        return self.path / name

    # Each a path in the folder: RunFolder(p).metrics is p / "metrics.jsonl".
    config, metrics, history, last, previous, best = map(_in_folder, (CONFIG, METRICS, HISTORY, LAST, PREVIOUS, BEST))
    init, labels, tracking, lock_path = map(_in_folder, (INIT, LABELS, TRACKING, LOCK_NAME))
    eval_dir, tensorboard_dir, wandb_id, wandb_dir = map(_in_folder, (EVAL_DIR, TENSORBOARD_DIR, WANDB_ID, WANDB_DIR))

    def checkpoint(self, which: str) -> Path:
        """``RUN/best.pt`` or ``RUN/last.pt`` (``which``: one of ``records.CHECKPOINT_NAMES``)."""
        return self._named(which, self.path, ".pt")

    def eval_path(self, which: str) -> Path:
        """``RUN/eval/best.json`` or ``RUN/eval/last.json``."""
        return self._named(which, self.eval_dir, ".json")

    @staticmethod
    def _named(which: str, folder: Path, suffix: str) -> Path:
        if which not in CHECKPOINT_NAMES:
            raise ValueError(f"unknown checkpoint name {which!r}; use {' or '.join(CHECKPOINT_NAMES)}")
        return folder / f"{which}{suffix}"

    def report_files(self) -> list[Path]:
        """The files ``at-mem report`` reads (present or not): config.json, metrics.jsonl, eval/*.json."""
        return [self.config, self.metrics, *(self.eval_path(which) for which in CHECKPOINT_NAMES)]

    def holds_run(self) -> bool:
        """Whether a run wrote a checkpoint here (then a new run must not start in it)."""
        return self.last.is_file() or self.previous.is_file()

    # ------------------------------------------------------------------ the lock
    def check_free(self) -> None:
        check_free(self.path)

    def lock(self) -> RunLock:
        return RunLock(self.path)

    # ------------------------------------------------------------------ config.json
    def write_config(self, document: dict) -> None:
        write_text_atomic(json.dumps(document, indent=2) + "\n", self.config)

    def read_config(self) -> dict:
        """config.json, checked: a JSON object with a "config" object naming method and data set."""
        document = read_json(self.config)
        config = document.get("config") if isinstance(document, dict) else None
        if not isinstance(config, dict) or "method" not in config or "dataset" not in config:
            raise RunFolderError(f"{self.config}: no \"config\" object with the run's settings")
        return document

    # ------------------------------------------------------------------ metrics.jsonl
    def start_metrics(self) -> None:
        write_text_atomic("", self.metrics)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def rewrite_metrics(self, records: list[dict]) -> None:
        write_text_atomic("".join(json.dumps(r) + "\n" for r in records), self.metrics)

    def metrics_text(self) -> str:
        """metrics.jsonl as text, "" when there is none: the one place the file is read. A file that is
        not text (bytes that are not UTF-8: the trainer writes ASCII) is a RunFolderError naming it."""
        try:
            return self.metrics.read_text()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError) as failure:
            raise RunFolderError(_cannot_read(self.metrics, failure)) from None

    def read_metrics_so_far(self) -> list[dict]:
        """The records of a run that may be writing, tolerant where ``read_metrics`` is strict (for
        ``at-mem reproduce``, which reads its study while the runs write): a line cut by a kill is left
        out (the trainer repairs it on resume), and no file is no records. An unreadable file is still
        a RunFolderError: no kill writes one."""
        records = []
        for line in self.metrics_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def read_metrics(self, *, allow_empty: bool = False) -> list[dict]:
        """The per-epoch records, in epoch order: the one reader of metrics.jsonl.

        Each record has an int ``epoch``; ``test_clean_acc``/``test_robust_acc`` (and the other
        ``*_acc`` values) are numbers where present: epochs skipped by ``--eval-every`` have none.
        """
        path = self.metrics
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        if not path.is_file():
            raise RunFolderError(f"{self.path} is not a run folder (no {METRICS}; `at-mem train --out` writes one)")
        records = []
        for number, line in enumerate(self.metrics_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RunFolderError(f"{path}: not valid JSON on line {number} ({error.msg})") from error
            if not isinstance(record, dict):
                raise RunFolderError(f"{path}: line {number} is not a JSON object")
            epoch = record.get("epoch")
            if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1):
                raise RunFolderError(f"{path}: line {number} lacks an epoch number")
            for key, value in record.items():
                if key.endswith("_acc") and not _is_number(value):
                    raise RunFolderError(f"{path}: line {number}: {key!r} is not a number")
            records.append(record)
        if not records and not allow_empty:
            raise RunFolderError(f"{path} is empty: the run has not finished an epoch yet")
        return sorted(records, key=lambda r: r["epoch"])

    # ------------------------------------------------------------------ eval/<checkpoint>.json
    def read_eval(self, which: str):
        """``eval/<which>.json`` as parsed JSON (not checked to be a record), None when absent; an
        unreadable file is a RunFolderError naming it."""
        path = self.eval_path(which)
        return read_json(path) if path.exists() else None

    def write_eval(self, which: str, record: dict) -> None:
        write_text_atomic(json.dumps(record, indent=2) + "\n", self.eval_path(which))

    def merge_eval(self, which: str, record: dict, requested=None) -> tuple[dict, str | None]:
        """Merge ``record`` into ``eval/<which>.json`` as it is now (``records.merge_eval_records``),
        reading, merging and writing under an exclusive lock: two evaluations of one run at once
        (two ``at-mem evaluate RUN``) each add their results, neither drops the other's. Returns the
        merged record and why an earlier one was replaced (or None)."""
        with self._eval_lock(which):
            merged, replaced = merge_eval_records(self.read_eval(which), record, requested=requested)
            self.write_eval(which, merged)
        return merged, replaced

    @contextlib.contextmanager
    def _eval_lock(self, which: str):
        """An exclusive ``flock`` of ``eval/.lock.<which>`` for the few milliseconds of a merge (the
        kernel releases it if the holder dies; the file stays, ignored like the run's own lock)."""
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        with open(self.eval_dir / f"{LOCK_NAME}.{which}", "a") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ history.jsonl
    def record_event(self, event: str, **details) -> None:
        """One line in history.jsonl; call it once the event took effect."""
        line = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "event": event, **details}
        with open(self.history, "a") as handle:
            handle.write(json.dumps(line) + "\n")

    def read_history(self) -> list[dict]:
        if not self.history.is_file():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ checkpoints
    def save_last(self, state: dict, what: str) -> None:
        """Write ``last.pt``, keeping the file it replaces as ``last-prev.pt`` when that file is known
        good. ``what`` says which state it is (e.g. "epoch 3"), for messages naming it later."""
        from . import checkpoint as ckpt

        self._refuse_non_finite(state, LAST)
        if self._last_is_good and self.last.is_file():
            link_or_copy(self.last, self.previous)
            self.last_good = (self.previous, self.last_good[1]) if self.last_good else None
        self._last_is_good = False  # until the new file is in place
        ckpt.save_atomic(state, self.last)
        self._last_is_good = True
        self.last_good = (self.last, what)

    def save_best(self, state: dict) -> None:
        from . import checkpoint as ckpt

        self._refuse_non_finite(state, BEST)
        ckpt.save_atomic(state, self.best)

    def _refuse_non_finite(self, state: dict, name: str) -> None:
        from . import checkpoint as ckpt

        try:
            ckpt.check_finite_weights(state, self.path / name)
        except ckpt.CheckpointError as error:
            raise NonFiniteCheckpoint(f"not written: {error}") from None

    def load_resumable(self, map_location="cpu") -> tuple[Path, dict, str | None]:
        """The checkpoint a run resumes from: ``last.pt``, else ``last-prev.pt``, each only if readable
        and finite. Returns (path, state, why the newer one was passed over or None); with neither
        usable, a CheckpointError that names ``best.pt`` only if it was checked to be usable."""
        from . import checkpoint as ckpt

        errors = []
        for path in (self.last, self.previous):
            if not path.is_file():
                continue
            try:
                state = ckpt.load_checkpoint(path, map_location=map_location)
                ckpt.check_finite_weights(state, path)
            except ckpt.CheckpointError as error:
                errors.append(str(error))
                continue
            self._last_is_good = path == self.last
            self.last_good = (path, describe_checkpoint(state))
            return path, state, (errors[0] if errors else None)
        if not errors:
            raise ckpt.CheckpointError(f"--resume: {self.last} not found (nothing to resume)")
        raise ckpt.CheckpointError(f"--resume: no usable checkpoint in {self.path} ({'; '.join(errors)})"
                                   f"{self._best_as_last_resort()}")

    def _best_as_last_resort(self) -> str:
        from . import checkpoint as ckpt

        if not self.best.is_file():
            return ""
        try:
            state = ckpt.load_checkpoint(self.best)
            ckpt.check_finite_weights(state, self.best)
        except ckpt.CheckpointError:
            return f"; {self.best} is not usable either"
        return (f"; {self.best} ({describe_checkpoint(state)}) is readable and finite: copy it to {self.last} "
                f"to resume from its epoch")

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a write that was killed (ours are named .<file>.<random>.tmp)."""
        for stale in self.path.glob(".*.tmp"):
            if not stale.name.startswith(LOCK_NAME + "."):  # a lock being taken right now
                stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ tracking.pt
    def save_tracking(self, tracked: dict) -> None:
        from .checkpoint import save_atomic

        save_atomic(tracked, self.tracking)


def describe_checkpoint(state: dict) -> str:
    """"epoch 3" or "epoch 4, step 12" (a mid-epoch checkpoint)."""
    partial = state.get("partial")
    if isinstance(partial, dict):
        return f"epoch {partial.get('epoch')}, step {partial.get('step')}"
    return f"epoch {state.get('epoch')}"


def read_text(path: str | Path, error: type[Exception], name: str | None = None) -> str:
    """A text file's content, or ``error`` naming it (``name``, by default its path) in one line."""
    name = name or str(path)
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as failure:
        raise error(_cannot_read(name, failure)) from failure


def _cannot_read(name, failure: OSError | UnicodeDecodeError) -> str:
    """"NAME: cannot read (why)", in one line."""
    if isinstance(failure, UnicodeDecodeError):
        why = f"not UTF-8 text: byte {failure.object[failure.start]:#04x} at offset {failure.start}"
    else:
        why = getattr(failure, "strerror", None) or failure
    return f"{name}: cannot read ({why})"


def read_json(path: str | Path):
    """A JSON file, or RunFolderError naming it."""
    text = read_text(path, RunFolderError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
