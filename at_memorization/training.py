"""The training loop: optimizer, schedule, AMP/channels_last, DDP, checkpoints, resume, metrics.

The trainer asks the method registry for the method and never branches on its name. Per epoch it
writes one line to ``metrics.jsonl``, then ``last.pt`` (and ``best.pt`` when the test robust
accuracy improves; ties broken by clean accuracy). ``resume`` continues from ``last.pt`` exactly:
model, optimizer, method state, every RNG, and the data order (a pure function of seed and epoch),
so an interrupted and resumed run ends bit-identical (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .attacks import training_pgd
from .data import AUGMENTATIONS, DataBundle, epoch_batches, load_data, num_batches, to_float
from .evaluation import correct_flags
from .methods import TrainingSetup, get_method
from .models import UnknownModelError, build_model, model_names
from .randomness import capture_rng, restore_rng

SCHEDULES = ("step", "cosine")


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why in one line."""


@dataclass
class RunConfig:
    """Every setting of a run: plain values only (saved in each checkpoint, checked on resume)."""

    method: str = "pgd-at"
    dataset: str = "cifar10"
    data_dir: str = "./data"
    model: str = "preactresnet18"
    drop_rate: float | None = None  # the model's dropout (timm's drop_rate); None: the model's default
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: list = field(default_factory=lambda: [100, 150])
    lr_gamma: float = 0.1
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "Linf"
    augment: bool = True
    label_noise: float = 0.0
    input_noise: str | None = None
    input_noise_fraction: float = 1.0
    train_size: int | None = None
    test_size: int | None = None
    eval_steps: int = 20  # PGD steps for the per-epoch test robust accuracy
    eval_train_size: int = 0  # >0: also clean/PGD accuracy on the first N training points each epoch
    track_samples: bool = False
    seed: int = 0
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the model for attack and update
    method_args: dict = field(default_factory=dict)

    # settings that may differ on resume (they do not change the computation's result on CPU)
    RESUMABLE_CHANGES = ("data_dir", "compile")

    def validate(self) -> None:
        problems = []
        if self.eps < 0:
            problems.append(f"eps must be >= 0, got {self.eps}")
        if self.step_size < 0:
            problems.append(f"step size must be >= 0, got {self.step_size}")
        if self.steps < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if not 0.0 <= self.label_noise <= 1.0:
            problems.append(f"label noise must be in [0, 1], got {self.label_noise}")
        if not 0.0 <= self.input_noise_fraction <= 1.0:
            problems.append(f"input noise fraction must be in [0, 1], got {self.input_noise_fraction}")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.eval_steps < 0:
            problems.append(f"eval steps must be >= 0, got {self.eval_steps}")
        if self.eval_train_size < 0:
            problems.append(f"eval train size must be >= 0, got {self.eval_train_size}")
        if any(m < 1 for m in self.milestones):
            problems.append(f"milestones must be epochs >= 1, got {self.milestones}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.drop_rate is not None and not 0.0 <= self.drop_rate < 1.0:
            problems.append(f"drop rate must be in [0, 1), got {self.drop_rate}")
        if self.norm not in ("Linf", "L2"):
            problems.append(f"norm must be Linf or L2, got {self.norm!r}")
        if problems:
            raise TrainingError(problems[0])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def learning_rate(config: RunConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (counted from 1).

    step: ``lr * gamma ** (number of milestones < epoch)``: as the paper's code (``MultiStepLR([100,
    150])`` stepped after each epoch), epochs 1-100 train at 0.1, 101-150 at 0.01, 151-200 at 0.001.
    cosine: ``lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2``.
    """
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    return config.lr * config.lr_gamma ** sum(epoch > m for m in config.milestones)


@dataclass
class Callbacks:
    """How the trainer reports progress; the CLI fills these with a progress bar and echo."""

    log: Callable[[str], None] = lambda message: None
    epoch_begin: Callable[[int, int], None] = lambda epoch, batches: None
    step: Callable[[], None] = lambda: None
    epoch_end: Callable[[dict], None] = lambda record: None


def resolve_device(device: str | None) -> torch.device:
    """``--device`` as a torch.device (default: cuda when available), or a one-line TrainingError."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise TrainingError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {device} requested but CUDA is not available (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise TrainingError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif resolved.type not in ("cpu", "mps"):
        raise TrainingError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return resolved


