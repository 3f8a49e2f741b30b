"""One process per run folder: a lock file naming its holder (PID, host, start time, lease).

Two ``at-mem train`` processes writing one folder would interleave ``metrics.jsonl`` and overwrite
each other's checkpoints, so the second one stops at once, naming the first.

What the lock guarantees (on a local file system; on a network file system it rests on the server's
hard links, renames and locks: not tested):

* **One holder**, also when several processes call :meth:`RunLock.acquire` on one folder at the same
  instant (``tests/test_runlock_race.py``: 4 processes x 100 trials, from no lock, a stale lock and a
  garbage lock).
* **Complete before visible.** The holder record (PID, host, start, command, a random token, the
  lease and, under SLURM, the job id and restart count) is written to a temporary file beside the
  lock (``.lock.<token>.tmp``), synced, and hard-linked to ``.lock``; ``os.link`` fails if ``.lock``
  exists, so one process wins and no reader ever sees an empty or half-written lock. The temporary
  file is removed in any case. The record never changes while it is the lock.
* **A lease.** While a :class:`RunLock` holds the folder, a daemon thread renews the lock every
  third of its lease (``lease_s`` in the record: ``DEFAULT_LEASE_S`` = 60 s, or
  ``AT_MEM_LOCK_LEASE_S`` seconds) by setting the lock file's modification time to now. It opens the
  lock, checks that the file carries this RunLock's token and touches that very file (``os.utime``
  of the open descriptor): it never touches a lock another process took over, and never creates
  one. :meth:`RunLock.release` stops the thread before it removes the lock.
* **A lock whose holder is gone does not block.** Takers judge the holder:

  - on the same host, by its PID: a dead PID is stale (taken over with a notice); a lock of this
    very process (an earlier lock never released) is taken over silently;
  - on another host, by its lease: stale once not renewed for ``EXPIRY_LEASES`` (3) leases of the
    holder's own ``lease_s`` (3 minutes by default), judged by the lock's modification time against
    this host's clock. This assumes what the hosts of one cluster provide: a shared file system
    and clocks that agree within a small part of that time (NTP keeps them within milliseconds);
    the margin also covers an NFS client's attribute cache (60 s at most by default). A holder that
    cannot renew for that long while it lives (suspended by SLURM's ``PreemptMode=SUSPEND`` or with
    its machine frozen for minutes) loses the lock: a lease cannot tell it from a dead one;
  - under SLURM, by the job: a holder record of the same ``SLURM_JOB_ID`` with a lower
    ``SLURM_RESTART_COUNT`` than this process's is a previous run of this requeued job, which
    SLURM ended before the requeue started (it runs one instance of a job at a time; a node declared
    down while cut off from the controller, its processes still running, is where this trusts
    SLURM): taken over at once, on any host. The same job id with the same count is not proof (the steps of one job, or
    its tasks on several nodes, run at the same time), so it is judged as above;
  - a lock of another host without a lease (written by an older version, which never renewed it)
    blocks as before: its age says nothing about its holder, so it stays until someone deletes it;
    the error message says so.

  A holder that is not provably gone is never displaced; the error names it and, for another
  host's, says when its lease was renewed and after how long it is taken over. Takers go one at a
  time (an ``flock`` of the run folder, released by the kernel if a taker dies), read the lock again
  (content and modification time: a renewal in between means its holder lives), and move it aside
  with ``os.rename`` to a private name, which only one process can win. The moved file is compared
  with the lock judged stale, bytes and modification time; if it differs, its holder renewed it
  meanwhile, or another process took that one over and linked a fresh lock in between (possible
  only where ``flock`` is unavailable): it is linked back and the folder reported busy. (Should a
  third process link its lock while the fresh one is aside, the link back fails and both believe
  they hold the folder: the one race that this fallback cannot exclude.) Only after a takeover is
  the taker's own lock linked.
* **Garbage.** A lock that is no holder record counts as garbage (a holder killed mid-write) only
  once it is 2 s old, and is taken over then; younger, it is read again every 50 ms, since an older
  version of this package created the file first and wrote it next.
* **Release** removes the lock only while it is still this :class:`RunLock`'s (same token), so it
  never deletes a lock that another process, or a later lock of this process, holds.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import socket
import sys
import threading
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
LEASE_ENV = "AT_MEM_LOCK_LEASE_S"
DEFAULT_LEASE_S = 60.0  # renewed every third of it; the holder's own lease_s is what a taker applies
EXPIRY_LEASES = 3  # another host's holder is gone once its lock was not renewed for this many leases
_REREAD_S = 0.05
_GUARD_WAIT_S = 5.0  # a takeover takes milliseconds; a guard held longer belongs to a stopped process
_ATTEMPTS = 10
# os.link's errors on file systems without hard links (FAT/exFAT, some FUSE and SMB mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class RunLockError(UserError, RuntimeError):
    """The run folder's lock cannot be taken (another process holds it, or the lease setting is
    wrong); the message says why."""


def lease_seconds() -> float:
    """The lease of the locks this process takes: ``AT_MEM_LOCK_LEASE_S``, else ``DEFAULT_LEASE_S``."""
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return DEFAULT_LEASE_S
    try:
        lease = float(raw)
    except ValueError:
        lease = math.nan
    if not (math.isfinite(lease) and lease > 0):
        raise RunLockError(f"{LEASE_ENV}={raw!r}: give the run lock's lease as a positive number of seconds "
                           f"(default {DEFAULT_LEASE_S:g})")
    return lease


def _slurm_run() -> tuple[str, int] | None:
    """This process's SLURM job id and restart count (how often the job was requeued), outside SLURM None."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        return job, int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return job, 0


