"""The private SLURM cluster (tests/slurm_cluster.py) behaves as the cluster tests rely on.

Each test pins down one behaviour of real SLURM (22.05, Debian's slurm-wlm) that a launcher built on
``sbatch``/``scontrol``/``srun`` depends on: output files, signals reaching a batch script's trap,
requeue, refusals, and the variables ``srun`` gives each task.
"""

from __future__ import annotations

import time
from pathlib import Path

from slurm_cluster import ENDED_STATES, wait_until

# Installed first, so that no signal can find the shell without its handlers.
_TRAPS = """#!/bin/bash
trap 'echo "TERM restart=${SLURM_RESTART_COUNT:-none}" >> "$LOG"; exit 0' TERM
trap 'echo "USR1 restart=${SLURM_RESTART_COUNT:-none}" >> "$LOG"; exit 0' USR1
"""


def _lines(path: Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for_line(path: Path, line: str, timeout: float = 60) -> None:
    wait_until(lambda: line in _lines(path), timeout, lambda: f"{path.name} holds {_lines(path)}, not {line!r}")


def test_wrapped_job_runs_and_writes_its_output_file(slurm_cluster, tmp_path):
    output = tmp_path / "wrap.out"
    job = slurm_cluster.sbatch(["--output", str(output), "--wrap",
                                'echo "job=$SLURM_JOB_ID partition=$SLURM_JOB_PARTITION conf=$SLURM_CONF"'])

    slurm_cluster.wait_for(job, "COMPLETED")

    assert _lines(output) == [f"job={job} partition={slurm_cluster.partition} conf={slurm_cluster.conf}"]


def test_signals_reach_the_batch_scripts_trap(slurm_cluster, tmp_path):
    warned_log, cancelled_log = tmp_path / "warned.log", tmp_path / "cancelled.log"
    body = _TRAPS + 'echo started >> "$LOG"\nwhile true; do sleep 0.2; done\n'
    # --signal=B:USR1@55 with a one-minute limit: slurmctld checks time limits about every 30 s, so
    # the warning comes at one of its checks within the first half minute.
    warned = slurm_cluster.sbatch(["--time=1", "--signal=B:USR1@55", "--output=/dev/null",
                                   f"--export=ALL,LOG={warned_log}"], body)
    cancelled = slurm_cluster.sbatch(["--output=/dev/null", f"--export=ALL,LOG={cancelled_log}"], body)
    _wait_for_line(cancelled_log, "started")

    # Without --batch, scancel --signal signals the job's steps only, never the batch script itself.
    slurm_cluster.run("scancel", "--signal=TERM", cancelled)
    time.sleep(1)
    assert (_lines(cancelled_log), slurm_cluster.job(cancelled)["JobState"]) == (["started"], "RUNNING")
    slurm_cluster.run("scancel", "--batch", "--signal=TERM", cancelled)

    assert slurm_cluster.wait_for(cancelled, ENDED_STATES)["JobState"] == "COMPLETED"
    assert _lines(cancelled_log) == ["started", "TERM restart=none"]
    assert slurm_cluster.wait_for(warned, ENDED_STATES, timeout=90)["JobState"] == "COMPLETED"
    assert _lines(warned_log) == ["started", "USR1 restart=none"]


def test_requeue_of_a_running_job_runs_it_again(slurm_cluster, tmp_path):
    output = tmp_path / "requeued.out"
    body = _TRAPS.replace('>> "$LOG"', "") + (
        'echo "run restart=${SLURM_RESTART_COUNT:-none}"\n'
        'if [ -z "$SLURM_RESTART_COUNT" ]; then while true; do sleep 0.2; done; fi\n'
    )
    # --open-mode=append: by default a requeued job's run truncates the output of the runs before it.
    job = slurm_cluster.sbatch(["--requeue", "--open-mode=append", f"--output={output}"], body)
    _wait_for_line(output, "run restart=none")

    slurm_cluster.scontrol("requeue", job)

    finished = slurm_cluster.wait_for(job, "COMPLETED")
    assert finished["Restarts"] == "1"
    first_run, *between, second_run = _lines(output)
    assert (first_run, second_run) == ("run restart=none", "run restart=1")
    # The trap's line and slurmstepd's notice, in either order, both written as the run is stopped; and
    # bash's "Terminated" for its sleep: a requeue sends SIGTERM to every process of the job, not only
    # to the batch script.
    notice = next(line for line in between if "DUE TO JOB REQUEUE" in line)
    assert sorted(line for line in between if line != "Terminated") == sorted(["TERM restart=none", notice])
    assert f"JOB {job} ON {slurm_cluster.node} CANCELLED AT" in notice


def test_a_job_requeues_itself(slurm_cluster, tmp_path):
    log = tmp_path / "self.log"
    script = ('#!/bin/bash\n'
              f'echo "run restart=${{SLURM_RESTART_COUNT:-none}}" >> {log}\n'
              'if [ -z "$SLURM_RESTART_COUNT" ]; then\n'
              '  trap "exit 0" TERM\n'
              '  scontrol requeue "$SLURM_JOB_ID"\n'
              '  while true; do sleep 0.2; done\n'
              'fi\n')
    job = slurm_cluster.sbatch(["--output=/dev/null"], script)

    assert slurm_cluster.wait_for(job, "COMPLETED")["Restarts"] == "1"
    assert _lines(log) == ["run restart=none", "run restart=1"]


def test_sbatch_refusals_are_short_and_submit_nothing(slurm_cluster):
    refused = slurm_cluster.run("sbatch", "--partition=nosuch", "--job-name=refused", "--wrap=true", check=False)
    bad_time = slurm_cluster.run("sbatch", "--time=soon", "--job-name=refused", "--wrap=true", check=False)

    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr.splitlines() == ["sbatch: error: invalid partition specified: nosuch",
                                           "sbatch: error: Batch job submission failed: Invalid partition name specified"]
    assert (bad_time.returncode, bad_time.stdout) == (255, "")
    assert bad_time.stderr.splitlines() == ["sbatch: error: Invalid --time specification"]
    assert [job for job in slurm_cluster.squeue() if job["name"] == "refused"] == []


def test_srun_gives_each_of_two_tasks_its_rank(slurm_cluster, tmp_path):
    output = tmp_path / "ranks.out"
    job = slurm_cluster.sbatch(["--ntasks=2", f"--output={output}", "--wrap",
                                "srun --ntasks=2 bash -c 'echo $SLURM_PROCID $SLURM_LOCALID $SLURM_NTASKS "
                                "$SLURM_JOB_NODELIST'"])

    slurm_cluster.wait_for(job, "COMPLETED")

    node = slurm_cluster.node
    assert sorted(_lines(output)) == [f"0 0 2 {node}", f"1 1 2 {node}"]
