"""One process per run folder: a lock file naming its holder (PID, host, start time).

Two ``at-mem train`` processes writing one folder would interleave ``metrics.jsonl`` and overwrite
each other's checkpoints, so the second one stops at once, naming the first. The lock is a plain
file created with ``O_CREAT | O_EXCL``, which is atomic on local file systems (on network file
systems it depends on the server; not tested).

A lock whose holder is gone does not block: on the same host a dead PID is detected and the lock
is taken over (with a notice). A holder on another host cannot be checked from here, so such a
lock blocks until that process ends or someone deletes the file; the error message says so.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The run folder is in use by another process; the message names it."""


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: certain only on this host (elsewhere: assume it does)."""
    if holder.get("host") != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False  # this process itself (an earlier Trainer that was never closed)
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _busy_message(run_dir: Path, holder: dict, path: Path) -> str:
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    return (f"{run_dir} is in use by PID {holder['pid']} on {where} (since {holder.get('started', '?')}); "
            f"wait for it to finish or stop it; if that process is gone, delete {path}")


def check_free(run_dir: str | Path) -> None:
    """Fail early (before minutes of data loading) if a live process holds the folder."""
    path = Path(run_dir) / LOCK_NAME
    holder = _read_holder(path)
    if holder is not None and _alive(holder):
        raise RunLockError(_busy_message(Path(run_dir), holder, path))


class RunLock:
    """Held from :meth:`acquire` to :meth:`release` (both idempotent)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False
        self.notice: str | None = None  # set when a stale lock was taken over

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is not None and _alive(holder):
                    raise RunLockError(_busy_message(self.run_dir, holder, self.path)) from None
                # A dead holder (or an unreadable lock: a holder killed mid-write): take it over.
                ours = holder is not None and holder["pid"] == os.getpid()
                gone = f"PID {holder['pid']}, which is no longer running" if holder else "an unreadable lock file"
                self.notice = None if ours else f"took over the lock of {self.run_dir} from {gone}"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "command": " ".join(sys.argv)[:500]}, handle)
            self.held = True
            return self
        raise RunLockError(f"{self.run_dir}: could not take the lock {self.path} (other processes keep taking it)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read_holder(self.path)
        if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
