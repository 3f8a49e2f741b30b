"""Two calls of `at-mem reproduce` on one new study folder (issue 33, item 6): one claims it, the other
gets one line that says what is true.

The races are made deterministic instead of being tried many times: the second call's first look at
DIR happens, then (by a hook in front of its lock) the first call does all its work, then the second
call takes the lock, the interleaving that let both `--prepare` succeed. A live lock in a folder
without plan.toml yet is what a call sees while another one is claiming the folder; it is held by a
real process here. One bounded test starts real processes at once and checks the outcome whatever
the interleaving.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_testing import assert_one_line_error, invoke, subprocess_env, tiny_mnist_plan_settings
from subprocess_guard import communicate_with_hang_guard

import at_memorization.reproduce as reproduce_module
from at_memorization.plan import read_plan
from at_memorization.reproduce import Options, ReproduceError, reproduce
from at_memorization.runlock import RunLock
from at_memorization.settings import RunConfig

# One arm, one seed, no evaluation: the tiny MNIST run of tests/cli_testing.py as a plan.
PLAN = """\
name = "race"
methods = ["pgd-at"]
seeds = [0]
device = "cpu"

"""
ANOTHER_CALL = "another at-mem reproduce works on this study"


def _plan(folder: Path, data_dir: Path, epochs: int, name: str) -> Path:
    path = folder / name
    path.write_text(PLAN + tiny_mnist_plan_settings(data_dir, epochs=epochs))
    return path


def _options(out: Path, **more) -> Options:
    return Options(out=out, echo=lambda line: None, **more)


def _settings_epochs(out: Path) -> int:
    return json.loads((out / "settings" / "pgd-at-s0.json").read_text())["epochs"]


@pytest.fixture
def rival_before_lock(monkeypatch):
    """``rival_before_lock(call)``: ``call`` runs in full just before this process's next call takes
    DIR's lock, i.e. after that call's first look at DIR (its checks and status read)."""
    waiting = []

    class RivalFirst(RunLock):
        def acquire(self):
            while waiting:
                waiting.pop()()
            return super().acquire()

    monkeypatch.setattr(reproduce_module, "RunLock", RivalFirst)
    return waiting.append


@pytest.fixture
def lock_holder():
    """``lock_holder(folder)``: a live process holding ``folder``'s lock (as a reproduce call holds DIR's);
    killed at the end, so its lock is left behind as a killed call leaves it."""
    started = []

    def start(folder: Path) -> subprocess.Popen:
        code = ("import sys; from at_memorization.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
                "print('held', flush=True); sys.stdin.read()")
        process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=subprocess_env())
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- 6a: two --prepare, two plans
def test_a_prepare_that_loses_the_new_folder_to_another_plan_is_refused(tmp_path, mnist_dir, rival_before_lock):
    """The second call looked at DIR while it was new; the first then prepared it with its own plan.
    Before: the second also succeeded, leaving the first's plan.toml beside its own settings."""
    first, second = _plan(tmp_path, mnist_dir, 1, "first.toml"), _plan(tmp_path, mnist_dir, 2, "second.toml")
    out = tmp_path / "study"
    outcomes = []
    rival_before_lock(lambda: outcomes.append(reproduce(first, _options(out, prepare=True))))
    with pytest.raises(ReproduceError) as refused:
        reproduce(second, _options(out, prepare=True))
    message = str(refused.value)
    assert outcomes == [0], outcomes  # the rival ran, inside the second call, and won
    assert "\n" not in message and f"{out} holds the runs of another plan" in message, message
    assert (out / "plan.toml").read_text() == first.read_text()
    assert _settings_epochs(out) == 1  # the winner's settings, untouched by the loser


def test_a_call_finds_what_another_call_did_while_it_waited_for_the_lock(tmp_path, mnist_dir, rival_before_lock,
                                                                         monkeypatch):
    """What a call reads before DIR's lock is read again under it: here the other call trained the run
    in between. Before: the call started the finished run again and overwrote the other's status.json."""
    plan = _plan(tmp_path, mnist_dir, 1, "plan.toml")
    out = tmp_path / "study"
    run = read_plan(plan).runs[0]

    def other_call_trains_the_run():
        run_dir = out / "runs" / run.name
        run_dir.mkdir(parents=True)
        (out / "plan.toml").write_text(plan.read_text())
        config = RunConfig(**run.given, method_args=run.given_method).resolve().to_dict()  # as a run saves it
        (run_dir / "config.json").write_text(json.dumps({"config": config, "method": dict(run.given_method)}))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_clean_acc": 0.5,
                                                           "test_robust_acc": 0.25}) + "\n")
        (out / "status.json").write_text(json.dumps({"format": 1, "plan": str(plan), "calls": [{"command": "other"}],
                                                     "tasks": {f"{run.name}/train": {"state": "done"}}}))

    def no_child(*args, **kwargs):
        raise AssertionError(f"a child was started: {args}")

    rival_before_lock(other_call_trains_the_run)
    monkeypatch.setattr(reproduce_module.subprocess, "Popen", no_child)
    monkeypatch.setattr(reproduce_module.Reproduction, "write_outputs", lambda self: [])
    lines = []
    assert reproduce(plan, Options(out=out, echo=lines.append)) == 0
    assert any(line.startswith("nothing to run") for line in lines), lines
    status = json.loads((out / "status.json").read_text())
    assert status["calls"] == [{"command": "other"}], status  # nothing ran: the other call's record stands


