"""The run lock across hosts (issue 29): a lease renewed while the holder lives, and SLURM's requeue.

Before, a lock of another host blocked until someone deleted it: a run killed on node A (SIGKILL,
preemption, node failure) could not be resumed on node B. Now another host's holder is gone once
its lease was not renewed for ``EXPIRY_LEASES`` leases, or at once when this process is a requeued
run of the holder's SLURM job; a live holder is never displaced. Other hosts are simulated: a holder
record naming another host (written here, or by a process whose ``socket.gethostname`` says so),
its last renewal set with ``os.utime``, SLURM's variables set in the environment. Every test here but
the ones marked as checks of the old behaviour failed on the code before the lease.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from at_memorization import runlock
from at_memorization.runlock import EXPIRY_LEASES, LEASE_ENV, LOCK_NAME, RunLock, RunLockError, check_free
from cli_testing import subprocess_env

OTHER_HOST = "gpu-node-7"
NO_SLURM = {"SLURM_JOB_ID": None, "SLURM_RESTART_COUNT": None}


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    """This process as outside SLURM with the default lease, whatever runs the tests."""
    for name in (*NO_SLURM, LEASE_ENV):
        monkeypatch.delenv(name, raising=False)


def _write_holder(run_dir: Path, renewed_ago: float, **fields) -> bytes:
    """Another host's lock, last renewed ``renewed_ago`` seconds ago; ``fields`` add to the record or
    replace its values (a None value leaves the field out)."""
    record = {"pid": 1234, "host": OTHER_HOST, "started": "2026-12-01T01:00:00", "command": "at-mem train",
              "token": "0" * 32, "lease_s": 60.0, **fields}
    raw = json.dumps({k: v for k, v in record.items() if v is not None}).encode()
    run_dir.mkdir(exist_ok=True)
    staged, path = run_dir / "staged", run_dir / LOCK_NAME
    staged.write_bytes(raw)
    when = time.time() - renewed_ago
    os.utime(staged, (when, when))
    os.replace(staged, path)  # complete at once, a file of its own: as another process's lock appears
    return raw


def _lock_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith(LOCK_NAME))


def _lease_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lease of ")]


# --------------------------------------------------------------------------- another host's lease
def test_another_hosts_lock_whose_lease_expired_is_taken_over_with_a_notice(tmp_path):
    _write_holder(tmp_path, renewed_ago=200)  # 60 s lease: expired after 180 s
    check_free(tmp_path)  # a study's scheduler sees the folder free as well
    lock = RunLock(tmp_path).acquire()
    assert lock.notice == (f"took over the lock of {tmp_path} from PID 1234 on host {OTHER_HOST}, whose lease was "
                           "last renewed 200 s ago (it expires after 180 s)")
    record = json.loads((tmp_path / LOCK_NAME).read_bytes())
    assert (record["pid"], record["host"], record["token"]) == (os.getpid(), socket.gethostname(), lock.token)
    assert record["lease_s"] == runlock.DEFAULT_LEASE_S and "slurm_job_id" not in record
    lock.release()
    assert _lock_files(tmp_path) == []


@pytest.mark.parametrize("taker_lease", [None, "0.1"], ids=["same lease", "a taker with a shorter lease"])
def test_another_hosts_lock_with_a_fresh_lease_blocks_and_says_when_it_is_taken_over(tmp_path, monkeypatch,
                                                                                    taker_lease):
    # The holder's own lease decides: a taker whose lease is shorter does not cut the holder's short.
    if taker_lease:
        monkeypatch.setenv(LEASE_ENV, taker_lease)
    raw = _write_holder(tmp_path, renewed_ago=100, slurm_job_id="77", slurm_restart_count=0)
    mtime = (tmp_path / LOCK_NAME).stat().st_mtime_ns
    expected = (f"is in use by PID 1234 on host {OTHER_HOST} (SLURM job 77) (since 2026-12-01T01:00:00); its lease "
                "was renewed 100 s ago, and it is taken over once not renewed for 180 s")
    with pytest.raises(RunLockError, match=re.escape(expected)):
        RunLock(tmp_path).acquire()
    with pytest.raises(RunLockError, match="its lease was renewed 100 s ago"):
        check_free(tmp_path)
    path = tmp_path / LOCK_NAME
    assert path.read_bytes() == raw and path.stat().st_mtime_ns == mtime and _lock_files(tmp_path) == [LOCK_NAME]


def test_an_older_versions_lock_of_another_host_keeps_blocking(tmp_path):
    # The old behaviour, kept: a lock without a lease was never renewed, so its age tells nothing.
    _write_holder(tmp_path, renewed_ago=86400, lease_s=None)
    with pytest.raises(RunLockError, match=f"in use by PID 1234 on host {OTHER_HOST} .*if that process is gone, "
                                           f"delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("lease", [0, -5, "60", True, float("nan")])
def test_a_lock_whose_lease_is_no_positive_number_counts_as_an_older_versions(tmp_path, lease):
    _write_holder(tmp_path, renewed_ago=86400, lease_s=lease)
    with pytest.raises(RunLockError, match="if that process is gone, delete"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_lease_setting_that_is_no_positive_number_is_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv(LEASE_ENV, value)
    with pytest.raises(RunLockError, match=f"^{LEASE_ENV}='{value}': give the run lock's lease as a positive number "
                                           r"of seconds \(default 60\)$"):
        RunLock(tmp_path).acquire()
    assert not tmp_path.joinpath(LOCK_NAME).exists()


@pytest.mark.parametrize("moment", ["before the second look", "before the rename"])
def test_a_holder_that_renews_while_being_taken_over_keeps_its_lock(tmp_path, monkeypatch, moment):
    # A holder judged expired renews its lease (it was slow, not dead) just before the taker moves the
    # lock: the taker must notice the new modification time, leave the lock in place, and report it busy.
    # (This checks the takeover's path for expired leases; the code before the lease never took one.)
    raw = _write_holder(tmp_path, renewed_ago=200)
    path = tmp_path / LOCK_NAME
    renew = lambda: os.utime(path)  # noqa: E731 - what the holder's thread does
    if moment == "before the second look":
        guard = runlock._takeover_guard

        def renewing_guard(run_dir):
            renew()
            return guard(run_dir)

        monkeypatch.setattr(runlock, "_takeover_guard", renewing_guard)
    else:
        real_rename = os.rename

        def rename(src, dst):
            if Path(src) == path:
                renew()
            real_rename(src, dst)

        monkeypatch.setattr(runlock.os, "rename", rename)
    with pytest.raises(RunLockError, match=f"in use by PID 1234 on host {OTHER_HOST} .* its lease was renewed 0.0 s"):
        RunLock(tmp_path).acquire()
    monkeypatch.undo()
    assert path.read_bytes() == raw and time.time() - path.stat().st_mtime < 60
    assert _lock_files(tmp_path) == [LOCK_NAME]


# --------------------------------------------------------------------------- SLURM's requeue
def test_a_requeued_slurm_job_takes_over_its_killed_runs_lock_at_once(tmp_path, monkeypatch):
    # The job's first run holds the lock on node A (lease fresh) and is killed without clean-up; the
    # requeued run (same SLURM_JOB_ID, restart count 1) starts on node B at once, long before the lease
    # would expire. Before: refused until someone deleted the lock.
    code = ("import socket, sys; socket.gethostname = lambda: 'node-a'\n"
            "from at_memorization.runlock import RunLock\n"
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=subprocess_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT=None))
    try:
        assert first.stdout.readline().strip() == "held"
        record = json.loads((tmp_path / LOCK_NAME).read_bytes())
        assert (record["host"], record["slurm_job_id"], record["slurm_restart_count"]) == ("node-a", "4242", 0)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = RunLock(tmp_path).acquire()
    assert lock.notice == (f"took over the lock of {tmp_path} from PID {first.pid} on host node-a (SLURM job 4242, "
                           "restart 0), which this requeued run of the job (restart 1) replaces")
    record = json.loads((tmp_path / LOCK_NAME).read_bytes())
    assert (record["token"], record["slurm_job_id"], record["slurm_restart_count"]) == (lock.token, "4242", 1)
    lock.release()


@pytest.mark.parametrize("ours, theirs", [
    ({"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, {"slurm_job_id": "4242", "slurm_restart_count": 1}),
    ({"SLURM_JOB_ID": "4242"}, {"slurm_job_id": "4242", "slurm_restart_count": 0}),
    ({"SLURM_JOB_ID": "4243", "SLURM_RESTART_COUNT": "3"}, {"slurm_job_id": "4242", "slurm_restart_count": 0}),
    ({"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}, {}),
    ({}, {"slurm_job_id": "4242", "slurm_restart_count": 0}),
], ids=["same run of the job", "same run, no restart count", "another job", "holder outside SLURM",
        "taker outside SLURM"])
def test_a_live_holder_is_not_displaced_by_anything_short_of_a_requeue_of_its_job(tmp_path, monkeypatch, ours,
                                                                                    theirs):
    # The tasks or steps of one job run at the same time (on several nodes): the same job id is no proof.
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    raw = _write_holder(tmp_path, renewed_ago=1, **theirs)
    with pytest.raises(RunLockError, match=f"in use by PID 1234 on host {OTHER_HOST}.* its lease was renewed"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == raw


# --------------------------------------------------------------------------- two live processes
HOLDER_LEASE_S = 1.0  # expires after 3 s: long enough for a loaded machine to renew in time


def test_a_live_renewing_holder_on_another_host_is_never_displaced_and_its_lock_is_taken_over_once_killed(tmp_path):
    # A real holder process (its host named node-a, its lease 1 s) and this process trying every 50 ms
    # for over two expiry periods: never in while the holder lives; after its SIGKILL, in once its
    # lease expired. Before: the killed holder's lock blocked for good.
    code = ("import socket, sys; socket.gethostname = lambda: 'node-a'\n"
            "from at_memorization.runlock import RunLock\n"
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env(**NO_SLURM, **{LEASE_ENV: 1}))
    expiry = HOLDER_LEASE_S * EXPIRY_LEASES
    try:
        assert holder.stdout.readline().strip() == "held"
        path = tmp_path / LOCK_NAME
        tries, oldest_renewal, end = 0, 0.0, time.monotonic() + 2.5 * expiry
        while time.monotonic() < end:
            with pytest.raises(RunLockError, match=f"in use by PID {holder.pid} on host node-a"):
                RunLock(tmp_path).acquire()
            tries += 1
            oldest_renewal = max(oldest_renewal, time.time() - path.stat().st_mtime)
            time.sleep(0.05)
        assert holder.poll() is None and tries > 50
        assert oldest_renewal < expiry / 2, f"the holder's lease went {oldest_renewal:.2f} s without renewal"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    killed = time.monotonic()
    while True:
        try:
            lock = RunLock(tmp_path).acquire()
            break
        except RunLockError as error:
            assert f"in use by PID {holder.pid} on host node-a" in str(error)
            assert time.monotonic() - killed < expiry + 30, "the killed holder's lock was never taken over"
            time.sleep(0.05)
    took = time.monotonic() - killed
    assert expiry - HOLDER_LEASE_S / 3 - 0.2 <= took, f"taken over {took:.2f} s after the kill, before its expiry"
    assert lock.notice.startswith(f"took over the lock of {tmp_path} from PID {holder.pid} on host node-a, whose "
                                  "lease was last renewed ")
    lock.release()
    assert _lock_files(tmp_path) == []


# --------------------------------------------------------------------------- the renewal thread
def test_the_lease_is_renewed_while_held_and_never_on_a_lock_that_is_no_longer_ours(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.15")  # renewed every 50 ms
    path = tmp_path / LOCK_NAME
    lock = RunLock(tmp_path).acquire()
    assert json.loads(path.read_bytes())["lease_s"] == 0.15
    long_ago = time.time() - 1000
    os.utime(path, (long_ago, long_ago))
    deadline = time.monotonic() + 30
    while path.stat().st_mtime == long_ago and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time.time() - path.stat().st_mtime < 30, "the lease was not renewed"
    # Another process took the folder over (its lock now in place, last renewed long ago): ours must
    # neither renew it nor put our own lock back.
    theirs = _write_holder(tmp_path, renewed_ago=1000)
    time.sleep(0.5)  # 10 renewal periods
    assert path.read_bytes() == theirs and path.stat().st_mtime == pytest.approx(long_ago, abs=1)
    lock.release()
    assert not _lease_threads() and path.read_bytes() == theirs


def test_release_stops_the_renewals_and_nothing_brings_the_lock_back(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.15")
    lock = RunLock(tmp_path).acquire()
    assert [t.name for t in _lease_threads()] == [f"lease of {tmp_path / LOCK_NAME}"]
    lock.release()
    assert not _lease_threads() and _lock_files(tmp_path) == []
    time.sleep(0.5)
    assert _lock_files(tmp_path) == []
    again = RunLock(tmp_path).acquire()  # a later hold renews again, with its own thread
    assert len(_lease_threads()) == 1
    again.release()
    assert not _lease_threads()
