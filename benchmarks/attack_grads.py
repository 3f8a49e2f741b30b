#!/usr/bin/env python
"""Issue 21, item 1: what the attack's weight gradients cost, measured in one run.

The attack needs the gradient with respect to its input only. Eager autograd skips weight
gradients there anyway, but a model compiled with ``torch.compile`` differentiated every parameter
at every attack step, until the attack ran with its parameters frozen
(``at_memorization.attacks.input_gradients_only``). This script times both behaviours in one
process, on the same trainer, batches and compiled module, alternating:

- ``input_only``: the package as it is (parameters frozen during the attack);
- ``with_weight_grads``: the behaviour before issue 21, restored for the benchmark by replacing
  ``input_gradients_only`` with a no-op.

For each variant (``eager``; ``compile``: the package's own ``--compile``, inductor on a CPU and
CUDA graphs on a GPU) it reports, per side:

- ``attack_ms_per_step``: ``method.attack`` alone, per batch (fastest and median pass);
- ``train_step_ms``: the whole training step (``Trainer.train_epoch`` over the same batches);
- ``conv_weight_grads_per_attack``: ``aten::convolution_backward`` calls whose ``output_mask``
  asks for the weight gradient, counted by ``torch.profiler`` (``record_shapes``) in one attack;
  on CUDA also ``wgrad_kernels_per_attack`` (device kernels named ``*wgrad*``, cuDNN's
  weight-gradient kernels) and ``dgrad_kernels_per_attack``.

The ratios (``with_weight_grads`` / ``input_only`` time) come from the passes of this one run.

    python benchmarks/attack_grads.py --device cpu --dataset mnist --data-dir ../shared/data/mnist \\
        --model smallcnn --batch-size 32 --steps 10 --iters 4 --repeats 5 --threads 2 --output out.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_run_arguments, device_name, make_data, package_trainer, sync, versions  # noqa: E402

import at_memorization.attacks as attacks_module  # noqa: E402
import at_memorization.methods.base as base_module  # noqa: E402
from at_memorization.atomic import write_text_atomic  # noqa: E402

SIDES = ("input_only", "with_weight_grads")


@contextlib.contextmanager
def _no_freeze(model):
    yield


@contextlib.contextmanager
def behaviour(side: str):
    """``with_weight_grads``: the attack as before issue 21 (parameters left requiring grad)."""
    if side == "input_only":
        yield
        return
    saved = attacks_module.input_gradients_only, base_module.input_gradients_only
    attacks_module.input_gradients_only = base_module.input_gradients_only = _no_freeze
    try:
        yield
    finally:
        attacks_module.input_gradients_only, base_module.input_gradients_only = saved


def count_gradient_work(trainer, batch, device) -> dict:
    """Weight-gradient convolutions (and, on CUDA, wgrad/dgrad kernels) in one attack."""
    x, y, index = batch
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        if trainer.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with trainer.autocast():
            trainer.method.attack(trainer.attack_model, x, y, index, 2)
        sync(device)
    conv, weight = 0, 0
    wgrad = dgrad = 0
    for event in prof.events():
        if event.name == "aten::convolution_backward":
            conv += 1
            mask = (getattr(event, "concrete_inputs", None) or [None])[-1]
            weight += bool(isinstance(mask, (list, tuple)) and len(mask) == 3 and mask[1])
        if event.device_type == torch.autograd.DeviceType.CUDA:
            wgrad += "wgrad" in event.name
            dgrad += "dgrad" in event.name
    counts = {"conv_backward_per_attack": conv, "conv_weight_grads_per_attack": weight}
    if device.type == "cuda":
        counts.update(wgrad_kernels_per_attack=wgrad, dgrad_kernels_per_attack=dgrad)
    return counts


def measure_variant(variant: str, args, bundle, out_root) -> dict:
    args.compile = variant == "compile"
    device = args.device
    trainer = package_trainer(args.method, args.model, bundle, args, out_root)
    try:
        generator = torch.Generator().manual_seed(1)
        batches = [trainer.prepare_batch(idx.to(device), generator)
                   for idx in torch.arange(len(bundle.train), device="cpu").split(args.batch_size)]

        def attack_pass() -> float:
            sync(device)
            start = time.perf_counter()
            for x, y, index in batches:
                if trainer.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                with trainer.autocast():
                    trainer.method.attack(trainer.attack_model, x, y, index, 2)
            sync(device)
            return time.perf_counter() - start

        def train_pass() -> float:
            sync(device)
            start = time.perf_counter()
            trainer.train_epoch(2)
            sync(device)
            return time.perf_counter() - start

        started = time.perf_counter()
        for side in SIDES:  # compile (and record) each side's graphs before timing
            with behaviour(side):
                for _ in range(args.warmup):
                    attack_pass()
                    train_pass()
        warmup_s = time.perf_counter() - started
        seconds = {side: {"attack": [], "train_step": []} for side in SIDES}
        for _ in range(args.repeats):  # alternate the sides, so drifting load hits both alike
            for side in SIDES:
                with behaviour(side):
                    seconds[side]["attack"].append(attack_pass())
                    seconds[side]["train_step"].append(train_pass())
        counts = {}
        for side in SIDES:
            with behaviour(side):
                counts[side] = count_gradient_work(trainer, batches[0], device)
        steps = len(batches)
        result = {"steps_per_pass": steps, "warmup_seconds": warmup_s, "seconds": seconds, "counts": counts}
        for side in SIDES:
            for what in ("attack", "train_step"):
                values = seconds[side][what]
                result.setdefault(side, {})[f"{what}_ms_per_step"] = min(values) / steps * 1e3
                result[side][f"{what}_ms_per_step_median"] = statistics.median(values) / steps * 1e3
        for what in ("attack", "train_step"):
            # > 1: the weight gradients cost that factor; fastest passes and medians of the same passes
            result[f"{what}_ratio_with_weight_grads_over_input_only"] = (
                min(seconds["with_weight_grads"][what]) / min(seconds["input_only"][what]))
            result[f"{what}_ratio_median"] = (statistics.median(seconds["with_weight_grads"][what])
                                              / statistics.median(seconds["input_only"][what]))
        before, after = result["with_weight_grads"], result["input_only"]
        print(f"{variant:8s} attack ms/step: input-only {after['attack_ms_per_step']:.1f}, with weight grads "
              f"{before['attack_ms_per_step']:.1f} (x{result['attack_ratio_with_weight_grads_over_input_only']:.2f}, "
              f"median x{result['attack_ratio_median']:.2f}); train step "
              f"x{result['train_step_ratio_with_weight_grads_over_input_only']:.2f} (median "
              f"x{result['train_step_ratio_median']:.2f}); weight-grad convolutions per attack "
              f"{counts['input_only']['conv_weight_grads_per_attack']} vs "
              f"{counts['with_weight_grads']['conv_weight_grads_per_attack']}", flush=True)
        return result
    finally:
        trainer.close()
        torch._dynamo.reset()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--method", default="pgd-at")
    parser.add_argument("--iters", type=int, default=4, help="batches per timed pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per side (compilation)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per side, alternated")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_root = tempfile.mkdtemp(prefix="attack-grads-")
    bundle, source = make_data(args, args.batch_size * args.iters)
    report = {"benchmark": "attack_grads", "date": datetime.date.today().isoformat(), "device": str(args.device),
              "device_name": device_name(args.device), "cpu_count": os.cpu_count(),
              "cpu_threads": torch.get_num_threads() if args.device.type == "cpu" else None,
              "load_average_at_start": os.getloadavg(), "versions": versions(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "note": args.note, "data": source,
              "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()
                           if k not in ("output", "note", "compile")},
              "sides": {"input_only": "the package: parameters frozen during the attack (issue 21)",
                        "with_weight_grads": "before issue 21: input_gradients_only replaced by a no-op"},
              "variants": {}}
    for variant in args.variants:
        report["variants"][variant] = measure_variant(variant, args, bundle, out_root)
        report["load_average_at_end"] = os.getloadavg()
        if args.output:
            write_text_atomic(json.dumps(report, indent=2) + "\n", args.output)
    return report


if __name__ == "__main__":
    main()
