#!/usr/bin/env python
"""How long ``at-mem`` takes to answer the commands that train nothing, in one run (issue 19).

Each command runs as a fresh process, the way a user starts it (the ``at-mem`` console script next
to this Python), ``--runs`` times, round-robin over the commands so that a change of load on the
machine hits them alike, after one untimed run of each. Timed: ``python -c pass`` (the floor: the
interpreter alone), ``at-mem --help``, ``at-mem methods``, ``at-mem models``, ``at-mem train
--epochs abc`` (an argument error), ``at-mem train --help``, and two references: ``at-mem methods``
without the method catalog cache (``AT_MEM_NO_CACHE=1``: it imports the method classes, and torch,
as every call did before the cache) and ``python -c "import torch"``.

The CLI gets a cache folder of its own (``AT_MEM_CACHE_DIR``, a temporary folder, filled by the
untimed runs), so the user's cache is neither read nor written. The machine's load average is
recorded before and after: other processes slow these figures down, so read them with it.

Output: a table of medians on stdout and JSON (machine, Python, load, every raw time, medians) in
``benchmarks/results/startup-<date>.json`` unless ``--output`` says otherwise. This script imports
neither torch nor the package.

    python benchmarks/bench_startup.py --runs 9 --note "idle 2-core machine"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(script: str) -> dict[str, tuple[list[str], dict]]:
    """label -> (argv, extra environment)."""
    python = sys.executable
    return {
        "python -c pass": ([python, "-c", "pass"], {}),
        "at-mem --help": ([script, "--help"], {}),
        "at-mem methods": ([script, "methods"], {}),
        "at-mem models": ([script, "models"], {}),
        "at-mem train --epochs abc": ([script, "train", "--epochs", "abc"], {}),
        "at-mem train --help": ([script, "train", "--help"], {}),
        "at-mem methods (AT_MEM_NO_CACHE=1)": ([script, "methods"], {"AT_MEM_NO_CACHE": "1"}),
        "python -c 'import torch'": ([python, "-c", "import torch"], {}),
    }


def cpu_name() -> str:
    # at_memorization.machine.cpu_name, copied: importing the package here would import torch and warm
    # the page cache that the timed children's startup depends on.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run_once(argv: list[str], env: dict) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def version_of(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each command (the median is reported)")
    parser.add_argument("--script", default=str(Path(sys.executable).parent / "at-mem"),
                        help="the at-mem console script [default: the one next to this Python]")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL", help="time only these commands")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--output", default=None,
                        help="write the JSON here [default: benchmarks/results/startup-<date>.json]")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if not Path(args.script).is_file():
        parser.error(f"no at-mem console script at {args.script} (pip install -e . first, or give --script)")
    chosen = commands(args.script)
    if args.only:
        unknown = [label for label in args.only if label not in chosen]
        if unknown:
            parser.error(f"unknown command label {unknown[0]!r}; labels: {', '.join(chosen)}")
        chosen = {label: chosen[label] for label in args.only}

    cache = tempfile.mkdtemp(prefix="bench-startup-cache-")
    base_env = {k: v for k, v in os.environ.items() if k not in ("AT_MEM_NO_CACHE", "PYTHONWARNINGS")}
    base_env.update({"AT_MEM_CACHE_DIR": cache, "COLUMNS": "100"})
    envs = {label: {**base_env, **extra} for label, (_, extra) in chosen.items()}
    load_before = load_average()
    try:
        returncodes = {}
        for label, (command, _) in chosen.items():  # untimed: fills the cache and the OS's file cache
            returncodes[label] = run_once(command, envs[label])[1]
        cache_files = sorted(p.name for p in Path(cache).glob("*.json"))
        times: dict[str, list[float]] = {label: [] for label in chosen}
        for _ in range(args.runs):
            for label, (command, _) in chosen.items():
                seconds, code = run_once(command, envs[label])
                times[label].append(round(seconds, 4))
                if code != returncodes[label]:
                    raise SystemExit(f"{label}: exit status {code}, {returncodes[label]} before")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    load_after = load_average()

    results = {}
    print(f"{'command':40s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for label, (command, extra) in chosen.items():
        values = times[label]
        results[label] = {"argv": [Path(a).name if a in (args.script, sys.executable) else a for a in command],
                          "environment": extra, "exit_status": returncodes[label], "seconds": values,
                          "median_s": round(statistics.median(values), 4), "min_s": min(values), "max_s": max(values)}
        print(f"{label:40s} {results[label]['median_s']:9.3f} {min(values):7.3f} {max(values):7.3f}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")

    report = {
        "benchmark": "bench_startup", "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "versions": {name: version_of(name) for name in ("at-memorization", "click", "torch", "timm")},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "note": args.note,
        "settings": {"runs": args.runs, "untimed_runs_first": 1, "order": "round-robin over the commands",
                     "method_catalog_cache": "a fresh AT_MEM_CACHE_DIR, written by the untimed runs "
                                             f"({', '.join(cache_files) or 'no file'})"},
        "commands": results,
    }
    output = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"startup-{report['date']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
