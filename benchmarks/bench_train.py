#!/usr/bin/env python
"""Training throughput of at-memorization against a paper-style reference loop, in one run.

For each method (pgd-at, pgd-at-te, trades, trades-te) it times

- ``package``: the package's own training step, ``Trainer.train_epoch`` over ``--iters`` batches
  (attack, loss, update, the trainer's bookkeeping; no evaluation), TE active at full weight;
- ``reference``: a loop written here the way the paper's code (dongyp13/memorization-AT, after
  TRADES' code) does it: fp32, ``model.eval()`` and a hand-written PGD with ``torch.autograd.grad``
  for the attack, ``model.train()`` for the update, TRADES' KL as ``KLDivLoss(reduction='sum')/B``
  recomputing the clean softmax in every attack step, the TE soft targets as a plain tensor.

Both see the same model architecture and initial weights, the same batches (in memory, augmented
on the device; the paper's DataLoader cost is not part of the reference) and run alternately,
``--repeats`` times each after ``--warmup`` untimed passes; images/s come from the fastest pass
(the median is reported too). Output: a table on stdout and JSON with
images/s, ratios, TE overhead, peak memory, device and versions, and every raw timing.

``--epoch-estimate`` adds seconds of training steps per CIFAR-10 epoch (50,000 images, extrapolated
from full batches: no partial batch, no evaluation, no checkpoint) of PGD-AT and the model-FLOP
utilisation for PreActResNet-18 and WRN-34-10 at batch 128 and 512 (meant for a GPU).

``--full-epoch`` adds whole epochs as a user experiences them: ``Trainer.fit`` over ``--epochs``
epochs of ``--train-size`` images (the last batch smaller), with the per-epoch evaluation
(``--test-size`` points, ``--eval-train-size`` training points, PGD-``--eval-steps``) and the
checkpoint writes; each epoch split into training, test evaluation, training-set evaluation and
the rest (``--skip-compare`` runs this alone). Peak memory is the most allocated in any timed pass,
the warm-up reported apart; docs/benchmarks.md ("How each figure is defined") gives every definition.

    python benchmarks/bench_train.py --device cpu --dataset mnist --data-dir ../shared/data/mnist \\
        --model smallcnn --batch-size 32 --iters 4 --output benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from at_memorization.data import AUGMENTATIONS, DATASETS, DataBundle, IndexedDataset, load_data, to_float
from at_memorization.machine import cpu_name
from at_memorization.models import build_model
from at_memorization.training import RunConfig, Trainer

METHODS = ("pgd-at", "pgd-at-te", "trades", "trades-te")
CIFAR10_TRAIN = 50_000
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12}
TE = dict(te_start=1, te_end=2, momentum=0.9, weight=300.0)  # epoch 2: TE on at full weight


# --------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchattacks", "timm", "at-memorization"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def peak_bf16(name: str) -> float | None:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data
def make_data(args, n: int, shape=None) -> tuple[DataBundle, str]:
    """``n`` training images: real ones from --dataset/--data-dir, else random uint8 (only with --random-data)."""
    if shape is None and not args.random_data:
        bundle = load_data(args.dataset, args.data_dir, train_size=n, test_size=1)
        train = bundle.train
        if len(train) < n:  # tile a small real set up to n images
            reps = -(-n // len(train))
            train = IndexedDataset(train.images.repeat(reps, 1, 1, 1)[:n], train.labels.repeat(reps)[:n],
                                   train.num_classes)
            bundle = DataBundle(train, bundle.test, bundle.info, train.labels.clone())
        return bundle, f"real:{args.dataset}"
    info = DATASETS["cifar10" if shape is not None else args.dataset]
    c, h = (shape or (info.in_chans or 3, info.img_size))[:2]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, h, h), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    train = IndexedDataset(images, labels, 10)
    return DataBundle(train, IndexedDataset(images[:1], labels[:1], 10), info, labels.clone()), "random-uint8"


# --------------------------------------------------------------------------- the reference loop
def ref_pgd(model, x, y, eps, alpha, steps, soft=None, index=None, weight=0.0):
    """The paper's PGD: uniform start (not clamped), eval mode, autograd.grad, sign step, projection."""
    model.eval()
    x_adv = x.detach() + torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        x_adv.requires_grad_()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        if soft is not None:
            loss = loss + weight * ((F.softmax(logits, dim=1) - soft) ** 2).mean()
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def ref_trades_attack(model, x, eps, alpha, steps, beta=6.0, soft=None, weight=0.0):
    """TRADES' attack as in its code: KLDivLoss(size_average=False), clean softmax recomputed per step."""
    model.eval()
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        logits = model(x_adv)
        loss_kl = criterion_kl(F.log_softmax(logits, dim=1), F.softmax(model(x), dim=1))
        if soft is not None:
            loss_kl = (beta / len(x)) * loss_kl + weight * ((F.softmax(logits, dim=1) - soft) ** 2).mean()
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