def test_a_folder_claimed_during_the_first_look_is_judged_by_its_plan(tmp_path, mnist_dir, monkeypatch):
    """The other call prepares DIR between this call's "no plan.toml" and its listing of DIR: the
    refusal names the other plan, not "is not empty and holds no plan.toml"."""
    first, second = _plan(tmp_path, mnist_dir, 1, "first.toml"), _plan(tmp_path, mnist_dir, 2, "second.toml")
    out = tmp_path / "study"
    out.mkdir()
    check_free = reproduce_module.check_free
    rival = [lambda: reproduce(first, _options(out, prepare=True))]

    def rival_then_check(folder):
        while rival:
            assert rival.pop()() == 0
        return check_free(folder)

    monkeypatch.setattr(reproduce_module, "check_free", rival_then_check)
    assert_one_line_error(invoke("reproduce", second, "--out", out, "--dry-run"),
                          f"{out} holds the runs of another plan", exit_code=1)
    assert not rival and _settings_epochs(out) == 1


# --------------------------------------------------------------------------- 6b: a folder being claimed
def test_a_new_folder_that_another_call_is_claiming_is_refused_naming_that_call(tmp_path, mnist_dir, lock_holder):
    """Before: "is not empty and holds no plan.toml" (its lock file was all it held)."""
    plan = _plan(tmp_path, mnist_dir, 1, "plan.toml")
    out = tmp_path / "study"
    holder = lock_holder(out)
    for extra in ([], ["--prepare"], ["--dry-run"]):
        assert_one_line_error(invoke("reproduce", plan, "--out", out, *extra), ANOTHER_CALL,
                              f"{out} is in use by PID {holder.pid} on this host", exit_code=1)
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside the claim

    # The same once the other call has written its plan.toml: refused at the lock, in the same words.
    (out / "plan.toml").write_text(plan.read_text())
    assert_one_line_error(invoke("reproduce", plan, "--out", out, "--prepare"), ANOTHER_CALL,
                          f"is in use by PID {holder.pid}", exit_code=1)


def test_a_folder_holding_only_what_a_killed_claim_left_is_new(tmp_path, mnist_dir, lock_holder):
    """A call killed while claiming DIR leaves its lock (of a dead process) and temporaries: the next
    call takes the folder. Before: "is not empty and holds no plan.toml"."""
    plan = _plan(tmp_path, mnist_dir, 1, "plan.toml")
    out = tmp_path / "study"
    holder = lock_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (out / ".lock.0123456789abcdef.tmp").write_text("{")
    (out / ".plan.toml.x1y2z3.tmp").write_text("name = ")
    result = invoke("reproduce", plan, "--out", out, "--prepare")
    assert result.exit_code == 0, result.output
    assert (out / "plan.toml").read_text() == plan.read_text() and _settings_epochs(out) == 1
    assert not (out / ".lock").exists()  # released

    other = tmp_path / "other"  # anything else in a folder without plan.toml is still refused
    other.mkdir()
    (other / ".lock.notes").write_text("mine")  # a lock's name, but not a name the lock uses
    (other / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("reproduce", plan, "--out", other), "is not empty and holds no plan.toml",
                          exit_code=1)


# --------------------------------------------------------------------------- real processes at once
@pytest.mark.slow
def test_concurrent_prepares_of_two_plans_have_one_winner(tmp_path, mnist_dir):
    """Three new folders, each given two `--prepare` of different plans at once (about 1 in 8 such pairs
    had two winners before): whatever the interleaving, one wins, the folder is all its plan's, and
    the other says why in one line."""
    plans = {epochs: _plan(tmp_path, mnist_dir, epochs, f"plan-{epochs}.toml") for epochs in (1, 2)}
    pairs = []
    for i in range(3):
        out = tmp_path / f"study-{i}"
        pairs.append((out, {epochs: subprocess.Popen(
            [sys.executable, "-m", "at_memorization", "reproduce", str(plan), "--out", str(out), "--prepare"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path,
            stdin=subprocess.DEVNULL) for epochs, plan in plans.items()}))
    for out, processes in pairs:
        results = {epochs: communicate_with_hang_guard(process, silence_s=120)
                   for epochs, process in processes.items()}
        codes = {epochs: process.returncode for epochs, process in processes.items()}
        winners = [epochs for epochs, code in codes.items() if code == 0]
        assert len(winners) == 1, (out, codes, results)
        (winner,) = winners
        (loser,) = set(codes) - {winner}
        assert codes[loser] == 1, (out, codes, results)
        stdout, stderr = results[loser]
        errors = [line for line in (stdout + stderr).splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr, (stdout, stderr)
        assert ANOTHER_CALL in errors[0] or "holds the runs of another plan" in errors[0], errors
        assert (out / "plan.toml").read_text() == plans[winner].read_text()
        assert _settings_epochs(out) == winner
