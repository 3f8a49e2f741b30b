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