class Reference:
    """One paper-style training step per call, on its own copy of the model."""

    def __init__(self, method, model, num_samples, num_classes, args, device):
        self.method, self.model, self.args = method, model, args
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.soft = torch.zeros(num_samples, num_classes, device=device) if method.endswith("-te") else None

    def step(self, x, y, index):
        a, model = self.args, self.model
        beta, m, w = 6.0, TE["momentum"], TE["weight"]
        target = None
        if self.soft is not None:  # paper: eval-mode clean predictions into the per-sample average
            model.eval()
            with torch.no_grad():
                self.soft[index] = m * self.soft[index] + (1 - m) * F.softmax(model(x), dim=1)
            target = self.soft[index] / self.soft[index].sum(1, keepdim=True)
        if self.method.startswith("pgd-at"):
            x_adv = ref_pgd(model, x, y, a.eps, a.step_size, a.steps, target, index, w)
            model.train()
            self.optimizer.zero_grad()
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y)
            if target is not None:
                loss = loss + w * ((F.softmax(logits, dim=1) - target) ** 2).mean()
        else:
            x_adv = ref_trades_attack(model, x, a.eps, a.step_size, a.steps, beta, target, w)
            model.train()
            self.optimizer.zero_grad()
            criterion_kl = torch.nn.KLDivLoss(reduction="sum")
            logits = model(x)
            loss = F.cross_entropy(logits, y) + beta * (1.0 / len(x)) * criterion_kl(
                F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1))
            if target is not None:
                loss = loss + w * ((F.softmax(logits, dim=1) - target) ** 2).mean()
        loss.backward()
        self.optimizer.step()


# --------------------------------------------------------------------------- timing
def package_trainer(method, model_name, bundle, args, out_root) -> Trainer:
    method_args = {"te_start": TE["te_start"], "te_end": TE["te_end"]} if method.endswith("-te") else {}
    dataset = bundle.info.name
    config = RunConfig(method=method, dataset=dataset, model=model_name, epochs=2, batch_size=args.batch_size,
                       lr=0.01, milestones=[100], eps=args.eps, step_size=args.step_size, steps=args.steps,
                       seed=0, bf16=args.bf16, channels_last=args.channels_last, compile=args.compile,
                       method_args=method_args)
    return Trainer(config, Path(tempfile.mkdtemp(dir=out_root)) / method, device=str(args.device), data=bundle)


