"""Issue 29, item 3: a run started by ``srun`` reads its distributed setup from SLURM's variables
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST``) as
one started by torchrun reads torchrun's; on the real single-node cluster of ``slurm_cluster``, a
2-task gloo run under srun equals the same run under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_testing import subprocess_env, tiny_train_args
from subprocess_guard import run_with_hang_guard

from at_memorization.runtime import first_host, slurm_distributed_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("gpu[07-09,12],cpu1", "gpu07"), ("a,b", "a"),
                                           ("n[003]", "n003"), ("cpu1,gpu[2-3]", "cpu1"),
                                           ("node[1-2]-ib,x", "node1-ib")])
def test_the_rendezvous_host_is_the_first_of_the_jobs_nodes(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_tasks_get_torchruns_variables_and_nothing_else_does():
    task = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert slurm_distributed_environment(task) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20_000 + 4242)}
    assert slurm_distributed_environment({**task, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert slurm_distributed_environment({**task, "WORLD_SIZE": "4"}) == {}  # torchrun inside the job: its own
    batch_script = {k: v for k, v in task.items() if k != "SLURM_STEP_ID"}  # PROCID=0 there too, no step
    assert slurm_distributed_environment({**batch_script, "SLURM_PROCID": "0"}) == {}
    assert slurm_distributed_environment({**task, "SLURM_NTASKS": "1"}) == {}


def _args(mnist_dir, out) -> list[str]:
    return tiny_train_args(mnist_dir, out, model="preactresnet18_w16", epochs=2, train_size=128, test_size=32,
                           batch_size=32, steps=2, eval_steps=1, milestones=[2])


def _load(run: Path) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_two_task_srun_run_equals_the_same_run_under_torchrun(slurm_cluster, mnist_dir, tmp_path):
    torchrun = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "at_memorization", "train", *_args(mnist_dir, torchrun)]
    result = run_with_hang_guard(command, cwd=tmp_path, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]

    srun = tmp_path / "srun"
    train = " ".join([sys.executable, "-m", "at_memorization", "train", *map(str, _args(mnist_dir, srun))])
    env = {**slurm_cluster.env, **{k: v for k, v in subprocess_env().items() if k not in slurm_cluster.env}}
    submitted = subprocess.run(["sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--chdir={tmp_path}",
                                f"--output={tmp_path / 'job.out'}", f"--wrap=srun --kill-on-bad-exit=1 {train}"],
                               env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    state = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=600)
    log = (tmp_path / "job.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert json.loads((srun / "config.json").read_text())["world_size"] == 2
    a, b = _load(torchrun), _load(srun)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    metrics = [[{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (torchrun, srun)]
    assert metrics[0] == metrics[1]
