#!/usr/bin/env python
"""Issue 29: what agreeing on a stop at every step costs a multi-process run.

A scheduler's preemption gives a few seconds between SIGTERM and SIGKILL, so the processes of a
torchrun (or srun) run must agree on a stop at every step, not every 25 as before. The agreement
is a one-number all-reduce over the CPU (gloo; on CUDA a gloo side group, so it never waits for
the GPU's queue). This script starts ``--processes`` processes and measures, in each:

- ``agreement_us``: the time of one agreement (``guard.stop_agreed``), over ``--repeats`` calls;
- ``epoch_s``: the time of the package's training epoch (``Trainer.train_epoch``) with the stop agreed
  at every step and every 25 steps, alternated ``--rounds`` times, and their ratio.

    python benchmarks/stop_agreement.py --device cpu --data-dir ../shared/data/mnist --output out.json

It writes JSON with the device, the settings and every raw figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from at_memorization.machine import machine_description


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from at_memorization.training import RunConfig, Trainer, guard

    config = RunConfig(method="pgd-at", dataset="mnist", data_dir=args.data_dir, model=args.model,
                       epochs=args.rounds * 2, train_size=args.train_size, test_size=16,
                       batch_size=args.batch_size, steps=args.steps, eval_steps=1, milestones=[10_000])
    out = Path(args.out) / "run"
    trainer = Trainer(config, out, device=args.device)
    ctx = trainer.ctx
    sync = (lambda: torch.cuda.synchronize(ctx.device)) if ctx.device.type == "cuda" else (lambda: None)
    for _ in range(10):  # warm-up of the group's connections
        guard.stop_agreed(ctx, False, 1)
    dist.barrier()
    began = time.perf_counter()
    for _ in range(args.repeats):
        guard.stop_agreed(ctx, False, 1)
    agreement_us = (time.perf_counter() - began) / args.repeats * 1e6
    trainer.train_epoch(1)  # warm-up epoch
    epochs = {"every_step": [], "every_25_steps": []}
    for epoch in range(2, 2 + 2 * args.rounds):
        every = 1 if epoch % 2 == 0 else 25
        guard.STOP_CHECK_EVERY = every
        dist.barrier()
        sync()
        began = time.perf_counter()
        trainer.train_epoch(epoch)
        sync()
        epochs["every_step" if every == 1 else "every_25_steps"].append(time.perf_counter() - began)
    guard.STOP_CHECK_EVERY = 1
    steps = -(-args.train_size // args.batch_size)
    result = {"rank": ctx.rank, "agreement_us": agreement_us, "epoch_s": epochs, "steps_per_epoch": steps}
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, result)
    trainer.close()
    if ctx.rank == 0:
        Path(args.out, "ranks.json").write_text(json.dumps(gathered))
    trainer.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--data-dir", required=True, help="MNIST's folder")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="PGD steps of training")
    parser.add_argument("--repeats", type=int, default=2000, help="timed agreements")
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per variant, alternated")
    parser.add_argument("--output", required=True)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as out:
        settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k not in ("worker", "out", "output")]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.processes}", __file__, "--worker", "--out", out, "--output", "-",
                   *settings]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(command, check=True, env=env)
        ranks = json.loads(Path(out, "ranks.json").read_text())
    mean = {k: sum(sum(r["epoch_s"][k]) for r in ranks) / sum(len(r["epoch_s"][k]) for r in ranks)
            for k in ("every_step", "every_25_steps")}
    report = {
        "benchmark": "stop_agreement", "date": datetime.date.today().isoformat(), "device": args.device,
        "machine": machine_description((args.device,)), "processes": args.processes, "threads_per_process":
        int(os.environ.get("OMP_NUM_THREADS", "1")), "settings": {k: v for k, v in vars(args).items()
                                                                   if k not in ("worker", "out", "output")},
        "ranks": ranks,
        "summary": {"agreement_us_mean": sum(r["agreement_us"] for r in ranks) / len(ranks),
                    "epoch_s_mean": mean, "every_step_over_every_25": mean["every_step"] / mean["every_25_steps"]},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
