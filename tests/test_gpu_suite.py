"""The GPU suite's dry run (--tiny, CPU, MNIST): every stage runs and writes the JSON the docs describe,
so the suite cannot rot between the rare GPU leases. No timing is asserted, and no subprocess has a
wall-clock timeout: a loaded machine makes these tests slower, not red. Their hang guard
(tests/subprocess_guard.py) fires only after a long silence on both stdout and stderr."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from subprocess_guard import run_with_hang_guard

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu" / "suite.py"
COLLECT = ROOT / "benchmarks" / "gpu" / "collect.py"
METHODS = ("pgd-at", "pgd-at-te", "trades", "trades-te", "pgd-at-awp", "trades-awp", "pgd-at-te-awp", "mart")
# suite.py prints a line as each step starts and ends, but says nothing while one step's subprocess
# runs. The longest silent subprocesses are the --compile epochs of bench_train (runtime stage, 24 s
# on a 2-core machine shared with another session) and the concurrency benchmark (21 s), as the
# former `at-mem train --compile` step (43 s on an idle machine), so 600 s of silence leaves room
# for a 14x slowdown.
SUITE_SILENCE_S = 600
# The suite's own --budget-s is wall-clock too (a step with too little left is skipped, and a running
# step is killed when the budget is spent), so the runs that must complete every step get a day.
NO_BUDGET_S = 86_400


def _suite(*args, mnist_dir, silence_s=SUITE_SILENCE_S):
    env = {**os.environ, "AT_MEM_SHARED_DATA": str(mnist_dir.parent)}
    return run_with_hang_guard([sys.executable, "-P", str(SUITE), *map(str, args)], env=env, silence_s=silence_s)


@pytest.fixture(scope="module")
def tiny_run(mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    done = _suite("all", "--tiny", "--out", out, "--work", out.parent / "gpu-suite-work", "--budget-s", NO_BUDGET_S,
                  mnist_dir=mnist_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def _load(out: Path, stage: str) -> dict:
    record = json.loads((out / f"{stage}.json").read_text())
    assert record["stage"] == stage and record["tiny"] is True and record["skipped"] == {}
    assert record["device_name"].startswith("cpu")
    return record


@pytest.mark.slow
def test_check_stage_records_tests_agreement_runs_and_evaluation(tiny_run):
    out, stdout = tiny_run
    steps = _load(out, "check")["steps"]
    assert steps["environment"]["versions"]["at-memorization"] and steps["environment"]["cuda_available"] in (True, False)
    assert steps["cuda_tests"]["ok"] and "skipped" in steps["cuda_tests"]["output_tail"]  # no CUDA here
    agreement = steps["bf16_agreement"]
    assert set(agreement["runs"]) == {"fp32", "bf16_channels_last"}
    assert all(run["ok"] and len(run["metrics"]) == 1 for run in agreement["runs"].values())
    fp32, bf16 = (agreement["runs"][k]["metrics"][0] for k in ("fp32", "bf16_channels_last"))
    assert agreement["difference_bf16_minus_fp32"]["test_robust_acc"] == pytest.approx(
        bf16["test_robust_acc"] - fp32["test_robust_acc"])
    for method in METHODS:
        run = steps[f"two_epochs_{method}"]
        assert run["ok"] and [m["epoch"] for m in run["metrics"]] == [1, 2], method
        assert "--bf16" in run["command"] and "--channels-last" in run["command"]
    evaluation = steps["evaluate_all"]["evaluation"]
    assert evaluation["epoch"] == 2 and evaluation["n_examples"] == 32
    assert 0 <= evaluation["pgd20_acc"] <= evaluation["clean_acc"] <= 1
    assert "failed: nothing" in stdout


@pytest.mark.slow
def test_profile_stage_counts_host_operators_per_step(tiny_run):
    out, _ = tiny_run
    step = _load(out, "profile")["steps"]["profile_pgd-at"]
    assert step["ok"]
    eager = step["profile"]["variants"]["eager"]
    assert eager["steps"] == 2 and eager["wall_ms_per_step"] > 0
    # On a CPU there are no kernel launches to count, but the host operators are (attack, loss, update).
    assert eager["kernel_launches_per_step"] == 0 and eager["host_ops_per_step"] > 50
    assert eager["top_host_ops"] and eager["busy_fraction"] is None


def test_only_runs_the_named_steps_of_the_named_stages(mnist_dir, tmp_path):
    done = _suite("check,profile", "--tiny", "--only", "profile_pgd-at", "--out", tmp_path, "--budget-s", NO_BUDGET_S,
                  mnist_dir=mnist_dir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert list(check["steps"]) == ["environment"] and check["skipped"]["cuda_tests"] == "not selected (--only)"
    assert list(json.loads((tmp_path / "profile.json").read_text())["steps"]) == ["profile_pgd-at"]
    assert not (tmp_path / "speed.json").exists()
    wrong = _suite("check,warp", "--tiny", "--out", tmp_path, mnist_dir=mnist_dir)
    assert wrong.returncode == 2 and "unknown stage warp" in wrong.stderr


@pytest.mark.slow
def test_runtime_stage_comes_first_with_compile_epochs_concurrency_and_attack_gradients(tiny_run):
    """Issue 21: a lease starts with --compile over whole epochs (evaluation included) and with
    concurrent runs (items 3 and 4), then the attack's weight-gradient check (item 1)."""
    out, stdout = tiny_run
    assert stdout.index("runtime: train_compile_vs_eager") < stdout.index("check: cuda_tests")
    record = _load(out, "runtime")
    assert list(record["steps"])[:2] == ["train_compile_vs_eager", "concurrency"]
    check = record["steps"]["train_compile_vs_eager"]
    assert all(run["ok"] for run in check["runs"].values())
    assert "--compile" in check["runs"]["compile"]["command"] and "--compile" not in check["runs"]["eager"]["command"]
    for label in ("eager", "compile"):
        full = check["runs"][label]["benchmark"]["full_epoch"]["pgd-at"]
        assert full["last_batch"] == 6 and len(full["epochs"]) == 2  # 70 = 4 x 16 + 6: a smaller last batch
        for epoch, total in zip(full["epochs"], check["epoch_seconds"][label]):
            assert epoch["eval_test"] > 0 and epoch["epoch_total"] == total  # evaluation is part of the epoch
            assert epoch["epoch_total"] >= epoch["train"] + epoch["eval_test"]
    assert check["last_epoch_speedup"] == pytest.approx(check["epoch_seconds"]["eager"][-1]
                                                        / check["epoch_seconds"]["compile"][-1])
    concurrency = record["steps"]["concurrency"]["benchmark"]
    assert [r["config"] for r in concurrency["results"]] == ["1x16t1", "2x16t1", "1x32t1"]
    assert all(r["ok"] and r["aggregate_images_per_s"] > 0 for r in concurrency["results"])
    assert len(concurrency["results"][1]["per_run_images_per_s"]) == 2
    (row,) = concurrency["summary"]
    assert row["concurrent"] == "2x16t1" and row["one_larger_batch_run"] == "1x32t1"
    assert isinstance(row["concurrency_beats_larger_batch"], bool)
    grads = record["steps"]["attack_grads"]["benchmark"]["variants"]["eager"]
    assert grads["counts"]["input_only"]["conv_weight_grads_per_attack"] == 0
    assert grads["counts"]["input_only"]["conv_backward_per_attack"] > 0