def time_method(method, model_name, bundle, args, out_root, with_reference=True) -> dict:
    device = args.device
    trainer = package_trainer(method, model_name, bundle, args, out_root)
    n = len(bundle.train)
    batches = [b for b in torch.arange(n).split(args.batch_size)]
    ref = None
    if with_reference:
        model = build_model(model_name, bundle.train.num_classes, *bundle.train.shape[:2]).to(device)
        model.load_state_dict(trainer.model.state_dict())
        ref = Reference(method, model, n, bundle.train.num_classes, args, device)
        augment = AUGMENTATIONS[bundle.info.augmentation]
        generator = torch.Generator().manual_seed(1)
        prepared = []
        for idx in batches:
            images, labels, index = bundle.train.batch(idx)
            prepared.append((augment(to_float(images.to(device)), generator), labels.to(device), index.to(device)))

    def run_package():
        sync(device)
        start = time.perf_counter()
        trainer.train_epoch(2)
        sync(device)
        return time.perf_counter() - start

    def run_reference():
        sync(device)
        start = time.perf_counter()
        for x, y, index in prepared:
            ref.step(x, y, index)
        sync(device)
        return time.perf_counter() - start

    # Peak memory, one definition: the most allocated during any timed pass of a side, each pass
    # measured from a reset just before it. The warm-up (compilation, CUDA-graph recording, cuDNN
    # autotuning) is reported apart, as peak_memory_bytes_warmup: mixing the two gave 0.36 GB and
    # 3.98 GB for the same CUDA-graph path in two calls (docs/benchmarks.md).
    peak, peak_warmup = {}, {}

    def measured(side, run, into):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = run()
        if device.type == "cuda":
            into[side] = max(into.get(side, 0), torch.cuda.max_memory_allocated(device))
        return seconds

    for _ in range(args.warmup):
        measured("package", run_package, peak_warmup)
        if ref:
            measured("reference", run_reference, peak_warmup)
    timings = {"package": [], "reference": []}
    for _ in range(args.repeats):  # alternate, so drifting load on a shared machine hits both alike
        timings["package"].append(measured("package", run_package, peak))
        if ref:
            timings["reference"].append(measured("reference", run_reference, peak))
    result = {"images_per_timing": n, "steps_per_timing": len(batches), "seconds": timings}
    for side, values in timings.items():
        if values:  # the fastest pass: on a shared machine, load only ever slows a pass down
            result[f"{side}_images_per_s"] = n / min(values)
            result[f"{side}_images_per_s_median"] = n / statistics.median(values)
            # spread of the passes: (slowest - fastest) / median, 0 for a single pass
            result[f"{side}_spread"] = (max(values) - min(values)) / statistics.median(values)
    if ref:
        result["speedup_vs_reference"] = result["package_images_per_s"] / result["reference_images_per_s"]
        result["speedup_vs_reference_median"] = (result["package_images_per_s_median"]
                                                 / result["reference_images_per_s_median"])
    if peak:
        result["peak_memory_bytes"] = peak  # the most allocated in any timed pass (see above)
    if peak_warmup:
        result["peak_memory_bytes_warmup"] = peak_warmup
    result["timed"] = ("package and reference passes alternated" if ref else "package alone") + (
        "; images/s from the fastest pass (_median: the median of the same passes); training steps only, "
        "full batches, no evaluation or checkpoint (--full-epoch measures those)")
    trainer.close()  # releases the run folder's lock
    del trainer, ref
    return result


def forward_flops(model_name, shape, num_classes=10) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_name, num_classes, shape[0], shape[1]).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.rand(1, *shape))
    return float(counter.get_total_flops())


def epoch_estimate(args, out_root, peak) -> list[dict]:
    rows = []
    real_cifar = not args.random_data and DATASETS[args.dataset].in_chans == 3
    for model_name in args.estimate_models:
        flops = forward_flops(model_name, (3, 32, 32))
        per_image_step = (2 * args.steps + 3) * flops  # attack: fwd + input-grad bwd per step; update: fwd + bwd
        for batch in args.estimate_batches:
            saved = args.batch_size
            args.batch_size = batch
            n = batch * args.iters
            bundle, source = make_data(args, n) if real_cifar else make_data(args, n, shape=(3, 32))
            timing = time_method("pgd-at", model_name, bundle, args, out_root, with_reference=False)
            args.batch_size = saved
            ips = timing["package_images_per_s"]
            rows.append({"model": model_name, "batch_size": batch, "data": source, "images_per_s": ips,
                         "seconds_per_cifar10_epoch": CIFAR10_TRAIN / ips,
                         "what": "training steps only, extrapolated to 50,000 images: full batches, no partial "
                                 "last batch, no evaluation, no checkpoint (the fastest pass, package alone); "
                                 "--full-epoch measures a whole epoch",
                         "forward_gflop_per_image": flops / 1e9,
                         "forward_equivalents_per_image_step": 2 * args.steps + 3,
                         "achieved_tflop_per_s": ips * per_image_step / 1e12,
                         "mfu_vs_bf16_peak": ips * per_image_step / peak if peak else None,
                         "seconds": timing["seconds"]["package"],
                         "peak_memory_bytes": timing.get("peak_memory_bytes")})
            print(f"epoch estimate {model_name} batch {batch}: {ips:.1f} img/s, "
                  f"{CIFAR10_TRAIN / ips:.1f} s/epoch" + (f", MFU {rows[-1]['mfu_vs_bf16_peak']:.1%}" if peak else ""),
                  flush=True)
    return rows


