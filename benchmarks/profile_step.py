#!/usr/bin/env python
"""Where a training step's time goes: kernel launches, device-busy time and the top operators.

Tests the hypothesis in docs/benchmarks.md that a PGD-AT step of PreActResNet-18 at batch 128 is
bound by kernel launches (the host cannot issue kernels as fast as the GPU runs them), and what a
compiled model changes. For each variant it runs the package's own ``Trainer.train_epoch`` over
``--iters`` batches once untimed, then once under ``torch.profiler``, and records per step:

- ``wall_ms``: host wall time of a step (synchronised at the ends of the pass);
- ``kernel_launches``: CUDA kernel launches issued by the host (``cudaLaunchKernel`` and kin), and
  ``graph_launches`` (``cudaGraphLaunch``: one per replayed CUDA graph);
- ``device_busy_ms``: summed time of the kernels themselves; ``busy_fraction`` = busy / profiled
  wall, ``busy_fraction_unprofiled`` = busy / the wall time of the same pass without the profiler
  (``wall_ms_per_step_unprofiled``; the profiler slows the host, so this is the fraction of an
  ordinary step). A launch-bound step has a low busy fraction: the GPU waits for the host;
- ``conv_weight_grads_per_step``: convolution backward calls that compute a weight gradient (one
  per convolution is the update's; a compiled attack used to add one per convolution per attack
  step, issue 21), and on CUDA ``wgrad_kernels_per_step`` / ``dgrad_kernels_per_step``;
- the ten operators with the most device time and the ten with the most host time.

Variants: ``eager`` (bf16 + channels_last, the package's fast path), ``compile`` (``torch.compile``
in its default mode: fused kernels, launched one by one) and ``compile_cudagraphs``
(``mode="reduce-overhead"``, CUDA graphs: many kernels, one launch; what the package's ``--compile``
does on CUDA). A variant that fails records its error and the others go on.

    python benchmarks/profile_step.py --device cuda --dataset imagefolder --data-dir DIR --output out.json
    python benchmarks/profile_step.py --device cpu --dataset mnist --data-dir ../shared/data/mnist \\
        --model smallcnn --batch-size 16 --iters 2 --steps 2 --variants eager --output /tmp/p.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_run_arguments, device_name, make_data, package_trainer, sync, versions  # noqa: E402

from at_memorization.atomic import write_text_atomic  # noqa: E402

VARIANTS = ("eager", "compile", "compile_cudagraphs")
LAUNCH_NAMES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel")


def top_ops(events, key: str, n: int = 10) -> list[dict]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key, "calls": e.count, "self_device_ms": e.self_device_time_total / 1e3,
             "self_host_ms": e.self_cpu_time_total / 1e3} for e in rows]


def gradient_work(trainer, device, activities, steps) -> dict:
    """Per training step: ``aten::convolution_backward`` calls, those computing a weight gradient
    (``output_mask[1]``, read from the profiler's recorded arguments), and on CUDA the cuDNN
    weight- and input-gradient kernels (names with ``wgrad`` / ``dgrad``). A PGD-K step needs one
    weight gradient per convolution (the update); the attack's K backward passes need none
    (issue 21: a compiled attack computed them all). A separate pass, since ``record_shapes`` slows
    the host further."""
    with profile(activities=activities, record_shapes=True) as prof:
        trainer.train_epoch(2)
        sync(device)
    conv = weight = wgrad = dgrad = 0
    for event in prof.events():
        if event.name == "aten::convolution_backward":
            conv += 1
            mask = (getattr(event, "concrete_inputs", None) or [None])[-1]
            weight += bool(isinstance(mask, (list, tuple)) and len(mask) == 3 and mask[1])
        if event.device_type == torch.autograd.DeviceType.CUDA:
            wgrad += "wgrad" in event.name
            dgrad += "dgrad" in event.name
    counts = {"conv_backward_per_step": conv / steps, "conv_weight_grads_per_step": weight / steps}
    if device.type == "cuda":
        counts.update(wgrad_kernels_per_step=wgrad / steps, dgrad_kernels_per_step=dgrad / steps)
    return counts


def profile_variant(variant: str, args, bundle, out_root) -> dict:
    args.compile = False  # the variants compile here, each in its own mode
    trainer = package_trainer(args.method, args.model, bundle, args, out_root)
    try:
        if variant != "eager":
            mode = "reduce-overhead" if variant == "compile_cudagraphs" else None
            trainer.parts.attack_model = trainer.parts.train_model = torch.compile(trainer.model, mode=mode, dynamic=False)
            trainer.parts.cuda_graphs = mode == "reduce-overhead" and args.device.type == "cuda"  # as --compile does
        steps = len(bundle.train) // args.batch_size
        started = time.perf_counter()
        for _ in range(args.warmup):  # compilation, cuDNN autotuning, CUDA-graph recording
            trainer.train_epoch(2)
        sync(args.device)
        warmup_s = time.perf_counter() - started
        # The same pass without the profiler: the profiler slows the host, so the busy fraction of
        # an ordinary step is device-busy time over this wall time, not over the profiled one.
        start = time.perf_counter()
        trainer.train_epoch(2)
        sync(args.device)
        unprofiled = time.perf_counter() - start
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            sync(args.device)
            start = time.perf_counter()
            trainer.train_epoch(2)
            sync(args.device)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in LAUNCH_NAMES)
        graphs = sum(e.count for e in events if e.key == "cudaGraphLaunch")
        # Device time of the kernels themselves: the device-side events, not the host-side launch records.
        busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        counts = gradient_work(trainer, args.device, activities, steps)
        result = {"steps": steps, "warmup_seconds": warmup_s, "wall_ms_per_step": wall / steps * 1e3,
                  "wall_ms_per_step_unprofiled": unprofiled / steps * 1e3,
                  "busy_fraction_unprofiled": (busy_us / 1e6) / unprofiled if args.device.type == "cuda" else None,
                  **counts,
                  "kernel_launches_per_step": launches / steps, "graph_launches_per_step": graphs / steps,
                  "host_ops_per_step": sum(e.count for e in events
                                           if e.device_type == torch.autograd.DeviceType.CPU) / steps,
                  "device_busy_ms_per_step": busy_us / 1e3 / steps,
                  "busy_fraction": (busy_us / 1e6) / wall if args.device.type == "cuda" else None,
                  "images_per_s": steps * args.batch_size / wall,
                  "top_device_ops": top_ops(events, "self_device_time_total") if args.device.type == "cuda" else [],
                  "top_host_ops": top_ops(events, "self_cpu_time_total")}
        print(f"{variant:20s} {result['wall_ms_per_step']:7.1f} ms/step profiled ({result['wall_ms_per_step_unprofiled']:.1f} "
              f"unprofiled), {result['conv_weight_grads_per_step']:.0f} weight-gradient convolutions/step"
              + (f" ({result['wgrad_kernels_per_step']:.0f} wgrad kernels)" if "wgrad_kernels_per_step" in result else "")
              + f", {result['kernel_launches_per_step']:6.0f} "
              f"kernel launches/step, {result['graph_launches_per_step']:.0f} graph launches/step, device busy "
              f"{result['device_busy_ms_per_step']:.1f} ms/step"
              + (f" ({result['busy_fraction']:.0%})" if result["busy_fraction"] is not None else ""), flush=True)
        return result
    except Exception as error:  # noqa: BLE001 - a failed variant is a result; the next one still runs
        print(f"{variant}: failed: {type(error).__name__}: {error}", flush=True)
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        trainer.close()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--method", default="pgd-at")
    parser.add_argument("--iters", type=int, default=10, help="training steps profiled")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes before the profiled one")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 instead of bf16 autocast")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cpu":
        args.bf16 = False  # bf16 autocast is 3x slower on CPUs (docs/benchmarks.md); profile the fast path
    torch.manual_seed(0)
    out_root = tempfile.mkdtemp(prefix="profile-step-")
    bundle, source = make_data(args, args.batch_size * args.iters)
    results = {"device": device_name(args.device), "versions": versions(), "data": source,
               "settings": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()
                            if k not in ("output", "compile")},
               "variants": {}}
    for variant in args.variants:
        results["variants"][variant] = profile_variant(variant, args, bundle, out_root)
        if args.output:
            write_text_atomic(json.dumps(results, indent=2) + "\n", args.output)
    return results


if __name__ == "__main__":
    main()
