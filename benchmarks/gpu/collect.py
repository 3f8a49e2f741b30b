#!/usr/bin/env python
"""Copy what a GPU suite call brought back into benchmarks/results/gpu-<device>-<date>/ and summarize it.

    python benchmarks/gpu/collect.py FILES_AT [--results benchmarks/results]

FILES_AT is the folder the device tool's reply names (the suite's --out: runtime.json, check.json, profile.json, speed.json,
reproduce.json, suite.log, runs.tar.gz). The folder name carries the device name from the JSON,
so results from different cards never mix. Prints a short summary to paste into notes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
from pathlib import Path

FILES = ("runtime.json", "check.json", "profile.json", "speed.json", "reproduce.json", "suite.log", "runs.tar.gz")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def summary(folder: Path) -> list[str]:
    lines = []
    for name in ("runtime", "check", "profile", "speed", "reproduce"):
        path = folder / f"{name}.json"
        if not path.exists():
            lines.append(f"{name}: not run")
            continue
        record = json.loads(path.read_text())
        steps = record.get("steps", {})
        states = [f"{step}={'ok' if r.get('ok', True) else 'FAILED(' + str(r.get('rc')) + ')'}"
                  for step, r in steps.items() if isinstance(r, dict)]
        lines.append(f"{name} on {record.get('device_name')}: " + ", ".join(states))
        if record.get("skipped"):
            lines.append(f"  skipped: {', '.join(record['skipped'])}")
        if record.get("error"):
            lines.append(f"  error: {record['error']}")
        for method, row in (record.get("summary", {}).get("images_per_s") or {}).items():
            lines.append(f"  {method}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in row.items() if v))
        for row in record.get("summary", {}).get("epoch_estimate") or []:
            mfu = f", MFU {row['mfu_vs_bf16_peak']:.1%}" if row.get("mfu_vs_bf16_peak") else ""
            lines.append(f"  {row['model']} batch {row['batch_size']}: {row['seconds_per_cifar10_epoch']:.1f} s/epoch{mfu}")
        compiled = steps.get("train_compile_vs_eager") or {}
        if compiled.get("epoch_seconds"):
            even = compiled.get("break_even_epochs")
            lines.append("  epoch seconds (training + evaluation + checkpoints): " + "; ".join(
                f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in compiled["epoch_seconds"].items())
                + f"; steady speed-up x{compiled['steady_epoch_speedup']:.2f}, break-even "
                + (f"after {even:.1f} epochs" if even else "never"))
        for row in ((steps.get("concurrency") or {}).get("benchmark") or {}).get("results") or []:
            lines.append(f"  concurrency {row['config']} {row['variant']}: " + (
                f"{row['aggregate_images_per_s']:.0f} img/s aggregate" if row.get("ok") else f"failed ({row.get('rc')})"))
        for variant, row in (((steps.get("attack_grads") or {}).get("benchmark") or {}).get("variants") or {}).items():
            counts = row["counts"]
            lines.append(f"  attack {variant}: weight-gradient convolutions per attack "
                         f"{counts['input_only']['conv_weight_grads_per_attack']} (was "
                         f"{counts['with_weight_grads']['conv_weight_grads_per_attack']}), attack time with/without "
                         f"x{row['attack_ratio_with_weight_grads_over_input_only']:.2f}")
        for step in steps.values():
            for variant, row in ((step.get("profile") or {}).get("variants") or {}).items() if isinstance(step, dict) else ():
                lines.append(f"  {variant}: " + (row["error"] if "error" in row else
                             f"{row['wall_ms_per_step']:.1f} ms/step, {row['kernel_launches_per_step']:.0f} kernel "
                             f"launches/step, device busy {row['device_busy_ms_per_step']:.1f} ms/step"))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files_at")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args(argv)
    source = Path(args.files_at)
    found = [source / name for name in FILES if (source / name).exists()]
    if not found:
        print(f"error: none of {', '.join(FILES)} in {source}", file=sys.stderr)
        return 2
    device = "unknown-device"
    for path in found:
        if path.suffix == ".json":
            device = json.loads(path.read_text()).get("device_name") or device
            break
    base = Path(args.results) / f"gpu-{slug(device)}-{datetime.date.today().isoformat()}"
    target, number = base, 1
    while target.exists():  # a second lease on the same day must not overwrite the first one's results
        number += 1
        target = base.with_name(f"{base.name}-{number}")
    target.mkdir(parents=True)
    for path in found:
        shutil.copyfile(path, target / path.name)
    print(f"copied {len(found)} files to {target}")
    print("\n".join(summary(target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
