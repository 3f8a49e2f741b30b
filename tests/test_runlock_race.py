"""The run lock under real races: several processes calling ``RunLock.acquire`` on one folder at the
same instant, and the lock file as other processes see it while it is being made.

Before: two of them could both hold the lock (5/40 trials from no lock, 6/40 from a stale lock,
3/40 from a garbage lock, in the hostile tester's report): a created-but-not-yet-written lock read
as unreadable and was deleted, and a stale lock was deleted by both contenders. Each test here
failed on that code. (The race from another host's expired lease came with the lease, issue 29:
before it, nobody took such a lock; the lease itself is tested in tests/test_runlock_lease.py.)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from at_memorization import runlock
from at_memorization.runlock import LOCK_NAME, RunLock, RunLockError

# fork: the contenders start in milliseconds (spawn would import torch again in each of them)
CTX = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
CONTENDERS = 4
TRIALS = 100  # ~20 ms each; the old code failed 3-35 of 40 (machine load decides how many)
WAIT_S = 600  # a barrier or queue wait this long means a contender hung (each takes milliseconds): fail, never hang


def _dead_pid() -> int:
    """The PID of a process of this host that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _holder(pid: int, host: str | None = None, **lease) -> bytes:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-11-26T01:00:00",
                       "command": "at-mem train", **lease}).encode()


def _lock_files(run_dir: Path) -> list[str]:
    """The lock and anything a lock attempt may leave beside it (temporary or taken-over files)."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(LOCK_NAME)) if run_dir.exists() else []


@pytest.fixture
def live_pid():
    """A process of this host that runs for the whole test (and is not this process)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child.pid
    child.kill()
    child.wait()


# --------------------------------------------------------------------------- concurrent processes
def _contender(base: Path, trials: int, start, tried, released, results) -> None:
    """One process of the race: per trial, wait for the others, acquire, report, hold, release."""
    for trial in range(trials):
        lock = RunLock(base / f"trial{trial}")
        start.wait()
        try:
            lock.acquire()
            results.put((trial, "held", os.getpid(), lock.notice))
        except RunLockError as error:
            results.put((trial, "busy", os.getpid(), str(error)))
        except BaseException as error:  # noqa: BLE001 - reported, the parent fails the test
            results.put((trial, "error", os.getpid(), repr(error)))
        tried.wait()  # the holder keeps the lock until every contender has tried: the overlap is real
        time.sleep(0.01)
        lock.release()
        released.wait()


def _prepare(run_dir: Path, state: str, dead_pid: int) -> None:
    if state == "no lock":
        return  # not even the folder: acquire creates it (all contenders at once)
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    if state == "stale lock":
        lock.write_bytes(_holder(dead_pid))
    elif state == "expired lease":  # another host's holder, not renewed for 10 of its leases
        lock.write_bytes(_holder(dead_pid, "gpu-node-7", lease_s=60.0))
        old = time.time() - 600
        os.utime(lock, (old, old))
    else:  # garbage: a holder killed mid-write long ago (older than any write in progress could be)
        lock.write_bytes(b'{"pi')
        old = time.time() - 60
        os.utime(lock, (old, old))