@pytest.mark.slow
def test_speed_stage_summarizes_package_against_reference(tiny_run):
    out, _ = tiny_run
    record = _load(out, "speed")
    assert set(record["steps"]) == {"fp32", "bf16_channels_last"}  # no compile bench
    table = record["summary"]["images_per_s"]
    assert set(table) == set(METHODS[:4])  # the benchmark's reference loop covers the four TE-paper methods
    for method, row in table.items():
        assert row["fp32"] > 0 and row["bf16_channels_last"] > 0 and row["reference_fp32"] > 0, method
        raw = record["steps"]["fp32"]["benchmark"]["methods"][method]
        assert row["fp32"] == raw["package_images_per_s"]
    (estimate,) = record["summary"]["epoch_estimate"]
    assert estimate["model"] == "smallcnn" and estimate["seconds_per_cifar10_epoch"] == pytest.approx(
        50_000 / estimate["images_per_s"])


@pytest.mark.slow
def test_reproduce_stage_runs_the_smoke_plan_and_packs_its_records(tiny_run):
    out, _ = tiny_run
    step = _load(out, "reproduce")["steps"]["reproduce"]
    assert step["ok"] and step["plan"] == "configs/plans/smoke-mnist.toml"
    assert "reproduce" in step["command"] and "--jobs 2" in step["command"]
    assert sorted(step["runs"]) == ["pgd-at-s0", "pgd-at-s1", "pgd-at-te-s0", "pgd-at-te-s1"]
    assert all([m["epoch"] for m in metrics] == [1, 2] for metrics in step["runs"].values())
    assert {task["state"] for task in step["status"]["tasks"].values()} == {"done"}
    assert {row["label"] for row in step["report"]["groups"]} == {"pgd-at", "pgd-at-te"}
    with tarfile.open(out / "runs.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"reproduce/runs/pgd-at-s0/metrics.jsonl", "reproduce/runs/pgd-at-te-s1/eval/last.json",
            "reproduce/report.md", "reproduce/README.md", "reproduce/status.json"} <= names
    assert not any(name.endswith(".pt") for name in names)