class DistributedContext:
    """torchrun's environment: rank, world size and the device of this process."""

    def __init__(self, device: str | None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            if self.device.index is None:  # torch.cuda.set_device refuses a bare "cuda": name the current one
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


class Trainer:
    """Runs one method on one model and data set, writing everything under ``out_dir``."""

    def __init__(self, config: RunConfig, out_dir: str | Path, *, device: str | None = None,
                 resume: bool = False, callbacks: Callbacks | None = None, data: DataBundle | None = None):
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir)
        self.callbacks = callbacks or Callbacks()
        self.ctx = DistributedContext(device)
        if config.batch_size % self.ctx.world_size:
            raise TrainingError(f"batch size {config.batch_size} is not divisible by {self.ctx.world_size} processes")
        last = self.out_dir / "last.pt"
        if resume and not last.is_file():
            raise TrainingError(f"--resume: {last} not found (nothing to resume)")
        if not resume and last.is_file():
            raise TrainingError(f"{self.out_dir} already holds a run; use --resume to continue it or another --out")

        # Unknown names fail before minutes of data loading.
        if not timm.is_model(config.model):
            raise UnknownModelError(f"unknown model {config.model!r}: ours are {', '.join(model_names())}; "
                                    "any timm model name also works")
        method_cls = get_method(config.method)
        # Every global stream (torch, Python, NumPy), so that two runs with one --seed agree in full
        # (a resumed run then restores all three from the checkpoint).
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        self.data = data or load_data(config.dataset, config.data_dir, train_size=config.train_size,
                                      test_size=config.test_size, label_noise=config.label_noise,
                                      input_noise=config.input_noise,
                                      input_noise_fraction=config.input_noise_fraction, seed=config.seed)
        train = self.data.train
        in_chans, height, _ = train.shape
        # The whole (small, uint8) training set lives on the device: batches are cut there, so a
        # step copies nothing from the host (CIFAR-10: 150 MB).
        self.train_images = train.images.to(self.ctx.device)
        self.train_labels = train.labels.to(self.ctx.device)
        self.model = build_model(config.model, train.num_classes, in_chans, height,
                                 drop_rate=config.drop_rate).to(self.ctx.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.setup = TrainingSetup(num_samples=len(train), num_classes=train.num_classes, epochs=config.epochs,
                                   eps=config.eps, step_size=config.step_size, steps=config.steps, norm=config.norm)
        self.method = method_cls(self.setup, **config.method_args).to(self.ctx.device)
        if self.ctx.enabled:
            # One random stream per rank (attack random starts, dropout): otherwise every shard of
            # a global batch would get the same noise. Rank 0 keeps the single-process stream.
            torch.manual_seed(config.seed + 7_919 * self.ctx.rank)
        self.train_model = self.model
        if self.ctx.enabled:
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None)
        self.attack_model = self.model
        if config.compile:  # one compiled module for attack and update, unless DDP wraps the latter
            self.attack_model = torch.compile(self.model)
            self.train_model = self.attack_model if self.train_model is self.model else torch.compile(self.train_model)
        on_cuda = self.ctx.device.type == "cuda"
        if on_cuda:  # fixed input shapes: let cuDNN time its convolution algorithms once and keep the fastest
            torch.backends.cudnn.benchmark = True
        # fused: one kernel for the whole parameter update on CUDA (the same SGD arithmetic)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay, fused=True if on_cuda else None)
        self.augment = AUGMENTATIONS[self.data.info.augmentation if config.augment else "none"]
        self.start_epoch = 1
        self.history: list[dict] = []
        self.best = {"epoch": 0, "test_robust_acc": -1.0, "test_clean_acc": -1.0}
        self.tracked = None
        if config.track_samples:
            n = len(train)
            self.tracked = {"adv_correct": torch.zeros(config.epochs, n, dtype=torch.uint8),
                            "adv_loss": torch.zeros(config.epochs, n, dtype=torch.float16)}
        if resume:
            self._resume(last)
        else:
            for note in self.method.notes:
                self.callbacks.log(note)

    # ------------------------------------------------------------------ checkpoints
    def _rng_states(self) -> list[dict]:
        """Every rank's generator states (a collective call under torchrun)."""
        if not self.ctx.enabled:
            return [capture_rng()]
        states = [None] * self.ctx.world_size
        dist.all_gather_object(states, capture_rng())
        return states

    def _checkpoint(self, epoch: int, rng_states: list[dict]) -> dict:
        return {
            "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
            "model": ckpt.cpu_state_dict(self.model),
            "model_name": self.config.model, "num_classes": self.data.train.num_classes,
            "in_chans": self.data.train.shape[0], "img_size": self.data.train.shape[1],
            "dataset": self.config.dataset,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": self.config.schedule, "lr": learning_rate(self.config, epoch)},
            "method": {"name": self.config.method, "config": self.method.config(),
                       "state": self.method.state_dict()},
            "epoch": epoch, "config": self.config.to_dict(), "rng": rng_states[0], "rng_per_rank": rng_states,
            "best": dict(self.best), "history": list(self.history),
        }

    def _resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, map_location="cpu")
        saved, current = state.get("config", {}), self.config.to_dict()
        changed = [k for k in current if k not in RunConfig.RESUMABLE_CHANGES and saved.get(k) != current[k]]
        if changed:
            key = changed[0]
            raise TrainingError(f"--resume: configuration differs from the saved run in {key!r} "
                                f"(saved {saved.get(key)!r}, given {current[key]!r})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"]["state"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.start_epoch = state["epoch"] + 1
        if self.tracked is not None and (self.out_dir / "tracking.pt").is_file():
            tracked = torch.load(self.out_dir / "tracking.pt", weights_only=True)
            self.tracked = {k: tracked[k] for k in self.tracked}
        per_rank = state.get("rng_per_rank") or []
        restore_rng(per_rank[self.ctx.rank] if len(per_rank) == self.ctx.world_size else state["rng"])
        if self.ctx.is_main:  # metrics.jsonl may hold an epoch written after the last checkpoint
            self._rewrite_metrics()
            for stale in self.out_dir.glob(".*.tmp"):  # temporary files of a write that was killed
                stale.unlink(missing_ok=True)
        self.callbacks.log(f"resumed from {path} at epoch {self.start_epoch}")

    def _rewrite_metrics(self) -> None:
        ckpt.write_text_atomic("".join(json.dumps(r) + "\n" for r in self.history), self.out_dir / "metrics.jsonl")

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        if self.config.bf16:
            return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, index, generator):
        """Cut a batch out of the device-resident training set and augment it there."""
        x = self.augment(to_float(self.train_images[index]), generator)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.train_labels[index], index

    def train_epoch(self, epoch: int) -> dict:
        config, ctx, method = self.config, self.ctx, self.method
        lr = learning_rate(config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        record = {"epoch": epoch, "lr": lr}
        record.update(method.on_epoch_start(epoch))
        train = self.data.train
        per_rank = config.batch_size // ctx.world_size
        batches = list(epoch_batches(len(train), per_rank, seed=config.seed, epoch=epoch, rank=ctx.rank,
                                     world_size=ctx.world_size))
        # Augmentation draws from its own generator, a pure function of (seed, epoch, rank).
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 7_919 + ctx.rank)
        sums: dict[str, torch.Tensor] = {}

        def add(name, value, weight):
            value = value.detach().float() * weight
            sums[name] = sums[name] + value if name in sums else value

        self.callbacks.epoch_begin(epoch, len(batches))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        start = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.tracked is not None:
            self._epoch_track = {k: self.tracked[k][epoch - 1].to(ctx.device) for k in self.tracked}
        # One copy of the epoch's order to the device; batches are views of it.
        device_batches = torch.cat(batches).to(ctx.device).split(per_rank) if batches else []
        for index in device_batches:
            x, y, index = self._prepare(index, generator)
            with self._autocast():
                x_adv = method.attack(self.attack_model, x, y, index, epoch)
            self.train_model.train()
            with self._autocast():
                loss, logs = method.loss(self.train_model, x, x_adv, y, index, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
                [p.grad for p in params if p.grad is not None])))
            self.optimizer.step()
            n = torch.full((), float(len(y)), device=ctx.device)  # a fill, not a host-to-device copy
            add("train_loss", loss, n)
            add("grad_norm", grad_norm, 1.0)
            add("_samples", n, 1.0)
            add("_steps", torch.ones((), device=ctx.device), 1.0)
            for name, value in logs.items():
                add(name, value, n)
            if self.tracked is not None:
                self._track(epoch, x_adv, y, index)
            self.callbacks.step()
        if self.tracked is not None:
            for key, values in self._epoch_track.items():
                self.tracked[key][epoch - 1] = values.cpu()
        if ctx.enabled:
            # BatchNorm running statistics drift apart per rank (each sees its own shard); keep rank
            # 0's, which the checkpoint holds, so evaluation agrees and a resumed run is exact.
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        record["train_seconds"] = time.perf_counter() - start
        names = sorted(sums)
        totals = ctx.all_reduce_sum(torch.stack([sums[k] for k in names])).cpu().tolist()
        totals = dict(zip(names, totals))
        samples, steps = totals.pop("_samples"), totals.pop("_steps")
        for name, total in totals.items():
            record[name] = total / (steps if name == "grad_norm" else samples)
        if not all(math.isfinite(v) for v in (record["train_loss"], record["grad_norm"])):
            kept = (f"the last good checkpoint is {self.out_dir / 'last.pt'} (epoch {epoch - 1})" if epoch > 1 else
                    f"no checkpoint was written yet ({self.out_dir / 'init.pt'} holds the initial weights)")
            raise TrainingError(
                f"training diverged at epoch {epoch} (loss {record['train_loss']}, grad norm {record['grad_norm']}); "
                f"{kept}; try a lower --lr")
        return record

    def _track(self, epoch, x_adv, y, index) -> None:
        """Per-sample adversarial correctness and loss (eval mode) on this step's examples."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            logits = self.model(x_adv).float()
        self.model.train(was_training)
        correct = (logits.argmax(1) == y).to(torch.uint8)
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").to(torch.float16)
        if self.ctx.enabled:
            gathered = [[torch.empty_like(t) for _ in range(self.ctx.world_size)] for t in (index, correct, losses)]
            for out, t in zip(gathered, (index, correct, losses)):
                dist.all_gather(out, t)
            index, correct, losses = (torch.cat(g) for g in gathered)
        # Written on the device; copied to the host once per epoch (no sync per step).
        self._epoch_track["adv_correct"][index] = correct
        self._epoch_track["adv_loss"][index] = losses

    def _shard(self, n: int) -> torch.Tensor:
        return torch.arange(self.ctx.rank, n, self.ctx.world_size)

    def evaluate_epoch(self, record: dict) -> None:
        """Test clean and PGD accuracy (and, optionally, on training points), split over ranks."""
        config = self.config
        attack = training_pgd(self.model, config.eps, config.step_size, config.eval_steps, config.norm)
        splits = [("test", self.data.test, len(self.data.test))]
        if config.eval_train_size:
            splits.append(("train", self.data.train, min(config.eval_train_size, len(self.data.train))))
        for prefix, dataset, n in splits:
            images, labels, _ = dataset.batch(self._shard(n))
            counts = []
            for attack_or_none in (None, attack):
                flags = correct_flags(self.model, images, labels, batch_size=256, device=self.ctx.device,
                                      attack=attack_or_none, seed=config.seed)
                counts.append(flags.sum())
            counts = self.ctx.all_reduce_sum(torch.stack(counts).float().to(self.ctx.device)).cpu().tolist()
            record[f"{prefix}_clean_acc"] = counts[0] / n
            record[f"{prefix}_robust_acc"] = counts[1] / n

    def fit(self) -> list[dict]:
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.start_epoch == 1:
                self._write_run_files()
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            record = self.train_epoch(epoch)
            self.evaluate_epoch(record)
            self.history.append(record)
            improved = (record["test_robust_acc"], record["test_clean_acc"]) > (
                self.best["test_robust_acc"], self.best["test_clean_acc"])
            if improved:
                self.best = {"epoch": epoch, "test_robust_acc": record["test_robust_acc"],
                             "test_clean_acc": record["test_clean_acc"]}
            rng_states = self._rng_states()
            if self.ctx.is_main:
                state = self._checkpoint(epoch, rng_states)
                if self.tracked is not None:
                    ckpt.save_atomic(self.tracked, self.out_dir / "tracking.pt")
                if improved:
                    ckpt.save_atomic(state, self.out_dir / "best.pt")
                ckpt.save_atomic(state, self.out_dir / "last.pt")
                with open(self.out_dir / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            self.ctx.barrier()
            self.callbacks.epoch_end(record)
        return self.history

    def _write_run_files(self) -> None:
        """Files written once at the start: settings, initial weights, the (possibly noisy) labels."""
        ckpt.write_text_atomic(json.dumps({"config": self.config.to_dict(), "method": self.method.config(),
                                           "world_size": self.ctx.world_size,
                                           "device": str(self.ctx.device)}, indent=2) + "\n",
                               self.out_dir / "config.json")
        ckpt.save_atomic(ckpt.cpu_state_dict(self.model), self.out_dir / "init.pt")
        ckpt.save_atomic({"labels": self.data.train.labels, "clean_labels": self.data.clean_train_labels},
                         self.out_dir / "labels.pt")
        (self.out_dir / "metrics.jsonl").write_text("")
