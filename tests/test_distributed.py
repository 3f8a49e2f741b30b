"""Multi-process training on CPU: 2 gloo processes under torchrun, real MNIST.

Two torchrun launches in all (module fixture): ``tests/ddp_worker.py`` (the TE synchronization
check, a full 2-epoch ``pgd-at-te`` run and the same run stopped after epoch 1), then
``at-mem train --resume`` on the stopped run. The tests compare the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from at_memorization.data import epoch_batches
from cli_testing import subprocess_env, tiny_train_args
from subprocess_guard import run_with_hang_guard

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env()
TRAIN_SIZE = 255  # odd: DistributedSampler pads one shard with a repeated index
EPOCHS = 2


def _args(mnist_dir: Path) -> list[str]:
    # preactresnet18_w16 has BatchNorm, whose running statistics must agree across ranks.
    return tiny_train_args(mnist_dir, None, "--te-start", 1, "--te-end", 2, method="pgd-at-te",
                           model="preactresnet18_w16", epochs=EPOCHS, train_size=TRAIN_SIZE, test_size=64,
                           batch_size=64, steps=2, eval_steps=2, milestones=[2])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = run_with_hang_guard(command, cwd=ROOT, env=ENV)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def ddp_runs(mnist_dir, tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(out), *_args(mnist_dir))
    resumed = _torchrun("-m", "at_memorization", "train", *_args(mnist_dir), "--out", str(out / "interrupted"),
                        "--resume")
    _torchrun("-m", "at_memorization", "train", *_args(mnist_dir), "--out", str(out / "midepoch"), "--resume")
    return out, resumed


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_te_ensemble_under_two_processes_equals_the_single_process_result(ddp_runs):
    out, _ = ddp_runs
    result = json.loads((out / "te.json").read_text())
    assert result["ranks_identical"]
    assert result["max_abs_diff_to_single_process"] == 0.0
    assert result["fast_path_max_abs_diff_to_single_process"] == 0.0
    assert result["rows_touched"] == 51 and result["dtype"] == "torch.float32"


def test_ddp_run_writes_each_epoch_once_and_checkpoints_from_rank_0(ddp_runs):
    out, _ = ddp_runs
    full = out / "full"
    records = _metrics(full)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["te_weight_now"] < records[1]["te_weight_now"] == 300.0
    assert all(r["te_loss"] > 0 for r in records)  # TE active from epoch 1
    for name in ("last.pt", "best.pt", "config.json", "init.pt"):
        assert (full / name).is_file()
    assert not list(full.glob("*.tmp*"))
    assert json.loads((full / "config.json").read_text())["world_size"] == 2
    last = _load(full / "last.pt")
    assert last["epoch"] == EPOCHS and [r["epoch"] for r in last["history"]] == [1, 2]


def test_stopped_and_resumed_ddp_run_equals_the_uninterrupted_one(ddp_runs):
    out, resumed = ddp_runs
    assert "resumed from" in resumed.stderr
    full, interrupted = out / "full", out / "interrupted"
    assert [r["epoch"] for r in _metrics(interrupted)] == [1, 2]  # epoch 1 not repeated
    a, b = _load(full / "last.pt"), _load(interrupted / "last.pt")
    for key, value in a["model"].items():  # weights and BatchNorm statistics
        assert torch.equal(value, b["model"][key]), key
    te_a, te_b = a["method"]["state"]["te"]["ensemble"], b["method"]["state"]["te"]["ensemble"]
    assert te_a.abs().sum() > 0 and torch.equal(te_a, te_b)
    drop = ("train_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _metrics(full)]
            == [{k: v for k, v in r.items() if k not in drop} for r in _metrics(interrupted)])
    # Resuming a finished run (one process is enough) says so and changes nothing.
    before = (interrupted / "metrics.jsonl").read_text()
    done = run_with_hang_guard([sys.executable, "-m", "at_memorization", "train",
                                *_args(Path(a["config"]["data_dir"])), "--out", str(interrupted), "--resume"],
                               cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr
    assert "already finished all 2 epochs" in done.stdout
    assert (interrupted / "metrics.jsonl").read_text() == before


def test_distributed_sampler_gives_each_rank_its_own_shard_each_epoch(ddp_runs):
    out, _ = ddp_runs
    seen = {}
    for rank in (0, 1):
        for entry in json.loads((out / f"batches-full-rank{rank}.json").read_text()):
            assert entry["rank"] == rank
            seen[entry["epoch"], rank] = entry["indices"]
    assert sorted({e for e, _ in seen}) == [1, 2]
    padding = (-TRAIN_SIZE) % 2
    for epoch in (1, 2):
        shard0, shard1 = seen[epoch, 0], seen[epoch, 1]
        assert len(shard0) == len(shard1) == (TRAIN_SIZE + padding) // 2
        assert len(set(shard0)) == len(shard0) and len(set(shard1)) == len(shard1)
        assert len(set(shard0) & set(shard1)) == padding  # disjoint but for the sampler's padding
        assert set(shard0) | set(shard1) == set(range(TRAIN_SIZE))
        # the trainer's order is the pure function of (seed, epoch, rank) that resume relies on
        assert shard0 == torch.cat(list(epoch_batches(TRAIN_SIZE, 32, seed=0, epoch=epoch, rank=0,
                                                      world_size=2))).tolist()
    assert seen[1, 0] != seen[2, 0]  # set_epoch reshuffles


def test_a_ddp_run_resumed_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_one(ddp_runs):
    # Issue 29: a mid-epoch checkpoint held rank 0's augmentation stream and epoch sums only, so a
    # torchrun resume from it gave rank 1 rank 0's sums (that epoch's metrics off) and stream.
    out, _ = ddp_runs
    partial = _load(out / "midepoch-partial.pt")["partial"]
    assert (partial["epoch"], partial["step"]) == (1, 2)
    ranks = partial["per_rank"]
    assert len(ranks) == 2 and ranks[0]["sums"].keys() == ranks[1]["sums"].keys()
    assert not torch.equal(ranks[0]["sums"]["train_loss"], ranks[1]["sums"]["train_loss"])  # each its own shard
    assert not torch.equal(ranks[0]["augment_rng"], ranks[1]["augment_rng"])
    full, resumed = out / "full", out / "midepoch"
    a, b = _load(full / "last.pt"), _load(resumed / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    drop = ("train_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _metrics(full)]
            == [{k: v for k, v in r.items() if k not in drop} for r in _metrics(resumed)])


_SIGNALLED_RANK = """\
import os, signal, sys
import at_memorization.cli as cli

