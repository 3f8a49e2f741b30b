"""`at-mem reproduce PLAN.toml --out DIR` end to end on tiny MNIST plans (issue: "a whole table from one
command"): --jobs 2, a rerun that does nothing, interrupt (SIGTERM, then SIGINT) and resume to the same
numbers as an uninterrupted call, a failing run among good ones, plan errors, --dry-run, and every plan
under configs/plans/.

The CLI runs as users run it: a fresh ``python -m at_memorization reproduce`` process, under the hang
guard of subprocess_guard (a hang fails the test instead of blocking CI). One finished study (the
module fixture ``finished``) serves both the end-to-end checks and as the uninterrupted reference
of the interrupt test, so the file trains only three small studies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_testing import assert_one_line_error, invoke, subprocess_env
from subprocess_guard import communicate_with_hang_guard, run_with_hang_guard

from at_memorization.plan import PlanError, read_plan
from at_memorization.reproduce import Options, ReproduceError, reproduce

ROOT = Path(__file__).resolve().parents[1]
PLANS_DIR = ROOT / "configs" / "plans"
PLANS = sorted(PLANS_DIR.glob("*.toml"))
HEAVY = ("torch", "torchvision", "timm", "torchattacks", "matplotlib")

# Two arms, one seed; 16 steps an epoch and 6 epochs, so that a signal sent once a run has written
# its first epoch finds it mid-training. The second evaluation is of one arm only, at another n.
PLAN = """\
name = "tiny-mnist"
description = "A tiny MNIST plan for testing at-mem reproduce."
methods = ["pgd-at", "pgd-at-te"]
seeds = [0]
device = "cpu"

[settings]
dataset = "mnist"
data_dir = "{data_dir}"
model = "smallcnn"
drop_rate = 0.0
train_size = 256
test_size = 32
batch_size = 16
epochs = 6
lr = 0.05
eps = 0.1
step_size = 0.04
steps = 1
eval_steps = 1
track_samples = true

[[evaluate]]
checkpoints = ["best", "last"]
attacks = ["clean", "pgd20"]
n_examples = 16

[[evaluate]]
checkpoints = ["last"]
attacks = ["cw"]
n_examples = 8
arms = ["pgd-at"]

[report]
paired = ["pgd-at:pgd-at-te"]
late_after = 1
"""
ARMS = ("pgd-at", "pgd-at-te")
RUNS = tuple(f"{arm}-s0" for arm in ARMS)
SILENCE_S = 300  # the hang guard: seconds without output from reproduce (a run is silent while it trains)


# --------------------------------------------------------------------------- helpers
def _command(plan: Path, out: Path, *args) -> list[str]:
    return [sys.executable, "-m", "at_memorization", "reproduce", str(plan), "--out", str(out), *map(str, args)]


def _reproduce(plan: Path, out: Path, *args, python_args=(), **env) -> subprocess.CompletedProcess:
    command = _command(plan, out, *args)
    command[1:1] = list(python_args)
    return run_with_hang_guard(command, env=subprocess_env(**env), cwd=out.parent, silence_s=SILENCE_S)


def _start(plan: Path, out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(_command(plan, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=out.parent, stdin=subprocess.DEVNULL, start_new_session=True)


def _write_plan(folder: Path, data_dir: Path, text: str = PLAN, name: str = "plan.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text.format(data_dir=data_dir))
    return path


def _processes_naming(path: Path) -> list[int]:
    """The live processes whose command line mentions ``path`` (a folder only this test uses)."""
    needle, found = str(path).encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _kill_leftovers(path: Path) -> None:
    """After a failed test: end the children of a reproduce process the test started (own sessions)."""
    for pid in _processes_naming(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _wait_for(condition, proc: subprocess.Popen, what: str, deadline_s: float = 300.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"reproduce exited ({proc.returncode}) before {what}:\n{out}{err}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {deadline_s:g} s")
        time.sleep(0.05)


def _epochs_written(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    count = 0
    for line in lines:
        try:
            count += isinstance(json.loads(line).get("epoch"), int)
        except ValueError:
            pass
    return count


def _metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k and "time" not in k} for r in records]


def _accuracies(run: Path, checkpoint: str) -> dict:
    record = json.loads((run / "eval" / f"{checkpoint}.json").read_text())
    return {k: v for k, v in record.items() if k.endswith("_acc") or k in ("epoch", "n_examples_by_attack")}


def _tree(folder: Path) -> dict[str, tuple]:
    """Every file under ``folder``: (size, mtime in ns, sha256)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("|---")]


# --------------------------------------------------------------------------- the finished study
@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_dir):
    """The plan run to completion with --jobs 2, in a fresh process: (plan, DIR, the result)."""
    folder = tmp_path_factory.mktemp("reproduce-finished")
    plan, out = _write_plan(folder, mnist_dir), folder / "study"
    try:
        result = _reproduce(plan, out, "--jobs", 2)
    finally:
        _kill_leftovers(out)
    return plan, out, result


