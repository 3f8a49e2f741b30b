#!/usr/bin/env python
"""Issue 21, item 4: the aggregate throughput of several training runs sharing one device.

One PGD-AT run leaves a GPU mostly idle (the host cannot launch kernels fast enough; see
docs/benchmarks.md). Until ``at-mem reproduce --jobs`` exists, concurrent runs are separate
processes. This script starts K processes at once, each the package's own training step
(``Trainer.train_epoch`` over ``--iters`` in-memory batches, as ``benchmarks/bench_train.py``
times it), and measures:

- ``aggregate_images_per_s``: all processes' timed images over the wall time from the first
  timed pass's start to the last one's end (the processes pass a barrier after their warm-up
  and compilation, so the timed passes overlap);
- ``per_run_images_per_s``: each process's own images over its own timed section;
- ``overlap``: the share of that wall time during which all K were timing.

A configuration is ``KxB`` (K processes of batch B) or ``KxBtT`` (T CPU threads each, e.g.
``2x32t1``), run once per ``--variants`` entry (``eager``, ``compile``: the package's ``--compile``,
CUDA graphs on a GPU). ``summary`` says, per variant, whether K concurrent runs of batch B beat one
run of batch K*B (the other way to fill the device) where both were measured.

    # on this 2-core CPU: two one-thread runs against one two-thread run
    python benchmarks/concurrency.py --device cpu --dataset mnist --data-dir ../shared/data/mnist \\
        --model smallcnn --steps 10 --configs 1x32t2 2x32t1 1x64t2 --variants eager --output out.json
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_config(text: str) -> dict:
    """``KxB`` or ``KxBtT`` -> {"runs": K, "batch_size": B, "threads": T or None}."""
    try:
        runs, rest = text.lower().split("x", 1)
        batch, _, threads = rest.partition("t")
        config = {"runs": int(runs), "batch_size": int(batch), "threads": int(threads) if threads else None}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a configuration is KxB or KxBtT (e.g. 2x128, 2x32t1)") from None
    if config["runs"] < 1 or config["batch_size"] < 1 or (config["threads"] is not None and config["threads"] < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: K, B and T must be positive")
    return config


# --------------------------------------------------------------------------- one process
def child(args) -> None:
    import torch

    from bench_train import make_data, package_trainer, sync

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    torch.manual_seed(args.index)
    out_root = tempfile.mkdtemp(prefix=f"concurrency-{args.index}-")
    bundle, source = make_data(args, args.batch_size * args.iters)
    trainer = package_trainer(args.method, args.model, bundle, args, out_root)
    try:
        def one_pass() -> float:
            sync(args.device)
            start = time.perf_counter()
            trainer.train_epoch(2)
            sync(args.device)
            return time.perf_counter() - start

        started = time.perf_counter()
        for _ in range(args.warmup):
            one_pass()
        warmup_s = time.perf_counter() - started
        ready = Path(args.ready_dir)
        (ready / f"ready-{args.index}").touch()
        while len(list(ready.glob("ready-*"))) < args.count:  # the barrier: every process warmed up
            if (ready / "abort").exists():
                raise SystemExit("another process failed; aborting")
            time.sleep(0.02)
        wall_start = time.time()
        seconds = [one_pass() for _ in range(args.repeats)]
        wall_end = time.time()
        images = len(bundle.train) * args.repeats
        Path(args.output).write_text(json.dumps({
            "index": args.index, "data": source, "warmup_seconds": warmup_s, "seconds": seconds,
            "timed_start": wall_start, "timed_end": wall_end, "images": images,
            "images_per_s": images / (wall_end - wall_start),
            "cpu_threads": torch.get_num_threads() if args.device.type == "cpu" else None}) + "\n")
    finally:
        trainer.close()


# --------------------------------------------------------------------------- the parent
def run_config(config: dict, variant: str, args, work: Path, deadline: float) -> dict:
    k, batch, threads = config["runs"], config["batch_size"], config["threads"]
    folder = Path(tempfile.mkdtemp(prefix=f"k{k}-b{batch}-{variant}-", dir=work))
    common = [sys.executable, str(Path(__file__).resolve()), "--child", "--ready-dir", str(folder),
              "--count", str(k), "--device", args.device, "--model", args.model, "--method", args.method,
              "--batch-size", str(batch), "--steps", str(args.steps), "--eps", str(args.eps),
              "--step-size", str(args.step_size), "--dataset", args.dataset, "--data-dir", args.data_dir,
              "--iters", str(args.iters), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    common += ["--bf16"] if args.bf16 else []
    common += ["--channels-last"] if args.channels_last else []
    common += ["--random-data"] if args.random_data else []
    common += ["--compile"] if variant == "compile" else []
    common += ["--threads", str(threads)] if threads else []
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    procs = []
    for i in range(k):
        log = open(folder / f"child-{i}.log", "w")
        procs.append((subprocess.Popen([*common, "--index", str(i), "--output", str(folder / f"child-{i}.json")],
                                       stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = None
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log.close()
        if rc != 0 and failed is None:
            failed = rc
            (folder / "abort").touch()  # the others stop at the barrier
            for other, _ in procs:
                if other.poll() is None:
                    other.kill()
                    other.wait()
    label = f"{k}x{batch}" + (f"t{threads}" if threads else "")
    if failed is not None:
        tails = {i: (folder / f"child-{i}.log").read_text()[-1500:] for i in range(k)}
        print(f"{label:10s} {variant:8s} failed ({failed})", flush=True)
        return {"config": label, "variant": variant, "ok": False, "rc": failed, "logs": tails}
    runs = [json.loads((folder / f"child-{i}.json").read_text()) for i in range(k)]
    start, end = min(r["timed_start"] for r in runs), max(r["timed_end"] for r in runs)
    together = max(0.0, min(r["timed_end"] for r in runs) - max(r["timed_start"] for r in runs))
    result = {"config": label, "variant": variant, "ok": True, "runs": k, "batch_size": batch, "threads": threads,
              "aggregate_images_per_s": sum(r["images"] for r in runs) / (end - start),
              "per_run_images_per_s": [r["images_per_s"] for r in runs],
              "overlap": together / (end - start), "wall_seconds": end - start, "processes": runs}
    print(f"{label:10s} {variant:8s} aggregate {result['aggregate_images_per_s']:9.1f} img/s "
          f"(per run {', '.join(f'{x:.1f}' for x in result['per_run_images_per_s'])}; overlap {result['overlap']:.0%})",
          flush=True)
    return result


def summarize(results: list[dict]) -> list[dict]:
    """For each variant: K runs of batch B against one run of batch K*B, where both ran (with several
    rounds, each configuration's best round)."""
    done = {}
    for r in results:
        key = (r["variant"], r["runs"], r["batch_size"], r["threads"])
        if r.get("ok") and (key not in done or r["aggregate_images_per_s"] > done[key]["aggregate_images_per_s"]):
            done[key] = r
    rows = []
    for (variant, k, batch, threads), concurrent in sorted(done.items()):
        if k == 1:
            continue
        # the single run to compare with uses the same CPU threads in all (K runs of T threads: one of K*T)
        same_threads = threads * k if threads else None

        def single(b):
            rows = [r for (v, kk, bb, t), r in done.items() if v == variant and kk == 1 and bb == b]
            return next((r for r in rows if r["threads"] == same_threads), rows[0] if rows else None)

        single_same, single_large = single(batch), single(k * batch)
        row = {"variant": variant, "concurrent": concurrent["config"],
               "concurrent_images_per_s": concurrent["aggregate_images_per_s"]}
        if single_same:
            row.update(one_run=single_same["config"], one_run_images_per_s=single_same["aggregate_images_per_s"],
                       gain_over_one_run=concurrent["aggregate_images_per_s"] / single_same["aggregate_images_per_s"])
        if single_large:
            row.update(one_larger_batch_run=single_large["config"],
                       one_larger_batch_images_per_s=single_large["aggregate_images_per_s"],
                       concurrency_beats_larger_batch=concurrent["aggregate_images_per_s"]
                       > single_large["aggregate_images_per_s"])
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    from bench_train import add_run_arguments, device_name, versions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--method", default="pgd-at")
    parser.add_argument("--configs", nargs="+", type=parse_config, default=None,
                        help="KxB or KxBtT each (default: 1x128 2x128 3x128 1x256 1x384)")
    parser.add_argument("--variants", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--iters", type=int, default=20, help="training steps per timed pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before the barrier")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per process")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole list of configurations this many times, round-robin (on a shared "
                             "machine load only slows a round down: the summary uses each configuration's best)")
    parser.add_argument("--budget-s", type=float, default=3600, help="stop starting configurations after this")
    parser.add_argument("--note", default="")
    parser.add_argument("--output", default=None)
    # the child's own options
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-dir", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    import torch

    configs = args.configs or [parse_config(c) for c in ("1x128", "2x128", "3x128", "1x256", "1x384")]
    deadline = time.monotonic() + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="concurrency-"))
    report = {"benchmark": "concurrency", "date": datetime.date.today().isoformat(), "device": args.device,
              "device_name": device_name(torch.device(args.device)), "cpu_count": os.cpu_count(),
              "versions": versions(), "load_average": {"start": os.getloadavg(), "end": None},
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "note": args.note,
              "settings": {"model": args.model, "method": args.method, "attack_steps": args.steps, "eps": args.eps,
                           "step_size": args.step_size, "iters": args.iters, "warmup": args.warmup,
                           "repeats": args.repeats, "bf16": args.bf16, "channels_last": args.channels_last,
                           "dataset": args.dataset, "random_data": args.random_data},
              "what": "K processes, each timing Trainer.train_epoch over in-memory batches after its warm-up and a "
                      "barrier; aggregate images/s over the span of all timed passes",
              "results": [], "skipped": []}
    for round_ in range(1, args.rounds + 1):
        for variant in args.variants:
            for config in configs:
                label = f"{config['runs']}x{config['batch_size']}" + (f"t{config['threads']}" if config["threads"] else "")
                if time.monotonic() > deadline - 5:
                    report["skipped"].append(f"{label} {variant} (round {round_}): budget spent")
                    continue
                result = run_config(config, variant, args, work, deadline)
                result["round"] = round_
                result["load_average_after"] = os.getloadavg()
                report["results"].append(result)
                report["summary"] = summarize(report["results"])
                report["load_average"]["end"] = os.getloadavg()
                if args.output:
                    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for row in report.get("summary", []):
        print(f"{row['variant']:8s} {row['concurrent']:8s} {row['concurrent_images_per_s']:.1f} img/s"
              + (f"; one run {row['one_run']}: {row['one_run_images_per_s']:.1f} (x{row['gain_over_one_run']:.2f})"
                 if "one_run" in row else "")
              + (f"; one run {row['one_larger_batch_run']}: {row['one_larger_batch_images_per_s']:.1f} -> concurrency "
                 f"{'beats' if row['concurrency_beats_larger_batch'] else 'does not beat'} it"
                 if "one_larger_batch_run" in row else ""), flush=True)
    if args.output:
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