def _parse(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _positive_number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _read_holder(path: Path) -> dict | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _read_lock(path: Path) -> tuple[bytes, int] | None:
    """The lock's bytes and modification time (ns; the last renewal), or None when there is no lock.

    Read through one open descriptor: both describe one file, and on NFS the open fetches fresh
    attributes (close-to-open consistency) instead of cached ones."""
    try:
        with open(path, "rb") as handle:
            return handle.read(), os.fstat(handle.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None


def _renewed_ago(state: tuple[bytes, int]) -> float:
    return max(0.0, time.time() - state[1] / 1e9)  # a renewal "in the future" (clock skew): just renewed


def _this_process(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname() and holder["pid"] == os.getpid()


def _slurm_job(holder: dict) -> str:
    job = holder.get("slurm_job_id")
    return f" (SLURM job {job})" if job else ""


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def _why_gone(holder: dict, renewed_ago: float) -> str | None:
    """Why the holder can no longer write (the words of the takeover notice), or None if it may."""
    if _this_process(holder):
        return "this process"  # an earlier RunLock that was never released
    pid, host = holder["pid"], holder.get("host")
    ours = _slurm_run()
    if ours is not None and holder.get("slurm_job_id") == ours[0]:
        restarts = holder.get("slurm_restart_count")
        restarts = restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else 0
        if restarts < ours[1]:
            return (f"PID {pid} on host {host} (SLURM job {ours[0]}, restart {restarts}), which this requeued run "
                    f"of the job (restart {ours[1]}) replaces")
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"PID {pid}, which is no longer running"
        except PermissionError:  # exists, owned by someone else
            pass
        return None
    lease = _positive_number(holder.get("lease_s"))
    if lease is not None and renewed_ago > lease * EXPIRY_LEASES:
        return (f"PID {pid} on host {host}{_slurm_job(holder)}, whose lease was last renewed {_seconds(renewed_ago)} "
                f"ago (it expires after {_seconds(lease * EXPIRY_LEASES)})")
    return None  # a lease still running, or none (an older version's lock): its holder cannot be checked from here


def _busy_message(run_dir: Path, holder: dict, path: Path, renewed_ago: float) -> str:
    here = holder.get("host") == socket.gethostname()
    where = "this host" if here else f"host {holder.get('host')}"
    said = (f"{run_dir} is in use by PID {holder['pid']} on {where}{_slurm_job(holder)} "
            f"(since {holder.get('started', '?')})")
    lease = _positive_number(holder.get("lease_s"))
    if here or lease is None:
        return f"{said}; wait for it to finish or stop it; if that process is gone, delete {path}"
    return (f"{said}; its lease was renewed {_seconds(renewed_ago)} ago, and it is taken over once not renewed for "
            f"{_seconds(lease * EXPIRY_LEASES)}; wait for it to finish or stop it")


@contextlib.contextmanager
def _takeover_guard(run_dir: Path):
    """Changes of an existing lock, one process at a time: an exclusive ``flock`` of the run folder.

    Best effort: where the platform or file system refuses it (no ``fcntl``; NFS refuses it on a
    folder), or a process holds it for over ``_GUARD_WAIT_S`` (stopped mid-takeover), this goes on
    unguarded, and the takeover's check of the moved lock is the protection left.
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
    try:
        state = _read_lock(path)
    except OSError:  # unreadable here: acquire judges it (and says so)
        state = None
    holder = _parse(state[0]) if state else None
    if holder is not None and _why_gone(holder, _renewed_ago(state)) is None:
        raise RunLockError(_busy_message(Path(run_dir), holder, path, _renewed_ago(state)))


def _renew_while_held(path: Path, token: str, every_s: float, stop: threading.Event) -> None:
    """The lease's renewals: touch the lock every ``every_s`` while it carries ``token``, until ``stop``."""
    warned = False
    while not stop.wait(every_s):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # moved aside by a takeover in progress (it may be put back) or deleted: nothing to renew
        except OSError as error:
            warned = warned or _warn_unrenewed(path, error)
            continue
        try:
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
            holder = _parse(raw)
            if holder is not None and holder.get("token") == token:
                # the descriptor's file is the one just read: a lock linked meanwhile by a taker is never touched
                os.utime(fd if os.utime in os.supports_fd else path)
        except OSError as error:
            warned = warned or _warn_unrenewed(path, error)
        finally:
            os.close(fd)


def _warn_unrenewed(path: Path, error: OSError) -> bool:
    print(f"warning: cannot renew the lease of the run lock {path} ({error.strerror or error}); a process on "
          "another host may take the run folder over once the lease expires", file=sys.stderr, flush=True)
    return True


class RunLock:
    """Held from :meth:`acquire` to :meth:`release` (both idempotent); its lease renewed meanwhile."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False
        self.notice: str | None = None  # set when a stale lock was taken over
        self.token: str | None = None  # in the lock file while this RunLock holds it
        self._stop_renewal: threading.Event | None = None
        self._renewal: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        if self.held:
            return self
        lease = lease_seconds()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:500], "token": token, "lease_s": lease}
        slurm = _slurm_run()
        if slurm is not None:
            record["slurm_job_id"], record["slurm_restart_count"] = slurm
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
                    self._start_renewal(lease / 3)
                    return self
                self._take_over_if_stale()  # raises if a live process holds it
        finally:
            staged.unlink(missing_ok=True)
        raise RunLockError(f"{self.run_dir}: could not take the lock {self.path} (other processes keep taking it)")

    def _start_renewal(self, every_s: float) -> None:
        self._stop_renewal = threading.Event()
        self._renewal = threading.Thread(target=_renew_while_held, name=f"lease of {self.path}", daemon=True,
                                         args=(self.path, self.token, every_s, self._stop_renewal))
        self._renewal.start()

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

    def _settled_lock(self) -> tuple[bytes, int] | None:
        """The lock's bytes and modification time (None: gone); an unreadable one is read again until it
        parses or is old."""
        deadline = time.monotonic() + GARBAGE_AGE_S
        while True:
            try:
                state = _read_lock(self.path)
            except OSError as error:
                raise RunLockError(f"{self.run_dir}: cannot read the lock {self.path}: {error}") from None
            if (state is None or _parse(state[0]) is not None or _renewed_ago(state) >= GARBAGE_AGE_S
                    or time.monotonic() >= deadline):
                return state
            time.sleep(_REREAD_S)

    def _take_over_if_stale(self) -> None:
        """Raise if a live process holds the lock; else remove the stale lock, if still there (then retry)."""
        judged = self._settled_lock()
        if judged is None:
            return  # released or taken over meanwhile
        holder = _parse(judged[0])
        gone = "an unreadable lock file" if holder is None else _why_gone(holder, _renewed_ago(judged))
        if gone is None:
            raise RunLockError(_busy_message(self.run_dir, holder, self.path, _renewed_ago(judged)))
        with _takeover_guard(self.run_dir):
            if _read_lock(self.path) != judged:
                return  # renewed by its holder, or taken over by another process meanwhile: judge it again
            aside = self.run_dir / f"{LOCK_NAME}.{uuid.uuid4().hex}.stale"
            try:
                os.rename(self.path, aside)  # of several takers, one moves it; the others find no lock
            except FileNotFoundError:
                return
            try:
                moved = _read_lock(aside)
                if moved != judged:
                    # Renewed by its holder after the look above, or a fresh lock that another process
                    # linked after taking over the one judged here (only without the guard): put it
                    # back, and report the folder busy.
                    shown = moved
                    if not self._place(aside):  # and yet another process linked its lock meanwhile
                        newest = _read_lock(self.path)
                        shown = newest if newest is not None and _parse(newest[0]) is not None else moved
                    holder = _parse(shown[0])
                    if holder is None:
                        raise RunLockError(f"{self.run_dir}: could not take the lock {self.path} "
                                           "(other processes keep taking it)")
                    raise RunLockError(_busy_message(self.run_dir, holder, self.path, _renewed_ago(shown)))
            finally:
                aside.unlink(missing_ok=True)
        self.notice = None if holder is not None and _this_process(holder) else \
            f"took over the lock of {self.run_dir} from {gone}"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop_renewal.set()
        self._renewal.join()  # no renewal after this: the lock is left alone from here on
        with _takeover_guard(self.run_dir):  # a later lock of this process may take it over meanwhile
            holder = _read_holder(self.path)
            if (holder is not None and holder.get("token") == self.token and holder["pid"] == os.getpid()
                    and holder.get("host") == socket.gethostname()):
                self.path.unlink(missing_ok=True)