@pytest.mark.slow
def test_collect_copies_under_the_device_name(tiny_run, tmp_path):
    out, _ = tiny_run
    done = run_with_hang_guard([sys.executable, str(COLLECT), str(out), "--results", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("gpu-cpu-")
    assert {p.name for p in folder.iterdir()} == {"runtime.json", "check.json", "profile.json", "speed.json",
                                                  "reproduce.json", "runs.tar.gz"}
    assert "check on cpu" in done.stdout and "pgd-at:" in done.stdout
    again = run_with_hang_guard([sys.executable, str(COLLECT), str(out), "--results", str(tmp_path)])
    assert again.returncode == 0, again.stderr  # a second lease the same day: a new folder, the first kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name, f"{folder.name}-2"]


def test_a_spent_budget_skips_every_step_and_says_why(mnist_dir, tmp_path):
    done = _suite("all", "--tiny", "--out", tmp_path, "--budget-s", 0, mnist_dir=mnist_dir)
    assert done.returncode == 0, done.stderr
    check = json.loads((tmp_path / "check.json").read_text())
    assert list(check["steps"]) == ["environment"]
    assert {"cuda_tests", "bf16_agreement", "two_epochs_pgd-at", "evaluate_all"} <= set(check["skipped"])
    assert "left of the budget" in check["skipped"]["cuda_tests"]
    assert json.loads((tmp_path / "reproduce.json").read_text())["steps"] == {}
    runtime = json.loads((tmp_path / "runtime.json").read_text())
    assert runtime["steps"] == {} and {"train_compile_vs_eager", "concurrency", "attack_grads"} <= set(runtime["skipped"])


def test_full_settings_need_a_cuda_device_or_tiny(tmp_path):
    done = run_with_hang_guard([sys.executable, "-P", str(SUITE), "check", "--out", str(tmp_path)])
    assert done.returncode != 0 and "--cifar-dir is needed" in done.stderr


def test_collect_refuses_a_folder_without_results(tmp_path):
    done = run_with_hang_guard([sys.executable, str(COLLECT), str(tmp_path)])
    assert done.returncode == 2 and done.stderr.startswith("error: none of")


# --------------------------------------------------------------------------- the hang guard itself (fast, no data)
def _python(code: str) -> list[str]:
    """A Python child that starts in milliseconds (-I -S: no site, no user paths)."""
    return [sys.executable, "-I", "-S", "-c", textwrap.dedent(code)]


_SILENT_CHILD = """
    import os, subprocess, sys, time
    helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", "import time; time.sleep(30)"])  # same group
    print(f"started {os.getpid()} {os.getpgid(0)} {helper.pid}", flush=True)
"""


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not dead (zombies, which nothing may reap here, are dead)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue  # gone meanwhile
            if int(group) == pgid and state not in "ZX":
                members.append(int(entry.name))
    return members


def _assert_group_gone(message: str) -> None:
    (line,) = [line for line in message.splitlines() if line.startswith("started ")]  # the output's tail
    pid, pgid, helper = map(int, line.split()[1:])
    assert pgid == pid and helper != pid  # the child led its own group, and the helper was in it
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: give the kernel a moment
    while _live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_group_members(pgid) == []


def test_hang_guard_lets_a_child_that_keeps_talking_run_past_the_silence_limit():
    started = time.monotonic()
    # One line every 0.2 s for 3 s: first on stdout, then on stderr, so that each stream alone is
    # silent for longer than silence_s; only output on neither stream counts as a hang.
    done = run_with_hang_guard(_python("""
        import sys, time
        for i in range(15):
            print(f"line {i}", file=sys.stdout if i < 8 else sys.stderr, flush=True)
            time.sleep(0.2)
        sys.exit(3)
    """), silence_s=1)
    assert time.monotonic() - started > 2.9  # longer than silence_s in all
    assert done.returncode == 3
    assert done.stdout.splitlines() == [f"line {i}" for i in range(8)]
    assert done.stderr.splitlines() == [f"line {i}" for i in range(8, 15)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_hang_guard_kills_a_silent_child_and_its_process_group():
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"no output for 1 s \(hung\?\)") as info:
        run_with_hang_guard(_python(_SILENT_CHILD + "    time.sleep(30)\n"), silence_s=1)
    elapsed = time.monotonic() - started
    assert 1 <= elapsed < 25, elapsed  # killed after 1 s of silence, not after the child's 30 s sleep
    _assert_group_gone(str(info.value))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_hang_guard_fires_when_a_leftover_process_keeps_the_pipes_open():
    # The child exits at once, but a process it left behind holds stdout and says nothing: a plain
    # subprocess.run would wait for that pipe forever.
    with pytest.raises(AssertionError, match=r"no output for 1 s \(hung\?\)") as info:
        run_with_hang_guard(_python(_SILENT_CHILD), silence_s=1)
    _assert_group_gone(str(info.value))


def test_hang_guard_refuses_a_wall_clock_timeout():
    with pytest.raises(TypeError, match="silence_s"):
        run_with_hang_guard(_python("pass"), timeout=5)