@pytest.mark.parametrize("state", ["no lock", "stale lock", "expired lease", "garbage lock"])
def test_of_processes_acquiring_at_the_same_instant_exactly_one_holds_the_lock(tmp_path, state):
    dead_pid = _dead_pid()
    start, tried, released = (CTX.Barrier(CONTENDERS + 1, timeout=WAIT_S) for _ in range(3))
    results = CTX.Queue()
    procs = [CTX.Process(target=_contender, args=(tmp_path, TRIALS, start, tried, released, results), daemon=True)
             for _ in range(CONTENDERS)]
    for proc in procs:
        proc.start()
    several_held, none_held, other = [], [], []
    try:
        for trial in range(TRIALS):
            run_dir = tmp_path / f"trial{trial}"
            _prepare(run_dir, state, dead_pid)
            start.wait()
            outcomes = [results.get(timeout=WAIT_S) for _ in range(CONTENDERS)]
            try:
                on_disk = json.loads((run_dir / LOCK_NAME).read_bytes())
            except (OSError, ValueError) as error:
                on_disk = repr(error)
            tried.wait()
            released.wait()
            assert {o[0] for o in outcomes} == {trial}
            holders = [o for o in outcomes if o[1] == "held"]
            problems = [f"{o[1]}: {o[3]}" for o in outcomes if o[1] not in ("held", "busy")]
            if len(holders) > 1:
                several_held.append(trial)
                continue
            if not holders:
                none_held.append(trial)
                continue
            _, _, winner, notice = holders[0]
            gone = {"no lock": None, "stale lock": f"PID {dead_pid}, which is no longer running",
                    "expired lease": f"PID {dead_pid} on host gpu-node-7, whose lease was last renewed 60",
                    "garbage lock": "an unreadable lock file"}[state]
            expected_notice = gone and f"took over the lock of {run_dir} from {gone}"
            # None: it linked while another one's takeover was under way; a lease's notice goes on with its age
            if notice is not None and not (notice == expected_notice or state == "expired lease"
                                           and notice.startswith(expected_notice)):
                problems.append(f"notice {notice!r}")
            if not isinstance(on_disk, dict) or on_disk.get("pid") != winner:
                problems.append(f"while PID {winner} held it, the lock file read {on_disk!r}")
            problems += [f"loser's message {o[3]!r} does not name PID {winner}"
                         for o in outcomes if o[1] == "busy" and f"is in use by PID {winner} on this host" not in o[3]]
            if _lock_files(run_dir):
                problems.append(f"left behind after release: {_lock_files(run_dir)}")
            if problems:
                other.append((trial, problems))
    except BaseException:
        for barrier in (start, tried, released):
            barrier.abort()  # the contenders still waiting stop at once
        raise
    finally:
        for proc in procs:
            proc.join(timeout=WAIT_S)
            if proc.is_alive():
                proc.kill()
    assert not several_held, (f"{state}: two or more processes held the lock in {len(several_held)}/{TRIALS} trials "
                              f"({CONTENDERS} contenders): trials {several_held}")
    assert not none_held, f"{state}: nobody held the lock in {len(none_held)}/{TRIALS} trials: {none_held}"
    assert not other, f"{state}: {other[:5]}"
    assert all(proc.exitcode == 0 for proc in procs)


# --------------------------------------------------------------------------- the file as others see it
def test_the_lock_file_is_never_visible_empty_or_half_written(tmp_path, monkeypatch):
    # Before: the file was created empty and then written, and a reader in between saw '' or '{"pi'.
    def slow_dump(obj, handle, **kwargs):  # a write that takes ~0.3 s (a slow disk, a loaded machine)
        for char in json.dumps(obj, **kwargs):
            handle.write(char)
            handle.flush()
            time.sleep(0.002)

    monkeypatch.setattr(runlock, "json", types.SimpleNamespace(dump=slow_dump, loads=json.loads, dumps=json.dumps))
    path = tmp_path / LOCK_NAME
    lock = RunLock(tmp_path)
    writer = threading.Thread(target=lock.acquire)
    writer.start()
    seen, partial = 0, []
    while True:
        finished = not writer.is_alive()  # then this read is the last one (and finds the lock)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is not None:
            try:
                assert json.loads(raw)["pid"] == os.getpid()
                seen += 1
            except (ValueError, KeyError, AssertionError):
                partial.append(raw)
        if finished:
            break
    writer.join()
    assert lock.held and seen and not partial, f"read {len(partial)} incomplete lock files, e.g. {partial[:3]}"
    lock.release()
    assert _lock_files(tmp_path) == []


def test_a_young_unreadable_lock_is_read_again_before_it_counts_as_garbage(tmp_path, live_pid):
    # An older version's holder creates the file first and writes it next: until it has, the lock
    # reads as garbage. Before: taken over at once, while that holder went on (two holders).
    path = tmp_path / LOCK_NAME
    path.write_bytes(b'{"pi')
    finishing = threading.Timer(0.3, lambda: path.write_bytes(_holder(live_pid)))
    finishing.start()
    try:
        with pytest.raises(RunLockError, match=f"is in use by PID {live_pid} on this host"):
            RunLock(tmp_path).acquire()
    finally:
        finishing.join()
    assert path.read_bytes() == _holder(live_pid)