# --------------------------------------------------------------------------- a whole epoch, as a user runs it
class TimedTrainer(Trainer):
    """The package's Trainer, timing where each epoch of ``fit()`` goes (nothing else changes)."""

    def __init__(self, *args, **kwargs):
        self.epoch_times: list[dict] = []
        self._current: dict = {}
        super().__init__(*args, **kwargs)
        # the evaluation and the checkpoint writes are collaborators' (training.epoch_eval, the run
        # folder): time them where they run
        self.evaluator.evaluate_split = self._timed("eval_{}", self.evaluator.evaluate_split)
        self.folder.save_last = self._timed("write_last_checkpoint", self.folder.save_last)

    def _timed(self, key: str, function):
        def timed(*args):
            start = time.perf_counter()
            function(*args)  # an evaluation ends with .cpu(): synchronized
            name = key.format(*args[:1])
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start
        return timed

    def _sync(self) -> None:
        sync(self.ctx.device)

    def train_epoch(self, epoch):
        self._sync()
        start = time.perf_counter()
        self._current = {"epoch": epoch, "_start": start}
        record = super().train_epoch(epoch)
        self._sync()
        self._current["train"] = time.perf_counter() - start
        return record

    def epoch_finished(self, record) -> None:  # the epoch_end callback: after metrics and checkpoints
        current = self._current
        current["epoch_total"] = time.perf_counter() - current.pop("_start")
        current["eval_test"] = current.get("eval_test", 0.0)
        current["eval_train"] = current.get("eval_train", 0.0)
        current["checkpoint_and_bookkeeping"] = (current["epoch_total"] - current["train"] - current["eval_test"]
                                                 - current["eval_train"])
        current["train_seconds_recorded"] = record["train_seconds"]
        self.epoch_times.append(current)


