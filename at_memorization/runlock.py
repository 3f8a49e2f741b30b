"""One process per run folder: a lock file naming its holder (PID, host, start time).

Two ``at-mem train`` processes writing one folder would interleave ``metrics.jsonl`` and overwrite
each other's checkpoints, so the second one stops at once, naming the first.

What the lock guarantees (on a local file system; on a network file system it rests on the server's
hard links, renames and locks: not tested):

* **One holder**, also when several processes call :meth:`RunLock.acquire` on one folder at the same
  instant (``tests/test_runlock_race.py``: 4 processes x 100 trials, from no lock, a stale lock and a
  garbage lock).
* **Complete before visible.** The holder record (PID, host, start, command and a random token) is
  written to a temporary file beside the lock (``.lock.<token>.tmp``), synced, and hard-linked to
  ``.lock``; ``os.link`` fails if ``.lock`` exists, so one process wins and no reader ever sees an
  empty or half-written lock. The temporary file is removed in any case.
* **A lock whose holder is gone does not block.** On the same host a dead PID is detected and the
  lock taken over (with a notice); a lock of this very process (an earlier lock never released) is
  taken over silently. Takers go one at a time (an ``flock`` of the run folder, released by the
  kernel if a taker dies), read the lock again, and move it aside with ``os.rename`` to a private
  name, which only one process can win. The moved file is compared byte for byte with the lock
  judged stale; if it differs, another process took that one over and linked a fresh lock in
  between (possible only where ``flock`` is unavailable): it is linked back and the folder reported
  busy. (Should a third process link its lock while the fresh one is aside, the link back fails and
  both believe they hold the folder: the one race that this fallback cannot exclude.) Only after a
  takeover is the taker's own lock linked.
* **Garbage.** A lock that is no holder record counts as garbage (a holder killed mid-write) only
  once it is 2 s old, and is taken over then; younger, it is read again every 50 ms, since an older
  version of this package created the file first and wrote it next.
* **Another host's lock blocks**: that holder cannot be checked from here, so the lock stays until
  that process ends or someone deletes the file; the error message says so.
* **Release** removes the lock only while it is still this :class:`RunLock`'s (same token), so it
  never deletes a lock that another process, or a later lock of this process, holds.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from .user_errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: takers are not serialized; the rename's check still applies
    fcntl = None

LOCK_NAME = ".lock"
GARBAGE_AGE_S = 2.0  # an unreadable lock younger than this may still be being written (older versions)
_REREAD_S = 0.05
_GUARD_WAIT_S = 5.0  # a takeover takes milliseconds; a guard held longer belongs to a stopped process
_ATTEMPTS = 10
# os.link's errors on file systems without hard links (FAT/exFAT, some FUSE and SMB mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class RunLockError(UserError, RuntimeError):
    """The run folder is in use by another process; the message names it."""


def _parse(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _read_raw(path: Path) -> bytes | None:
    """The lock's bytes, or None when there is no lock."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _read_holder(path: Path) -> dict | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


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


@contextlib.contextmanager
def _takeover_guard(run_dir: Path):
    """Changes of an existing lock, one process at a time: an exclusive ``flock`` of the run folder.

    Best effort: where the platform or file system refuses it (no ``fcntl``; NFS refuses it on a
    folder), or a process holds it for over ``_GUARD_WAIT_S`` (stopped mid-takeover), this goes on
    unguarded, and the takeover's byte-for-byte check of the moved lock is the protection left.
    """
    fd = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fd = os.open(run_dir, os.O_RDONLY)
    deadline = time.monotonic() + _GUARD_WAIT_S
    while fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
        except OSError:
            pass
        os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


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
        self.token: str | None = None  # in the lock file while this RunLock holds it

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500], "token": token}
        staged = self.run_dir / f"{LOCK_NAME}.{token}.tmp"
        try:
            fd = os.open(staged, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
                handle.flush()
                os.fsync(handle.fileno())
            for _ in range(_ATTEMPTS):
                if self._place(staged):
                    self.held, self.token = True, token
                    return self
                self._take_over_if_stale()  # raises if a live process holds it
        finally:
            staged.unlink(missing_ok=True)
        raise RunLockError(f"{self.run_dir}: could not take the lock {self.path} (other processes keep taking it)")

    def _place(self, source: Path) -> bool:
        """Make ``source`` the lock unless a lock exists (then False): atomic, and complete when visible."""
        try:
            os.link(source, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
        # No hard links on this file system: create the lock exclusively, then write it. A reader may
        # see it unwritten for a moment; the grace for young unreadable locks (GARBAGE_AGE_S) covers that.
        content = source.read_bytes()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _settled_lock(self) -> bytes | None:
        """The lock's bytes (None: gone); an unreadable one is read again until it parses or is old."""
        deadline = time.monotonic() + GARBAGE_AGE_S
        while True:
            try:
                with open(self.path, "rb") as handle:
                    raw = handle.read()
                    age = time.time() - os.fstat(handle.fileno()).st_mtime
            except FileNotFoundError:
                return None
            except OSError as error:
                raise RunLockError(f"{self.run_dir}: cannot read the lock {self.path}: {error}") from None
            if _parse(raw) is not None or age >= GARBAGE_AGE_S or time.monotonic() >= deadline:
                return raw
            time.sleep(_REREAD_S)

    def _take_over_if_stale(self) -> None:
        """Raise if a live process holds the lock; else remove the stale lock, if still there (then retry)."""
        judged = self._settled_lock()
        if judged is None:
            return  # released or taken over meanwhile
        holder = _parse(judged)
        if holder is not None and _alive(holder):
            raise RunLockError(_busy_message(self.run_dir, holder, self.path))
        with _takeover_guard(self.run_dir):
            if _read_raw(self.path) != judged:
                return  # another process took it over meanwhile: judge the new lock
            aside = self.run_dir / f"{LOCK_NAME}.{uuid.uuid4().hex}.stale"
            try:
                os.rename(self.path, aside)  # of several takers, one moves it; the others find no lock
            except FileNotFoundError:
                return
            try:
                moved = aside.read_bytes()
                if moved != judged:
                    # A fresh lock that another process linked after taking over the one judged here
                    # (only without the guard): put it back, and report the folder busy.
                    holder = _parse(moved)
                    if not self._place(aside):  # and yet another process linked its lock meanwhile
                        holder = _read_holder(self.path) or holder
                    if holder is None:
                        raise RunLockError(f"{self.run_dir}: could not take the lock {self.path} "
                                           "(other processes keep taking it)")
                    raise RunLockError(_busy_message(self.run_dir, holder, self.path))
            finally:
                aside.unlink(missing_ok=True)
        ours = holder is not None and holder["pid"] == os.getpid()
        gone = f"PID {holder['pid']}, which is no longer running" if holder else "an unreadable lock file"
        self.notice = None if ours else f"took over the lock of {self.run_dir} from {gone}"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _takeover_guard(self.run_dir):  # a later lock of this process may take it over meanwhile
            holder = _read_holder(self.path)
            if (holder is not None and holder.get("token") == self.token and holder["pid"] == os.getpid()
                    and holder.get("host") == socket.gethostname()):
                self.path.unlink(missing_ok=True)