@pytest.mark.slow
def test_end_to_end_with_two_jobs_then_a_rerun_that_does_nothing(finished):
    plan, out, result = finished
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "FAILED" not in output and "warning:" not in output, output

    # --jobs 2: both trainings ran at once (each run folder has one task at a time).
    lines = output.splitlines()
    started = [i for i, line in enumerate(lines) if "] started train " in line]
    first_done = next(i for i, line in enumerate(lines) if "] done " in line)
    assert len(started) == 2 and all(i < first_done for i in started), output

    # Every run finished; its evaluations hold the planned attacks at the planned n.
    for name in RUNS:
        run = out / "runs" / name
        epochs = [r["epoch"] for r in _metrics(run)]
        assert epochs == [1, 2, 3, 4, 5, 6], name
        best, last = (json.loads((run / "eval" / f"{c}.json").read_text()) for c in ("best", "last"))
        assert best["n_examples_by_attack"] == {"clean": 16, "pgd20": 16}, best
        expected_last = {"clean": 16, "pgd20": 16, **({"cw": 8} if name == "pgd-at-s0" else {})}
        assert last["n_examples_by_attack"] == expected_last, last
        for record in (best, last):
            assert all(f"{attack}_acc" in record for attack in record["n_examples_by_attack"]), record
        assert (out / "settings" / f"{name}.json").is_file() and (out / "logs" / f"{name}.train.log").is_file()
    assert (out / "plan.toml").read_text() == plan.read_text()

    # The report: a row per arm, and the paired table.
    report = (out / "report.md").read_text()
    rows = _table_rows(report)
    for arm in ARMS:
        assert any(row.startswith(f"| {arm} | 1 | 6 |") for row in rows), report
    assert any(row.startswith("| pgd-at-te - pgd-at | 1 |") for row in rows), report
    assert json.loads((out / "report.json").read_text()) and json.loads((out / "memorization.json").read_text())
    for name in ("report.json", "curves-by-method.png", "curves-seed0.png", "memorization.json", "README.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    readme = (out / "README.md").read_text()
    assert readme.startswith("# tiny-mnist\n") and "A tiny MNIST plan for testing at-mem reproduce." in readme
    assert f"at-mem reproduce {plan} --out {out} --jobs 2" in readme
    assert "- Machine: " in readme and "- Wall time: " in readme and "over 1 call(s)" in readme
    assert report.strip() in readme  # the table itself
    assert "Not complete" not in readme

    status = _status(out)
    expected_tasks = {f"{name}/train" for name in RUNS} | {f"{name}/eval-0" for name in RUNS} | {"pgd-at-s0/eval-1"}
    assert set(status["tasks"]) == expected_tasks
    assert all(t["state"] == "done" and t["exit_status"] == 0 and t["attempts"] == 1
               for t in status["tasks"].values()), status["tasks"]
    assert len(status["calls"]) == 1 and status["calls"][0]["jobs"] == 2

    # The same command again: nothing to run, no child, not a byte or an mtime changed, no torch.
    before = _tree(out)
    again = _reproduce(plan, out, "--jobs", 2, python_args=["-X", "importtime"])
    stderr = "\n".join(line for line in again.stderr.splitlines() if not line.startswith("import time:"))
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert again.returncode == 0, again.stdout + stderr
    assert f"nothing to run: all 5 task(s) of tiny-mnist are done in {out}" in stderr
    assert "started" not in stderr and "wrote" not in stderr, stderr
    assert _tree(out) == before  # logs/, status.json, the run files, report.md, README.md: all as they were
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))

    # --dry-run on the finished study: every task done, nothing changed.
    dry = _reproduce(plan, out, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = [line.split() for line in dry.stderr.splitlines() if line.startswith("  ")]
    assert len(listed) == 5 and all(words[0] == "done" for words in listed), dry.stderr
    assert _tree(out) == before


@pytest.mark.slow
def test_the_files_reproduce_writes_have_the_usual_permissions(finished):
    # Before: README.md, status.json, plan.toml and settings/*.json were written through mkstemp and
    # kept its 0600, unlike every other file of DIR (checkpoint.py's _publish gives the umask's mode).
    _, out, _ = finished
    mask = os.umask(0)
    os.umask(mask)
    modes = {name: (out / name).stat().st_mode & 0o777
             for name in ("README.md", "status.json", "plan.toml", "settings/pgd-at-s0.json", "report.md")}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), {k: oct(v) for k, v in modes.items()}


