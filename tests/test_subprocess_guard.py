"""tests/subprocess_guard.py's helpers for a Popen a test started itself, and its preexec_fn passthrough.
(run_with_hang_guard's own tests are in tests/test_gpu_suite.py, its first user.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from subprocess_guard import communicate_with_hang_guard, run_with_hang_guard, wait_while_busy

HAS_PROC = Path("/proc/self/stat").exists()


def _python(code: str) -> list[str]:
    """A Python child that starts in milliseconds (-I -S: no site, no user paths)."""
    return [sys.executable, "-I", "-S", "-c", textwrap.dedent(code)]


def _popen(code: str, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(_python(code), text=True, **kwargs)


def test_run_with_hang_guard_passes_preexec_fn_and_still_starts_a_session():
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    done = run_with_hang_guard(_python("""
        import os, resource
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], os.getsid(0) == os.getpid())
    """), preexec_fn=limit)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["64", "True"]


def test_communicate_returns_both_streams_and_none_for_one_not_piped():
    proc = _popen("""
        import sys
        print("out", flush=True)
        print("err", file=sys.stderr, flush=True)
        sys.exit(4)
    """)
    assert communicate_with_hang_guard(proc) == ("out\n", "err\n")
    assert proc.returncode == 4
    merged = _popen("""
        import sys
        print("out", flush=True)
        print("err", file=sys.stderr, flush=True)
    """, stderr=subprocess.STDOUT)
    assert communicate_with_hang_guard(merged) == ("out\nerr\n", None)
    assert merged.returncode == 0


def test_communicate_waits_for_a_child_that_keeps_talking_past_the_silence_limit():
    started = time.monotonic()
    proc = _popen("""
        import time
        for i in range(12):
            print(i, flush=True)
            time.sleep(0.25)
    """)
    out, err = communicate_with_hang_guard(proc, silence_s=1)
    assert time.monotonic() - started > 2.5  # longer than silence_s in all
    assert out.split() == [str(i) for i in range(12)] and err == "" and proc.returncode == 0


def test_communicate_counts_silence_from_the_call_and_kills_a_silent_child():
    proc = _popen("""
        import time
        print("early", flush=True)
        time.sleep(30)
    """)
    time.sleep(1.5)  # silent for longer than silence_s before the call: not a hang yet
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"no output for 1 s \(hung\?\); killed process \d+") as info:
        communicate_with_hang_guard(proc, silence_s=1)
    assert 1 <= time.monotonic() - started < 25  # killed after 1 s of silence, not after the 30 s sleep
    assert "early" in str(info.value)  # the tail of the output
    assert proc.returncode == -9  # the child alone: it shares the test's process group


def test_communicate_refuses_a_binary_mode_process():
    proc = subprocess.Popen(_python("pass"), stdout=subprocess.PIPE)
    try:
        with pytest.raises(TypeError, match="text=True"):
            communicate_with_hang_guard(proc)
    finally:
        proc.communicate()


@pytest.mark.skipif(not HAS_PROC, reason="reads CPU time from /proc")
def test_wait_while_busy_outlasts_idle_s_while_the_child_computes(tmp_path):
    flag = tmp_path / "flag"
    proc = _popen(f"""
        import time
        end = time.monotonic() + 3
        while time.monotonic() < end:
            pass  # busy: CPU time grows
        open({str(flag)!r}, "w").close()
        time.sleep(30)
    """)
    try:
        started = time.monotonic()
        assert wait_while_busy(flag.exists, proc, idle_s=1)
        assert time.monotonic() - started > 2  # longer than idle_s: not a wall-clock deadline
    finally:
        proc.kill()
        proc.communicate()


def test_wait_while_busy_gives_up_on_an_idle_child_and_on_an_exited_one(tmp_path):
    flag = tmp_path / "flag"
    idle = _popen("import time; time.sleep(30)")
    try:
        started = time.monotonic()
        assert not wait_while_busy(flag.exists, idle, idle_s=1)
        assert 1 <= time.monotonic() - started < 20
        assert idle.poll() is None  # the caller decides what to do with it
    finally:
        idle.kill()
        idle.communicate()
    gone = _popen("pass")
    started = time.monotonic()
    assert not wait_while_busy(flag.exists, gone, idle_s=60)
    assert time.monotonic() - started < 30
    gone.communicate()
    # The condition is checked once more after the exit: a file the child made on its way out counts.
    made = _popen(f"open({str(flag)!r}, 'w').close()")
    made.wait()
    checks = []

    def seen_on_second_look():
        checks.append(1)
        return len(checks) > 1 and flag.exists()

    assert wait_while_busy(seen_on_second_look, made, idle_s=60)
    assert len(checks) == 2
    made.communicate()