original, steps = cli._ProgressCallbacks.step, []


def step(self):  # rank 1 alone gets SIGTERM (as from a scheduler) in its second step
    steps.append(1)
    if os.environ["RANK"] == "1" and len(steps) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    original(self)


cli._ProgressCallbacks.step = step
cli.main(sys.argv[1:])
"""


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_step_with_a_checkpoint(mnist_dir, tmp_path):
    # Issue 29: the processes agreed on a stop every 25 steps only, so a signal with a short grace period
    # (a scheduler's preemption) could end the run before any checkpoint was written.
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    worker, run = tmp_path / "worker.py", tmp_path / "run"
    worker.write_text(_SIGNALLED_RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               "train", *_args(mnist_dir), "--out", str(run)]
    result = run_with_hang_guard(command, cwd=tmp_path, env=ENV)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "SIGTERM: stopping after the current step" in result.stderr, result.stderr[-3000:]
    last = _load(run / "last.pt")
    assert last["partial"]["epoch"] == 1 and last["partial"]["step"] == 2, last.get("partial")
    assert len(last["partial"]["per_rank"]) == 2
    assert not (run / "metrics.jsonl").read_text().strip()  # no epoch finished


_FAILING_RANK = """\
import os, sys
import at_memorization.cli as cli
from at_memorization.runtime import TrainingError

original, steps = cli._ProgressCallbacks.step, []


def step(self):  # rank 1 alone fails in its second step (as a full disk or a lost lock would)
    steps.append(1)
    if os.environ["RANK"] == "1" and len(steps) == 2:
        raise TrainingError("injected failure on rank 1")
    original(self)


cli._ProgressCallbacks.step = step
cli.main(sys.argv[1:])
"""

_BLOCKED_RANK = """\
import os, sys, time
import torch.distributed as dist
from at_memorization.runtime import DistributedContext, report_failure

ctx = DistributedContext("cpu")
if ctx.rank == 1:  # fails but stays alive and out of the collective: rank 0 would wait there for ever
    report_failure("injected failure on rank 1")
    time.sleep(60)
else:
    dist.barrier()
"""


def _torchrun_script(tmp_path, script: str, *args) -> tuple[subprocess.CompletedProcess, float]:
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               *map(str, args)]
    import time

    began = time.monotonic()
    result = run_with_hang_guard(command, cwd=tmp_path, env=ENV, silence_s=120)
    return result, time.monotonic() - began


def test_an_error_on_one_rank_ends_every_rank_with_its_one_line_message(mnist_dir, tmp_path):
    # Issue 29: rank 0 died in a collective with a traceback ("Connection closed by peer") when rank 1
    # failed; every process now ends with the failing one's line.
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    result, _ = _torchrun_script(tmp_path, _FAILING_RANK, "train", *_args(mnist_dir), "--out", tmp_path / "run")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Error: injected failure on rank 1" in output, output[-3000:]
    assert ("Error: process 1 of this run failed: injected failure on rank 1; this process (0) stops too"
            in output), output[-3000:]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output, output[-3000:]


def test_a_rank_waiting_in_a_collective_stops_within_a_second_of_another_ranks_failure(tmp_path):
    # The NCCL case on CPU: the failed process is alive but out of the collective, which then never ends.
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    result, seconds = _torchrun_script(tmp_path, _BLOCKED_RANK)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "Error: process 1 of this run failed: injected failure on rank 1; this process (0) stops too" in output
    assert seconds < 45, seconds  # rank 1 sleeps 60 s: rank 0's watch ended the run, not rank 1's end


_OUTLIVING_RANK = """\
import sys, time
import torch.distributed as dist
from at_memorization.runtime import DistributedContext

ctx = DistributedContext("cpu")
dist.barrier()
if ctx.rank == 1:  # outlives rank 0, the store's host under an env:// launch (srun): a healthy ending
    time.sleep(3)
    print("rank 1 finished its work", flush=True)
"""


def test_a_rank_that_outlives_the_stores_host_is_not_taken_for_failed(tmp_path):
    # The review of this stop: the watch took a finished rank 0 (the store's host under srun) for a
    # failure and ended rank 1 with exit 1 while it was still working.
    import socket

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    script = tmp_path / "outliving.py"
    script.write_text(_OUTLIVING_RANK)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert "rank 1 finished its work" in outputs[1][0], outputs
    assert not [line for line in outputs[1][1].splitlines() if line.startswith("Error: ")], outputs