# --------------------------------------------------------------------------- interrupt and resume
def _stop(proc: subprocess.Popen, signum: int, plan: Path, out: Path) -> tuple[str, str]:
    proc.send_signal(signum)  # the reproduce process only: its children are in sessions of their own
    stdout, stderr = communicate_with_hang_guard(proc, silence_s=SILENCE_S)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stdout + stderr
    assert f"{name}: stopping" in stderr
    assert f"stopped by {name}; nothing is lost: continue with the same command" in stderr, stderr
    assert f"at-mem reproduce {plan} --out {out}" in stderr, stderr
    assert "FAILED" not in stderr, stderr  # a child stopped by the signal is "stopped", not a failure
    assert _processes_naming(out) == [], "a child of the stopped reproduce process is still running"
    states = {key: task["state"] for key, task in _status(out)["tasks"].items()}
    assert "failed" not in states.values() and "running" not in states.values(), states
    assert not (out / "report.md").exists()  # no report from a stopped call
    return stdout, stderr


@pytest.mark.slow
def test_sigterm_then_sigint_stop_every_child_and_the_same_command_resumes_to_the_same_numbers(
        finished, mnist_dir, tmp_path):
    plan, reference, _ = finished
    out = tmp_path / "study"
    runs = [out / "runs" / name for name in RUNS]
    try:
        # 1. SIGTERM once a run has written an epoch: both runs are mid-training and save a checkpoint.
        proc = _start(plan, out, "--jobs", 2)
        _wait_for(lambda: any(_epochs_written(run) >= 1 for run in runs), proc, "first epoch")
        _, stderr = _stop(proc, signal.SIGTERM, plan, out)
        stopped = [run for run in runs if (run / "last.pt").is_file()]
        assert stopped, stderr
        for run in stopped:
            assert _epochs_written(run) < 6, f"{run.name} finished before the signal: nothing to resume"
            assert f"stopped train {run.name} after" in stderr and f"(its checkpoint is in {run})" in stderr
            log = (out / "logs" / f"{run.name}.train.log").read_text()
            assert "stopped by SIGTERM" in log and "continue with" in log, log

        dry = invoke("reproduce", plan, "--out", out, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert any(line.split()[:3] == ["pending", "train", stopped[0].name] and "(resumes after epoch" in line
                   for line in dry.output.splitlines()), dry.output

        # 2. The same command resumes both runs; SIGINT (Ctrl-C) once one of them wrote another epoch.
        at_stop = {run: _epochs_written(run) for run in runs}
        proc = _start(plan, out, "--jobs", 2)
        _wait_for(lambda: any(_epochs_written(run) > at_stop[run] for run in stopped), proc, "a resumed epoch")
        _, stderr = _stop(proc, signal.SIGINT, plan, out)
        assert any(f"stopped train {run.name} after" in stderr for run in runs), stderr
        for run in stopped:
            log = (out / "logs" / f"{run.name}.train.log").read_text()
            assert f"--out {run} --quiet --resume" in log, log

        # 3. The same command to the end, but with more threads per child (as when fewer tasks are left
        # than --jobs): a resumed run still computes with the thread count it started with.
        started_with = json.loads((reference / "runs" / RUNS[0] / "config.json").read_text())["config"]["threads"]
        result = _reproduce(plan, out, "--jobs", 2, "--threads", started_with + 1)
    finally:
        _kill_leftovers(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stderr, result.stderr

    # The resumed runs equal the uninterrupted ones of the same plan.
    for name in RUNS:
        mine, theirs = out / "runs" / name, reference / "runs" / name
        assert json.loads((mine / "config.json").read_text())["config"]["threads"] == started_with, name
        resumes = [json.loads(line) for line in (mine / "history.jsonl").read_text().splitlines()
                   if json.loads(line)["event"] == "resumed"] if (mine / "history.jsonl").exists() else []
        assert all(event["threads"] == started_with for event in resumes), resumes
        assert _metrics(mine) == _metrics(theirs), name
        for checkpoint in ("best", "last"):
            assert _accuracies(mine, checkpoint) == _accuracies(theirs, checkpoint), (name, checkpoint)
        a, b = (torch.load(run / "tracking.pt", weights_only=True) for run in (mine, theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _table_rows((out / "report.md").read_text()) == _table_rows((reference / "report.md").read_text())

    status = _status(out)
    assert all(task["state"] == "done" for task in status["tasks"].values()), status["tasks"]
    assert all(status["tasks"][f"{run.name}/train"]["attempts"] >= 2 for run in stopped)
    assert len(status["calls"]) == 3
    readme = (out / "README.md").read_text()
    assert "over 3 call(s)" in readme and "Not complete" not in readme


# --------------------------------------------------------------------------- signals at awkward moments
class _Subprocess:
    """``subprocess`` as at_memorization.reproduce sees it, with ``Popen`` replaced for its children."""

    def __init__(self, popen):
        self.Popen = popen

    def __getattr__(self, name):
        return getattr(subprocess, name)


@pytest.fixture
def no_stray_sigint():
    """The SIGINT these tests send themselves must reach reproduce's handler, never pytest's."""
    def stray(signum, frame):
        raise AssertionError("SIGINT reached the test process, not reproduce's handler")

    previous = signal.signal(signal.SIGINT, stray)
    yield
    signal.signal(signal.SIGINT, previous)


def _children_replaced(monkeypatch, script: str, *, ignore_sigterm: bool = False) -> list:
    """Every child reproduce starts runs ``python -c script`` instead, and a Ctrl-C (SIGINT to this
    process) arrives while reproduce is starting it: before ``Popen`` has returned."""
    import at_memorization.reproduce as module

    started = []

    def popen(command, **kwargs):
        if ignore_sigterm:  # SIG_IGN survives exec: the child ignores SIGTERM from its first instruction
            kwargs["preexec_fn"] = lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
        process = subprocess.Popen([sys.executable, "-c", script], **kwargs)
        started.append(process)
        os.kill(os.getpid(), signal.SIGINT)  # reproduce's handler runs here, inside _start
        return process

    monkeypatch.setattr(module, "subprocess", _Subprocess(popen))
    return started


def test_a_signal_while_a_child_starts_stops_that_child_too(plan_text, tmp_path, monkeypatch, no_stray_sigint):
    # Before: the handler signalled the children it knew of; one whose Popen had not returned yet ran on,
    # unwatched by the stop (a whole training run), and the call waited for it.
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    started = _children_replaced(monkeypatch, "import time; time.sleep(20)")
    lines = []
    begin = time.monotonic()
    try:
        code = reproduce(plan, Options(out=tmp_path / "study", only=("pgd-at-s0",), echo=lines.append,
                                       poll_seconds=0.05))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 128 + signal.SIGINT, lines
    assert len(started) == 1 and started[0].returncode == -signal.SIGTERM, lines
    assert time.monotonic() - begin < 15, "the stop waited for the child to end by itself"
    task = _status(tmp_path / "study")["tasks"]["pgd-at-s0/train"]
    assert task["state"] == "stopped" and task["exit_status"] == -signal.SIGTERM, task


# A reproduce process whose children sleep instead of training, and whose status.json is kept current
# every 0.2 s (30 s in use): the test kills it as a session's end does.
KILLED_SCRIPT = """
import subprocess, sys
from pathlib import Path
import at_memorization.reproduce as module
from at_memorization.reproduce import Options, reproduce

class Children:
    def __init__(self):
        self.Popen = lambda command, **kwargs: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                                                **kwargs)
    def __getattr__(self, name):
        return getattr(subprocess, name)

module.subprocess = Children()
module.STATUS_EVERY_S = 0.2
sys.exit(reproduce(Path(sys.argv[1]), Options(out=Path(sys.argv[2]), only=("pgd-at-s0",), poll_seconds=0.05)))
"""


def test_a_call_killed_outright_keeps_the_time_its_running_tasks_took(plan_text, tmp_path):
    # Before: a task's seconds were written when it ended, so a run whose call was SIGKILLed (every
    # process ends with a session) lost that attempt's time: a 40-epoch run read "2.6 min" of training.
    plan, out = tmp_path / "plan.toml", tmp_path / "study"
    plan.write_text(plan_text)
    proc = subprocess.Popen([sys.executable, "-P", "-c", KILLED_SCRIPT, str(plan), str(out)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: (out / "status.json").is_file() and _status(out)["tasks"].get(
            "pgd-at-s0/train", {}).get("seconds", 0) >= 1.5, proc, "1.5 s of the task in status.json", 60)
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        _kill_leftovers(out)
    status = _status(out)
    task = status["tasks"]["pgd-at-s0/train"]
    assert task["state"] == "running" and task["attempts"] == 1 and task["seconds"] >= 1.5, task
    assert status["calls"][-1]["seconds"] >= task["seconds"] - 0.5 and "ended" not in status["calls"][-1]

    # The next call adds its attempt's time to the first's (its child ends at once, failing).
    lines = []
    code = reproduce(plan, Options(out=out, only=("pgd-at-s0",), echo=lines.append, poll_seconds=0.05))
    assert code == 1, lines
    again = _status(out)["tasks"]["pgd-at-s0/train"]
    assert again["attempts"] == 2 and again["state"] == "failed", again
    assert task["seconds"] <= again["seconds"] < task["seconds"] + 120, (task, again)
    # README.md continues the whole study, and says that the call was limited to some runs.
    readme = (out / "README.md").read_text()
    assert f"```bash\nat-mem reproduce {plan} --out {out}\n```" in readme, readme
    assert "(The last call ran only the runs matching 'pgd-at-s0'" in readme, readme


@pytest.mark.slow
def test_a_task_that_completed_its_files_is_done_though_the_stop_ended_it(finished, tmp_path, monkeypatch,
                                                                          no_stray_sigint):
    # A run that finishes its last step as the stop comes may end with 128 + signal ("arrived after
    # the last training step") or die of the signal while Python exits (-15): its files are complete,
    # so the task is done; before, status.json kept it as "stopped" for good (later calls saw the run
    # finished and never ran the task again to correct its record).
    plan, reference, _ = finished
    out = tmp_path / "study"
    script = (f"import os, shutil, signal; shutil.copytree({str(reference / 'runs' / 'pgd-at-s0')!r}, "
              f"{str(out / 'runs' / 'pgd-at-s0')!r}, dirs_exist_ok=True); "
              "signal.signal(signal.SIGTERM, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGTERM)")
    started = _children_replaced(monkeypatch, script, ignore_sigterm=True)
    lines = []
    try:
        code = reproduce(plan, Options(out=out, only=("pgd-at-s0",), echo=lines.append, poll_seconds=0.05))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert code == 128 + signal.SIGINT, lines
    assert len(started) == 1 and started[0].returncode == -signal.SIGTERM, lines
    task = _status(out)["tasks"]["pgd-at-s0/train"]
    assert task["state"] == "done" and "error" not in task, (task, lines)
    assert any(line.startswith("[1/3 done] done train pgd-at-s0") for line in lines), lines


# --------------------------------------------------------------------------- a failing run among good ones
BROKEN_PLAN = """\
name = "tiny-broken"
methods = ["pgd-at"]
seeds = [0]
device = "cpu"

[settings]
dataset = "mnist"
data_dir = "{data_dir}"
model = "smallcnn"
train_size = 32
test_size = 32
batch_size = 16
epochs = 2
lr = 0.05
eps = 0.1
step_size = 0.04
steps = 1
eval_steps = 1

[arms.broken]
method = "pgd-at"
data_dir = "{broken_dir}"
lr = 0.04  # a setting the report sees: arms that differ only in data_dir would be one row

[[evaluate]]
checkpoints = ["last"]
attacks = ["clean"]
n_examples = 16
"""


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_go_on(mnist_dir, tmp_path):
    # The broken arm passes plan checking (a data folder is a run-time matter) and fails when it reads
    # its data: damaged MNIST files, so that no download is tried, with or without a network.
    broken_dir = tmp_path / "damaged-mnist"
    broken_dir.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (broken_dir / name).write_bytes(b"not a gzip file")
    plan = tmp_path / "broken.toml"
    plan.write_text(BROKEN_PLAN.format(data_dir=mnist_dir, broken_dir=broken_dir))
    out = tmp_path / "study"
    try:
        result = _reproduce(plan, out, "--jobs", 2)
    finally:
        _kill_leftovers(out)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output

    log = out / "logs" / "broken-s0.train.log"
    failed = [line for line in output.splitlines() if "FAILED train broken-s0" in line]
    assert len(failed) == 1 and "not a valid gzip file" in failed[0] and f"log: {log}" in failed[0], output
    assert "1 task(s) failed (train broken-s0), 1 skipped; the others are done" in output, output

    # The good arm: finished, evaluated, in the table.
    good = out / "runs" / "pgd-at-s0"
    assert [r["epoch"] for r in _metrics(good)] == [1, 2]
    assert json.loads((good / "eval" / "last.json").read_text())["n_examples_by_attack"] == {"clean": 16}
    rows = _table_rows((out / "report.md").read_text())
    assert len(rows) == 2 and rows[1].startswith("| pgd-at | 1 | 2 |"), rows  # the header, the good arm

    status = _status(out)["tasks"]
    assert status["pgd-at-s0/train"]["state"] == status["pgd-at-s0/eval-0"]["state"] == "done"
    assert status["broken-s0/train"]["state"] == "failed" and status["broken-s0/train"]["exit_status"] == 1
    assert "not a valid gzip file" in status["broken-s0/train"]["error"]
    assert "broken-s0/eval-0" not in status  # skipped: never started

    readme = (out / "README.md").read_text()
    incomplete = readme.split("## Not complete", 1)[1].split("\n## ", 1)[0]
    assert "- failed: train broken-s0: Error: " in incomplete and "not a valid gzip file" in incomplete
    assert "(log: `logs/broken-s0.train.log`)" in incomplete
    assert "- skipped: eval broken-s0 (clean on 16 test points, last): its training failed" in incomplete
    assert "- broken-s0: 0 of 2 epochs: not in the table" in incomplete


# --------------------------------------------------------------------------- plan errors
@pytest.fixture
def plan_text(tmp_path):
    return PLAN.format(data_dir=tmp_path / "mnist")  # plan checking reads no data


PLAN_ERRORS = {
    "unknown top-level key": (lambda t: t.replace('device = "cpu"', 'device = "cpu"\nepochs = 3'),
                              ["epochs: unknown key", "run settings go in [settings] or [arms.NAME]"]),
    "unknown method": (lambda t: t.replace('"pgd-at-te"]', '"pgd-at-tee"]'),
                       ["methods: unknown method 'pgd-at-tee'", "installed: "]),
    "unknown arm method": (lambda t: t + '\n[arms.x]\nmethod = "nope"\n', ["arms.x.method: unknown method 'nope'"]),
    "unknown setting": (lambda t: t.replace("[settings]", "[settings]\nbogus = 1"),
                        ["settings: unknown setting 'bogus'"]),
    "a setting no method of the plan has": (lambda t: t.replace("[settings]", "[settings]\nbeta = 6.0"),
                                            ["'beta' is a setting of no method in this plan"]),
    "a setting the arm's method lacks": (lambda t: t + '\n[arms.x]\nmethod = "pgd-at"\nbeta = 6.0\n',
                                         ["(arm x): unknown setting 'beta'"]),
    "a fractional epoch count": (lambda t: t.replace("epochs = 6", "epochs = 1.5"),
                                 ["(arm pgd-at)", "--epochs", "1.5", "not an integer"]),
    "zero epochs": (lambda t: t.replace("epochs = 6", "epochs = 0"), ["--epochs must be >= 1"]),
    "seed in [settings]": (lambda t: t.replace("[settings]", "[settings]\nseed = 3"),
                           ["seed: the plan's `methods`/[arms] and `seeds` set it"]),
    "a seed twice": (lambda t: t.replace("seeds = [0]", "seeds = [0, 0]"), ["seeds", "twice"]),
    "paired naming a non-arm": (lambda t: t.replace('"pgd-at:pgd-at-te"', '"pgd-at:trades"'),
                                ["report.paired", "'pgd-at:trades'", "two different arms of the plan"]),
    "an unknown attack": (lambda t: t.replace('["clean", "pgd20"]', '["clean", "fgsm"]'),
                          ["evaluate[0].attacks: unknown 'fgsm'"]),
    "an evaluation of a non-arm": (lambda t: t.replace('arms = ["pgd-at"]', 'arms = ["trades"]'),
                                   ["evaluate[1].arms: no arm 'trades'"]),
    "an evaluation of a seed not planned": (lambda t: t.replace('arms = ["pgd-at"]', "seeds = [1]"),
                                            ["evaluate[1].seeds: seed 1 is not among the plan's seeds"]),
    "late_after without track_samples": (lambda t: t.replace("track_samples = true", "track_samples = false"),
                                         ["report.late_after: needs track_samples = true"]),
    "not TOML": (lambda t: t + "\n[[[\n", ["not valid TOML"]),
    "a pair of one arm with itself": (lambda t: t.replace('"pgd-at:pgd-at-te"', '"pgd-at:pgd-at"'),
                                      ["'pgd-at:pgd-at'", "two different arms of the plan"]),
    "two arms the report cannot tell apart": (
        lambda t: t + '\n[arms.copy]\nmethod = "pgd-at"\nchannels_last = true\n',
        ["arms 'pgd-at' and 'copy' have the same settings", "settings the report ignores"]),
    "one attack of one checkpoint at two sizes": (
        lambda t: t.replace('attacks = ["cw"]', 'attacks = ["cw", "clean"]'),
        ["evaluate[1]: clean of last is also in evaluate[0] at another n_examples (16 vs 8)"]),
    "a plot seed not planned": (lambda t: t.replace("late_after = 1", "late_after = 1\nplot_seed = 4"),
                                ["report.plot_seed must be one of the plan's seeds [0]"]),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_plan_errors_are_one_line(case, plan_text, tmp_path):
    edit, words = PLAN_ERRORS[case]
    plan = tmp_path / "plan.toml"
    plan.write_text(edit(plan_text))
    message = str(pytest.raises(PlanError, read_plan, plan).value)
    assert "\n" not in message and str(plan) in message, message
    for word in words:
        assert word in message, (word, message)
    out = tmp_path / "study"
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(invoke("reproduce", plan, "--out", out, *extra), *words, exit_code=1)
    assert not out.exists()


def test_plan_errors_in_a_fresh_process_are_one_line(plan_text, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text.replace("epochs = 6", "epochs = 1.5"))
    result = _reproduce(plan, tmp_path / "study")
    assert_one_line_error(result, "--epochs", "not an integer", exit_code=1)
    missing = _reproduce(tmp_path / "absent.toml", tmp_path / "study")
    assert_one_line_error(missing, f"plan {tmp_path / 'absent.toml'}: no such file", exit_code=1)
    assert not (tmp_path / "study").exists()


def test_out_holding_another_plan_or_other_files_is_refused(plan_text, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    out = tmp_path / "study"
    out.mkdir()
    (out / "plan.toml").write_text(plan_text.replace("epochs = 6", "epochs = 7"))
    before = _tree(out)
    assert_one_line_error(invoke("reproduce", plan, "--out", out), f"{out} holds the runs of another plan",
                          "give another --out", exit_code=1)
    assert _tree(out) == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("reproduce", plan, "--out", other), "is not empty and holds no plan.toml",
                          exit_code=1)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_only_matching_nothing_and_torchrun_are_refused(plan_text, tmp_path, monkeypatch):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    out = tmp_path / "study"
    assert_one_line_error(invoke("reproduce", plan, "--out", out, "--only", "trades-*"),
                          "--only trades-*: no run of the plan matches", "pgd-at-s0, pgd-at-te-s0", exit_code=1)
    with pytest.raises(ReproduceError, match="no run of the plan matches"):
        reproduce(plan, Options(out=out, only=("nope",), echo=lambda line: None))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_one_line_error(invoke("reproduce", plan, "--out", out), "not under torchrun", exit_code=1)
    assert not out.exists()


# --------------------------------------------------------------------------- --dry-run
def test_dry_run_lists_the_tasks_and_runs_nothing(plan_text, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    out = tmp_path / "study"
    result = _reproduce(plan, out, "--dry-run", "--jobs", 2, "--threads", 1)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]  # data folder notes
    assert lines[0].startswith(f"plan tiny-mnist ({plan}): 2 arm(s)"), result.stderr
    assert lines[0].endswith("; 5 task(s), 2 at a time, 1 thread(s) each"), result.stderr
    assert [line.split()[:3] for line in lines[1:]] == [
        ["pending", "train", "pgd-at-s0"], ["pending", "eval", "pgd-at-s0"], ["pending", "eval", "pgd-at-s0"],
        ["pending", "train", "pgd-at-te-s0"], ["pending", "eval", "pgd-at-te-s0"]], result.stderr
    assert "(clean+pgd20 on 16 test points, best,last)" in lines[2] and "(cw on 8 test points, last)" in lines[3]
    assert not out.exists()

    only = invoke("reproduce", plan, "--out", out, "--dry-run", "--only", "*-te-s0")
    assert only.exit_code == 0, only.output
    assert [line.split()[:3] for line in only.output.splitlines()[1:] if not line.startswith("note: ")] == [
        ["pending", "train", "pgd-at-te-s0"], ["pending", "eval", "pgd-at-te-s0"]], only.output
    assert not out.exists()


# --------------------------------------------------------------------------- configs/plans
def test_the_repository_has_plans():
    assert PLANS_DIR.is_dir() and PLANS, f"no plan in {PLANS_DIR}"


@pytest.mark.parametrize("plan", PLANS, ids=[p.name for p in PLANS])
def test_every_shipped_plan_reads_and_dry_runs(plan, tmp_path):
    read = read_plan(plan)
    assert read.runs and read.arms and read.seeds
    out = tmp_path / "study"
    result = invoke("reproduce", plan, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"plan {read.name} ({plan}): "), result.output
    assert not out.exists()


# --------------------------------------------------------------------------- what the review found (issue 20)
@pytest.mark.slow
def test_an_edited_plan_under_a_finished_study_is_refused_naming_the_run_and_setting(finished, tmp_path):
    plan, out, _ = finished
    edited = plan.read_text().replace("eps = 0.1", "eps = 0.2")
    saved = (out / "plan.toml").read_text()
    (out / "plan.toml").write_text(edited)  # as the refusal for another plan tells the user to do
    try:
        changed = tmp_path / "plan.toml"
        changed.write_text(edited)
        before = _tree(out)
        for extra in ((), ("--dry-run",)):
            result = _reproduce(changed, out, *extra)
            assert_one_line_error(result, "runs/pgd-at-s0 was trained with other settings than the plan's", "'eps'",
                                  "saved 0.1, given 0.2", exit_code=1)
        assert _tree(out) == before  # nothing ran, nothing was rewritten
        # A removed setting differs too (its default would apply): issue 33, item 3, with real runs.
        removed = plan.read_text().replace("eps = 0.1\n", "")
        (out / "plan.toml").write_text(removed)
        changed.write_text(removed)
        assert_one_line_error(_reproduce(changed, out, "--dry-run"), "'eps'", f"saved 0.1, given {8 / 255!r}",
                              exit_code=1)
    finally:
        (out / "plan.toml").write_text(saved)


def test_a_run_folder_saved_with_another_setting_is_refused_with_both_values(plan_text, tmp_path):
    """The fast twin of the test above: the refusal is worded from the resume rule's own record of the
    difference (``SavedSettingDiffers``), not parsed from its message."""
    plan, out = tmp_path / "plan.toml", tmp_path / "study"
    plan.write_text(plan_text)
    out.mkdir()
    (out / "plan.toml").write_text(plan_text)
    run = read_plan(plan).runs[0]
    saved = out / "runs" / run.name
    saved.mkdir(parents=True)
    settings, method = run.whole_settings()  # as a run records them: every setting, resolved
    (saved / "config.json").write_text(json.dumps({"config": dict(settings, eps=0.2), "method": method}))
    result = invoke("reproduce", plan, "--out", out, "--dry-run")
    assert_one_line_error(result, f"runs/{run.name} was trained with other settings than the plan's: 'eps' (saved "
                          "0.2, given 0.1); restore the plan, or move the run folder away", exit_code=1)


def test_prepare_writes_every_runs_settings_with_an_absolute_data_dir(plan_text, tmp_path, mnist_dir):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    out = tmp_path / "study"
    result = invoke("reproduce", plan, "--out", out, "--prepare", "--data-dir", mnist_dir)
    assert result.exit_code == 0, result.output
    assert (out / "plan.toml").read_text() == plan_text
    for run in RUNS:
        document = json.loads((out / "settings" / f"{run}.json").read_text())
        assert document["data_dir"] == str(mnist_dir) and Path(document["data_dir"]).is_absolute()
        assert document["method"] == run.rsplit("-s", 1)[0] and document["seed"] == 0
    assert not (out / "runs").exists() and "nothing was run" in result.output


def test_a_missing_folder_of_data_that_cannot_be_downloaded_is_a_one_line_error(plan_text, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text.replace('dataset = "mnist"', 'dataset = "cifar10-exact"')
                    .replace('model = "smallcnn"', 'model = "preactresnet18_w16"').replace("drop_rate = 0.0\n", ""))
    result = _reproduce(plan, tmp_path / "study", "--data-dir", tmp_path / "nowhere")
    assert_one_line_error(result, "nowhere does not exist", "cifar10-exact cannot be downloaded", exit_code=1)
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cpu,"])
def test_a_bad_device_is_a_one_line_error(plan_text, tmp_path, device):
    plan = tmp_path / "plan.toml"
    plan.write_text(plan_text)
    result = invoke("reproduce", plan, "--out", tmp_path / "study", "--device", device, "--dry-run")
    if device == "cpu,":  # a trailing comma is harmless
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1 and f"--device {device!r}: use cpu, cuda, cuda:N or mps" in result.output


def test_an_evaluation_of_a_split_smaller_than_n_examples_is_done_once(tmp_path):
    """RobustBench's rule: the first N test points, all of them when the split is smaller. The record
    says how large the split was, so a plan asking for more does not rerun it on every call."""
    from at_memorization.reproduce import EvaluationSpec, RunState, missing_attacks

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    record = {"epoch": 5, "clean_acc": 0.5, "pgd20_acc": 0.2, "n_examples": 1017,
              "n_examples_by_attack": {"clean": 1017, "pgd20": 1017}}
    (run / "eval" / "last.json").write_text(json.dumps(record))
    spec = EvaluationSpec(0, ("last",), ("clean", "pgd20"), 10000, None, None)
    state = RunState(epochs_done=5, epochs=5, best_epoch=3, has_checkpoint=True)
    assert missing_attacks(run, spec, state) == {"last": ["clean", "pgd20"]}  # without the split's size: not done
    (run / "eval" / "last.json").write_text(json.dumps({**record, "test_split_size": 1017}))
    assert missing_attacks(run, spec, state) == {}
    smaller = EvaluationSpec(0, ("last",), ("clean",), 500, None, None)
    assert missing_attacks(run, smaller, state) == {"last": ["clean"]}  # 500 asked, 1017 measured: redo


def test_a_finished_run_without_its_checkpoints_is_not_trained_again(finished, tmp_path):
    """A study's records committed without checkpoints (*.pt are not committed), then checked out
    afresh: its finished runs are done, not retrained over their records; an evaluation that is
    still missing fails saying why."""
    import shutil

    plan, out, _ = finished
    copy = tmp_path / "study"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt"))
    result = _reproduce(plan, copy, "--dry-run")
    assert result.returncode == 0, result.stderr
    states = [line.split()[0] for line in result.stderr.splitlines() if line.startswith("  ")]
    assert states and set(states) == {"done"}, result.stderr
    (copy / "runs" / "pgd-at-s0" / "eval" / "last.json").unlink()
    before = (copy / "runs" / "pgd-at-s0" / "metrics.jsonl").read_text()
    again = _reproduce(plan, copy)
    assert again.returncode == 1, again.stderr
    assert "holds the run's records but not its checkpoints" in again.stderr
    assert (copy / "runs" / "pgd-at-s0" / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_the_python_snippet_of_docs_reproduce_md_runs_verbatim(mnist_dir, tmp_path):
    # The snippet as a user copies it, in a fresh process from the repository root (the smoke plan's
    # data_dir is relative to it); only its output folder is moved under tmp_path.
    text = (ROOT / "docs" / "reproduce.md").read_text()
    snippet = re.search(r"## Python\n\n```python\n(.*?)```", text, re.S).group(1)
    assert 'Path("/tmp/smoke")' in snippet, snippet
    if mnist_dir.resolve() != (ROOT.parent / "shared" / "data" / "mnist").resolve():
        pytest.skip(f"the smoke plan reads ../shared/data/mnist; the data here is {mnist_dir}")
    out = tmp_path / "smoke"
    script = tmp_path / "snippet.py"
    script.write_text(snippet.replace('"/tmp/smoke"', repr(str(out))))
    done = run_with_hang_guard([sys.executable, "-P", str(script)], env=subprocess_env(), cwd=ROOT, silence_s=SILENCE_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stderr, done.stderr
    status = _status(out)
    assert status["tasks"] and all(t["state"] == "done" for t in status["tasks"].values()), status["tasks"]
    assert _table_rows((out / "report.md").read_text()) and (out / "README.md").is_file()
