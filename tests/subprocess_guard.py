"""A subprocess runner for tests whose hang guard fires on silence, not on total time.

``subprocess.run(..., timeout=T)`` fails a test whenever the machine is slow enough that the child
needs more than ``T`` seconds, although it is making progress. ``run_with_hang_guard`` instead
kills the child (and its whole process group) only when neither stdout nor stderr produced any
output for ``silence_s`` seconds, so a loaded machine makes a test slower, never red.
``communicate_with_hang_guard`` does the same for a ``Popen`` a test started itself (one it signals
deliberately, or leaves running in the background), and ``wait_while_busy`` replaces a wall-clock
deadline on a condition (a lock file appears) by a clock that runs only while the child uses no CPU.
(Importable because pyproject.toml puts tests/ on pytest's path.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

_TAIL_LINES = 40


def run_with_hang_guard(cmd, *, silence_s: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; return a ``CompletedProcess`` with text ``stdout`` and ``stderr``.

    Both streams are always captured (as ``capture_output=True, text=True``; UTF-8, undecodable bytes
    replaced, newlines universal) and read concurrently, so a full pipe never blocks the child. Any
    bytes on either stream, a partial line included, count as progress. When neither stream produced
    anything for ``silence_s`` seconds, the child's process group (it is started in a new session) is
    killed with SIGKILL and an ``AssertionError`` saying "no output for N s (hung?)", with the last
    lines of output, is raised. Other keyword arguments (``env``, ``cwd``, ``preexec_fn`` (it runs in
    the child after ``setsid``), ...) go to ``Popen``; stdin is ``/dev/null`` unless given.
    """
    if "timeout" in kwargs:
        raise TypeError("run_with_hang_guard has no total timeout: pass silence_s (seconds without output)")
    for name in ("capture_output", "text", "universal_newlines"):
        if kwargs.pop(name, True) is not True:
            raise TypeError(f"run_with_hang_guard always captures text output; {name}=False is not supported")
    for name in ("stdout", "stderr", "start_new_session", "process_group", "encoding", "errors"):
        if name in kwargs:
            raise TypeError(f"run_with_hang_guard sets {name} itself")
    kwargs.setdefault("stdin", subprocess.DEVNULL)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs)
    out, err = _communicate(proc, cmd, silence_s, group=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def communicate_with_hang_guard(proc: subprocess.Popen, *, silence_s: float = 300) -> tuple:
    """``proc.communicate()`` with ``run_with_hang_guard``'s hang guard instead of a total timeout.

    For a ``Popen`` that the test started itself, with ``text=True`` and ``stdout``/``stderr`` pipes
    (either may be absent, or stderr merged into stdout): reads both until they close and the child
    exits, and returns ``(stdout, stderr)`` as text, ``None`` for a stream that is not a pipe.
    Silence is counted from this call (output the child wrote earlier is read at once). When neither
    pipe produced anything for ``silence_s`` seconds, the child is killed with SIGKILL (its whole
    process group when it leads one) and an ``AssertionError`` "no output for N s (hung?)" is raised.
    A stdin pipe is closed first, as ``communicate()`` with no input does.
    """
    if not getattr(proc, "text_mode", True):
        raise TypeError("communicate_with_hang_guard returns text: start the process with text=True")
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:  # BrokenPipeError: the child is gone, as communicate() ignores it
            pass
    return _communicate(proc, proc.args, silence_s, group=_leads_group(proc))


def wait_while_busy(condition, proc: subprocess.Popen, *, idle_s: float = 300, poll_s: float = 0.2) -> bool:
    """Poll ``condition()`` until it holds (``True``), ``proc`` exits, or ``proc`` is idle (``False``).

    Instead of a wall-clock deadline: the wait goes on as long as the child keeps using CPU time (a
    slow machine), and gives up only when it used none for ``idle_s`` seconds (blocked: hung). Where
    the CPU time cannot be read (no /proc), ``idle_s`` is a plain deadline from the start. ``condition``
    is checked once more after the child exits or goes idle, so the answer is the condition's own.
    """
    last_cpu, last_change = _cpu_ticks(proc.pid), time.monotonic()
    while not condition():
        if proc.poll() is not None:
            return condition()
        cpu = _cpu_ticks(proc.pid)
        now = time.monotonic()
        if cpu is not None and cpu != last_cpu:
            last_cpu, last_change = cpu, now
        elif now - last_change >= idle_s:
            return condition()
        time.sleep(poll_s)
    return True


def _cpu_ticks(pid: int):
    """User and system CPU time of ``pid`` (all its threads) and of its reaped children, in clock ticks;
    ``None`` where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return None


def _communicate(proc: subprocess.Popen, cmd, silence_s: float, *, group: bool) -> tuple:
    """Read proc's stdout and stderr pipes (those that are pipes) until they close and proc exits; kill
    proc, and with ``group`` its process group, after ``silence_s`` seconds without output."""
    pipes = {name: getattr(proc, name) for name in ("stdout", "stderr") if getattr(proc, name) is not None}
    chunks: dict[str, list[bytes]] = {name: [] for name in pipes}
    merged: list[bytes] = []  # both streams in arrival order, for the error's tail
    lock = threading.Lock()
    last_output = [time.monotonic()]

    def reader(name: str, pipe) -> None:
        fd = pipe.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            with lock:
                chunks[name].append(data)
                merged.append(data)
                last_output[0] = time.monotonic()

    threads = [threading.Thread(target=reader, args=(name, pipe), daemon=True, name=f"hang-guard-{name}")
               for name, pipe in pipes.items()]
    for thread in threads:
        thread.start()

    finished = False
    try:
        poll = min(0.25, silence_s / 10)
        # Wait for the exit *and* for the pipes to close: a grandchild that keeps a pipe open and
        # says nothing is a hang too (subprocess.run would wait for it forever).
        while proc.poll() is None or any(thread.is_alive() for thread in threads):
            with lock:
                silent_for = time.monotonic() - last_output[0]
            if silent_for >= silence_s:
                _kill(proc, group)
                for thread in threads:
                    thread.join(timeout=5)
                with lock:
                    text = _decode(b"".join(merged))
                tail = "\n".join(text.splitlines()[-_TAIL_LINES:])
                raise AssertionError(
                    f"no output for {silence_s:g} s (hung?); killed process {'group ' if group else ''}{proc.pid}: "
                    f"{_show(cmd)}\n"
                    f"--- last {_TAIL_LINES} lines of output (stdout and stderr) ---\n{tail}")
            if proc.poll() is None:
                try:
                    proc.wait(timeout=poll)
                except subprocess.TimeoutExpired:
                    pass
            else:
                for thread in threads:
                    thread.join(timeout=poll)
        finished = True
    finally:
        if not finished:  # the guard fired, or the test was interrupted: leave nothing running
            _kill(proc, group)
        for thread, pipe in zip(threads, pipes.values()):
            if not thread.is_alive():  # a reader still blocked in read() keeps its pipe (and fd number)
                pipe.close()
    with lock:
        return tuple(_decode(b"".join(chunks[name])) if name in pipes else None for name in ("stdout", "stderr"))


def _kill(proc: subprocess.Popen, group: bool) -> None:
    # With ``group``, proc leads its own group (new session), whose id is its pid; while any member
    # lives the id cannot be reused, so killing it after the leader was reaped cannot hit an unrelated
    # process. Without, proc shares a group (the test's own) and is killed alone.
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        proc.kill()  # a no-op once the child was reaped
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _leads_group(proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:  # reaped: its pid (and group id) may be another process's by now
        return False
    try:
        return os.getpgid(proc.pid) == proc.pid
    except (ProcessLookupError, PermissionError):
        return False


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _show(cmd) -> str:
    return cmd if isinstance(cmd, str) else " ".join(map(str, cmd))
