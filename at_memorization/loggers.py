"""Experiment logging: TensorBoard and Weights & Biases, beside ``metrics.jsonl`` (the record of truth).

A logger receives the run's resolved settings once (``start``) and each epoch's record
(``log_epoch``: every number in it, as a scalar at step = epoch). Loggers are registered by name in
``LOGGERS`` (``at-mem train --logger NAME``, repeatable). Logging never breaks a run:
``SafeLoggers`` turns any failure of a logger (a missing package, a full disk, a network error) into
one warning line and stops using that logger; training goes on. A logger's folder that cannot be
written (``check_names`` with the run folder) is refused before the run starts instead, as an
``--out`` that cannot be written is: a warning in a long unattended run's log is easily missed.

- ``tensorboard``: event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``; needs the
  ``tensorboard`` package, installed with ``pip install ".[tensorboard]"``). The settings are logged
  as text (``settings``) and as hyperparameters. A resumed run first drops events at and after the
  epoch it resumes from (TensorBoard's ``purge_step``), so a curve has one value per epoch.
- ``wandb``: a Weights & Biases run (``pip install ".[wandb]"``), files under ``RUN/wandb/``, its id
  kept in ``RUN/wandb-id.txt`` so that ``--resume`` continues the same W&B run. The project comes
  from ``WANDB_PROJECT`` (default ``at-memorization``); ``WANDB_MODE=offline`` logs without a network.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable

from .atomic import check_writable_folder, write_text_atomic
from .runfolder import RunFolder
from .user_errors import UserError


def _scalars(record: dict) -> dict[str, float]:
    """The numbers of an epoch record (booleans and non-finite values left out)."""
    return {key: float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and key != "epoch"}


class TensorBoardLogger:
    name = "tensorboard"
    extra = "tensorboard"  # pip install ".[extra]" brings what it needs

    @staticmethod
    def folder(run_dir: Path) -> Path:
        return RunFolder(run_dir).tensorboard_dir

    def __init__(self, run_dir: Path, start_epoch: int):
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without tensorboard

        self.path = self.folder(run_dir)
        # purge_step: a resumed run replaces what a killed run logged after its checkpoint
        self.writer = SummaryWriter(str(self.path), purge_step=start_epoch if start_epoch > 1 else None)

    def start(self, settings: dict) -> None:
        self.writer.add_text("settings", "```\n" + json.dumps(settings, indent=2) + "\n```", 0)
        flat = {k: v for k, v in {**settings.get("config", {}), **settings.get("method", {})}.items()
                if isinstance(v, (int, float, str, bool))}
        self.writer.add_hparams(flat, {}, run_name=".")

    def log_epoch(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    name = "wandb"
    extra = "wandb"

    @staticmethod
    def folder(run_dir: Path) -> Path:
        return RunFolder(run_dir).wandb_dir

    def __init__(self, run_dir: Path, start_epoch: int):
        import wandb  # raises ImportError without the wandb extra

        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.id_file = RunFolder(run_dir).wandb_id
        self.run = None

    def start(self, settings: dict) -> None:
        wandb = self.wandb
        run_id = self.id_file.read_text().strip() if self.id_file.is_file() else secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "at-memorization"), id=run_id,
                              resume="allow", name=self.run_dir.name, dir=str(self.run_dir), config=settings)
        if not self.id_file.is_file():
            write_text_atomic(run_id + "\n", self.id_file)

    def log_epoch(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["epoch"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


LOGGERS = {logger.name: logger for logger in (TensorBoardLogger, WandbLogger)}


class UnknownLoggerError(UserError, ValueError):
    """A logger name that is not one of ``LOGGERS``."""


def check_names(names, run_dir: str | Path | None = None) -> None:
    """Refuse an unknown logger name and, given the run folder, a logger's folder that cannot be written
    (a WriteError naming it): before a run does any work."""
    unknown = [name for name in names if name not in LOGGERS]
    if unknown:
        raise UnknownLoggerError(f"unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)}")
    for name in dict.fromkeys(names) if run_dir is not None else ():
        folder = getattr(LOGGERS[name], "folder", None)  # a logger that writes files in the run folder says where
        if folder is not None:
            check_writable_folder(folder(Path(run_dir)), f"--logger {name}:")


class SafeLoggers:
    """The run's loggers; a failing one is dropped with a warning (``warn``), never the run."""

    def __init__(self, names, run_dir: str | Path, start_epoch: int, warn: Callable[[str], None]):
        self.warn = warn
        self.loggers = []
        check_names(names)
        for name in dict.fromkeys(names):  # each once, in the order given
            try:
                self.loggers.append(LOGGERS[name](Path(run_dir), start_epoch))
            except ImportError as error:
                warn(f"warning: --logger {name} is off: {error.name or error} is not installed "
                     f"(pip install \".[{LOGGERS[name].extra}]\"); metrics.jsonl has everything")
            except Exception as error:  # noqa: BLE001  (any failure of a logger must not stop the run)
                self._failed(name, "start", error)

    def _call(self, method: str, *args) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as error:  # noqa: BLE001
                self.loggers.remove(logger)
                self._failed(logger.name, method, error)

    def _failed(self, name: str, what: str, error: Exception) -> None:
        detail = " ".join(str(error).split())[:200]
        self.warn(f"warning: --logger {name} failed ({what}: {type(error).__name__}: {detail}); it is off for "
                  f"the rest of the run, which goes on (metrics.jsonl has everything)")

    def start(self, settings: dict) -> None:
        self._call("start", settings)

    def log_epoch(self, record: dict) -> None:
        self._call("log_epoch", record)

    def close(self) -> None:
        self._call("close")