def test_an_unreadable_lock_that_stays_unreadable_is_taken_over(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_bytes(b"")  # a holder (of an older version) killed between creating and writing it
    began = time.monotonic()
    lock = RunLock(tmp_path).acquire()
    assert time.monotonic() - began >= 1.0  # first given the time any write in progress needs
    assert lock.notice == f"took over the lock of {tmp_path} from an unreadable lock file"
    assert json.loads(path.read_bytes())["pid"] == os.getpid()
    lock.release()
    assert _lock_files(tmp_path) == []


# --------------------------------------------------------------------------- release
def test_release_by_an_earlier_lock_of_the_same_process_leaves_the_newer_lock(tmp_path):
    # A Trainer that was never closed and a new one in the same process: the new one takes the lock
    # over (silently), and the old one's release must not delete it. Before: it did (same PID).
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()
    assert second.held and second.notice is None
    newer = (tmp_path / LOCK_NAME).read_bytes()
    first.release()
    assert (tmp_path / LOCK_NAME).read_bytes() == newer
    second.release()
    assert _lock_files(tmp_path) == []


def _hold(run_dir: Path, held, done) -> None:
    lock = RunLock(run_dir).acquire()
    held.set()
    done.wait(WAIT_S)
    lock.release()


def test_release_by_a_process_that_is_not_the_holder_leaves_the_lock(tmp_path):
    # This process's lock file was deleted by hand (the advice for a dead holder, followed wrongly),
    # another process took the folder, and then this one finishes: the other one's lock stays.
    ours = RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).unlink()
    held, done = CTX.Event(), CTX.Event()
    other = CTX.Process(target=_hold, args=(tmp_path, held, done), daemon=True)
    other.start()
    try:
        assert held.wait(WAIT_S)
        theirs = (tmp_path / LOCK_NAME).read_bytes()
        assert json.loads(theirs)["pid"] == other.pid
        ours.release()
        assert (tmp_path / LOCK_NAME).read_bytes() == theirs
        with pytest.raises(RunLockError, match=f"is in use by PID {other.pid} on this host"):
            RunLock(tmp_path).acquire()
    finally:
        done.set()
        other.join(WAIT_S)
    assert other.exitcode == 0 and _lock_files(tmp_path) == []


# --------------------------------------------------------------------------- the takeover's own check
def _replacing(path: Path, content: bytes):
    """Put a complete lock with ``content`` at ``path`` at once (as another process's link would)."""
    staged = path.with_name("staged")
    staged.write_bytes(content)
    os.replace(staged, path)


@pytest.mark.parametrize("third", [False, True], ids=["put back", "a third lock meanwhile"])
def test_a_takeover_that_moved_a_fresh_lock_aside_puts_it_back(tmp_path, monkeypatch, live_pid, third):
    # Where the takeover guard (flock) is unavailable, a process may judge a stale lock, and by the
    # time it moves the lock aside, another process has taken it over and made a fresh one: the
    # process must notice that it moved a different lock, put it back, and report the folder busy.
    # If yet another process linked its lock while the fresh one was aside, that one is named.
    path = tmp_path / LOCK_NAME
    path.write_bytes(_holder(_dead_pid()))
    fresh, newest = _holder(live_pid), _holder(os.getppid())
    monkeypatch.setattr(runlock, "_takeover_guard", lambda run_dir: _NoGuard())
    real_rename, real_link = os.rename, os.link

    def rename(src, dst):
        if Path(src) == path:
            _replacing(path, fresh)  # another process's takeover, just before ours
        real_rename(src, dst)

    def link(src, dst):
        if third and Path(dst) == path and Path(src).suffix == ".stale":
            _replacing(path, newest)  # a third process's lock, while the fresh one was aside
        real_link(src, dst)

    monkeypatch.setattr(runlock.os, "rename", rename)
    monkeypatch.setattr(runlock.os, "link", link)
    named = os.getppid() if third else live_pid
    with pytest.raises(RunLockError, match=f"is in use by PID {named} on this host"):
        RunLock(tmp_path).acquire()
    monkeypatch.undo()
    assert path.read_bytes() == (newest if third else fresh) and _lock_files(tmp_path) == [LOCK_NAME]


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