def full_epochs(method: str, args, out_root) -> dict:
    """``--epochs`` epochs of ``Trainer.fit`` on ``--train-size`` real images (the last batch smaller
    when the size is not a multiple of the batch), with the per-epoch evaluation (``--test-size``
    points, ``--eval-train-size`` training points, PGD-``--eval-steps``) and checkpoints, as
    ``at-mem train`` runs it. Reported per epoch: training, test evaluation, training-set
    evaluation, the last.pt write, the rest (checkpoint state, best.pt, metrics) and the total."""
    from at_memorization.training import Callbacks

    started = time.perf_counter()
    if args.random_data:
        n = args.train_size
        bundle, _ = make_data(args, n + args.test_size)
        images, labels = bundle.train.images, bundle.train.labels
        bundle = DataBundle(IndexedDataset(images[:n], labels[:n], 10),
                            IndexedDataset(images[n:], labels[n:], 10), bundle.info, labels[:n].clone())
        source = "random-uint8"
    else:
        bundle = load_data(args.dataset, args.data_dir, train_size=args.train_size, test_size=args.test_size)
        source = f"real:{args.dataset}"
    method_args = {"te_start": 1, "te_end": 2} if method.endswith("-te") else {}
    config = RunConfig(method=method, dataset=bundle.info.name, model=args.model, epochs=args.epochs,
                       batch_size=args.batch_size, lr=0.01, milestones=[10_000], eps=args.eps,
                       step_size=args.step_size, steps=args.steps, eval_steps=args.eval_steps,
                       eval_train_size=args.eval_train_size, seed=0, bf16=args.bf16,
                       channels_last=args.channels_last, compile=args.compile, method_args=method_args)
    holder = {}
    trainer = TimedTrainer(config, Path(tempfile.mkdtemp(dir=out_root)) / f"full-{method}",
                           device=str(args.device), data=bundle,
                           callbacks=Callbacks(epoch_end=lambda record: holder["trainer"].epoch_finished(record)))
    holder["trainer"] = trainer
    startup = time.perf_counter() - started
    fit_start = time.perf_counter()
    history = trainer.fit()
    fit_seconds = time.perf_counter() - fit_start
    n_train, n_test = len(bundle.train), len(bundle.test)
    epochs = []
    for times, record in zip(trainer.epoch_times, history):
        row = {k: v for k, v in times.items()}
        row["images_per_s_full_epoch"] = n_train / times["epoch_total"]
        row["images_per_s_training_only"] = n_train / times["train"]
        row["test_robust_acc"] = record.get("test_robust_acc")
        epochs.append(row)
    last = epochs[-1]
    result = {"method": method, "data": source, "train_size": n_train, "test_size": n_test,
              "eval_train_size": min(args.eval_train_size, n_train), "eval_steps": args.eval_steps,
              "batch_size": args.batch_size, "full_batches": n_train // args.batch_size,
              "last_batch": n_train % args.batch_size, "epochs": epochs,
              "startup_seconds": startup, "fit_seconds": fit_seconds,
              "last_epoch_seconds": last["epoch_total"],
              "last_epoch_share": {k: last[k] / last["epoch_total"] for k in
                                   ("train", "eval_test", "eval_train", "checkpoint_and_bookkeeping")},
              "seconds_per_cifar10_epoch_full": last["epoch_total"] * CIFAR10_TRAIN / n_train,
              "what": "Trainer.fit as at-mem train runs it: every epoch's training (partial last batch included), "
                      "per-epoch evaluation and checkpoint writes; epoch 1 includes compilation/autotuning; "
                      "seconds_per_cifar10_epoch_full scales the last epoch (training and evaluation alike) to "
                      "50,000 training images"}
    print(f"full epoch {method:10s} last epoch {last['epoch_total']:.2f} s = train {last['train']:.2f} + test eval "
          f"{last['eval_test']:.2f} + train eval {last['eval_train']:.2f} + checkpoint/rest "
          f"{last['checkpoint_and_bookkeeping']:.2f} ({last['images_per_s_full_epoch']:.1f} img/s full epoch, "
          f"{last['images_per_s_training_only']:.1f} training only)", flush=True)
    return result


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The device, model, data and attack options of the benchmarks (also benchmarks/profile_step.py)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="attack steps (PGD-10 by default)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--step-size", type=float, default=2 / 255)
    parser.add_argument("--dataset", default="cifar10", choices=list(DATASETS))
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpg/cifar10-jpg")
    parser.add_argument("--random-data", action="store_true", help="random uint8 images instead of real data (recorded in the JSON)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--iters", type=int, default=20, help="training steps per timing")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over the --iters batches")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (the fastest and the median are reported)")
    parser.add_argument("--bf16", action="store_true", help="package path: bf16 autocast (the reference stays fp32)")
    parser.add_argument("--channels-last", action="store_true", help="package path: channels_last")
    parser.add_argument("--compile", action="store_true", help="package path: torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--epoch-estimate", action="store_true",
                        help="also seconds per CIFAR-10 epoch of PGD-AT and MFU for --estimate-models x --estimate-batches")
    parser.add_argument("--estimate-models", nargs="+", default=["preactresnet18", "wrn34_10"])
    parser.add_argument("--estimate-batches", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--full-epoch", action="store_true",
                        help="also time whole epochs of Trainer.fit per method (training with the partial last "
                             "batch, per-epoch evaluation, checkpoints): the epoch as a user experiences it")
    parser.add_argument("--skip-compare", action="store_true", help="no package-vs-reference timing (with --full-epoch)")
    parser.add_argument("--epochs", type=int, default=3, help="--full-epoch: epochs (the first includes compilation)")
    parser.add_argument("--train-size", type=int, default=10_000,
                        help="--full-epoch: training images (not a multiple of the batch: a partial last batch)")
    parser.add_argument("--test-size", type=int, default=1000, help="--full-epoch: test points evaluated per epoch")
    parser.add_argument("--eval-train-size", type=int, default=0, help="--full-epoch: training points evaluated per epoch")
    parser.add_argument("--eval-steps", type=int, default=10, help="--full-epoch: PGD steps of the per-epoch evaluation")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--output", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.skip_compare and not args.full_epoch:
        parser.error("--skip-compare leaves nothing to measure without --full-epoch")
    out_root = tempfile.mkdtemp(prefix="bench-train-")
    bundle, source = make_data(args, args.batch_size * args.iters) if not args.skip_compare else (None, None)
    name = device_name(args.device)
    load_at_start = os.getloadavg()
    results = {}
    for method in ([] if args.skip_compare else args.methods):
        results[method] = time_method(method, args.model, bundle, args, out_root)
        r = results[method]
        print(f"{method:10s} package {r['package_images_per_s']:9.1f} img/s (median {r['package_images_per_s_median']:.1f}, "
              f"spread {r['package_spread']:.0%})   reference {r['reference_images_per_s']:9.1f} img/s (median "
              f"{r['reference_images_per_s_median']:.1f}, spread {r['reference_spread']:.0%})   "
              f"x{r['speedup_vs_reference']:.2f} (median x{r['speedup_vs_reference_median']:.2f})", flush=True)

    def overhead(te, base, side):
        if te in results and base in results:
            return results[base][f"{side}_images_per_s"] / results[te][f"{side}_images_per_s"] - 1.0
        return None

    te_overhead = {f"{te}_vs_{base}": {side: overhead(te, base, side) for side in ("package", "reference")}
                   for te, base in (("pgd-at-te", "pgd-at"), ("trades-te", "trades"))}
    full = {method: full_epochs(method, args, out_root) for method in args.methods} if args.full_epoch else None
    peak = peak_bf16(name) if args.device.type == "cuda" else None
    report = {
        "benchmark": "bench_train", "date": datetime.date.today().isoformat(),
        "device": str(args.device), "device_name": name,
        "cpu_threads": torch.get_num_threads() if args.device.type == "cpu" else None,
        "cpu_count": os.cpu_count(),
        "versions": versions(), "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "note": args.note,
        # the machine may be shared: the 1-, 5- and 15-minute load averages at the start and the end
        "load_average": {"start": load_at_start, "end": None},
        "settings": {"model": args.model, "batch_size": args.batch_size, "attack_steps": args.steps,
                     "eps": args.eps, "step_size": args.step_size, "iters": args.iters, "warmup": args.warmup,
                     "repeats": args.repeats, "data": source, "bf16": args.bf16,
                     "channels_last": args.channels_last, "compile": args.compile,
                     "te": {"active": True, "weight_at_timed_epoch": TE["weight"],
                            "note": "timed at epoch 2 with te_start=1, te_end=2 (full weight); before te_start "
                                    "the TE methods skip the ensemble update and penalty, costing nothing"}},
        "reference": "paper-style loop in this file: fp32, eval-mode hand-written PGD with autograd.grad, "
                     "train-mode update, TRADES KLDivLoss(reduction='sum')/B with the clean softmax recomputed "
                     "each attack step; same in-memory batches, no DataLoader",
        "methods": results,
        "te_overhead": te_overhead,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_bf16_flops": peak,
    }
    if full is not None:
        report["full_epoch"] = full
    if args.epoch_estimate:
        report["epoch_estimate"] = epoch_estimate(args, out_root, peak)
    report["load_average"]["end"] = os.getloadavg()
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for key, value in (te_overhead.items() if results else ()):
        print(f"TE overhead {key}: package {value['package']:+.1%}, reference {value['reference']:+.1%}"
              if value["package"] is not None else f"TE overhead {key}: not measured")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
