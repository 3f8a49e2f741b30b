"""The parts a run trains with, made in named steps from explicit inputs (as timm's
``build_model_with_cfg``): the model, its DDP and compiled views, the optimizer, the method and the
augmentation."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..data import AUGMENTATIONS, DataBundle, load_data
from ..methods import Method, get_method
from ..models import build_model
from ..runtime import DistributedContext
from ..settings import RunConfig
from .start import method_setup


@dataclass
class Parts:
    """What a training step uses. ``model`` is the bare module (checkpoints, evaluation);
    ``train_model`` the one the update runs through (DDP and/or compiled); ``attack_model`` the one
    the attack runs through (never the DDP wrapper)."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    attack_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: Method
    augment: Callable
    cuda_graphs: bool  # compiled with CUDA graphs: each step must be marked as a new iteration


def load_run_data(config: RunConfig, log: Callable[[str], None]) -> DataBundle:
    """The run's data (subset, noise), saying when a requested size exceeds what the data has."""
    data = load_data(config.dataset, config.data_dir, train_size=config.train_size, test_size=config.test_size,
                     label_noise=config.label_noise, input_noise=config.input_noise,
                     input_noise_fraction=config.input_noise_fraction, seed=config.seed)
    for flag, asked, got in (("--train-size", config.train_size, len(data.train)),
                             ("--test-size", config.test_size, len(data.test))):
        if asked is not None and asked > got:
            log(f"{flag} {asked}: the data has {got} points; all {got} are used")
    return data


def _model(config: RunConfig, data: DataBundle, ctx: DistributedContext) -> torch.nn.Module:
    train = data.train
    in_chans, height, _ = train.shape
    model = build_model(config.model, train.num_classes, in_chans, height, drop_rate=config.drop_rate).to(ctx.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _wrapped(config: RunConfig, model: torch.nn.Module, ctx: DistributedContext):
    """(train_model, attack_model, cuda_graphs).

    On CUDA, compile with CUDA graphs: a PGD-10 step of PreActResNet-18 issues ~2,250 kernel launches
    and the GPU idled 77% of the step waiting for them (profiled on an H200); replaying graphs
    measured 2.3-2.9x the eager throughput in the benchmark (docs/benchmarks.md; not yet in a run
    with a smaller last batch: see dynamic=False below). DDP's hooks cannot be captured, so a
    DDP-wrapped update is compiled without graphs. dynamic=False: the last, smaller batch of an epoch
    gets its own static graph instead of turning every batch's graph into a dynamic-shape one (what
    dynamo does by default on a second shape)."""
    train_model = model
    if ctx.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    on_cuda = ctx.device.type == "cuda"
    if not config.compile:
        return train_model, model, False
    # one compiled module for attack and update, unless DDP wraps the latter
    attack_model = torch.compile(model, mode="reduce-overhead" if on_cuda else None, dynamic=False)
    train_model = attack_model if train_model is model else torch.compile(train_model, dynamic=False)
    return train_model, attack_model, on_cuda


def autocast(config: RunConfig, ctx: DistributedContext):
    """The context of attack and update: bfloat16 autocast with ``--bf16`` (fp32 weights), else none."""
    if config.bf16:
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(config: RunConfig, data: DataBundle, ctx: DistributedContext) -> Parts:
    """The parts of a run, on ``ctx.device``. Consumes the global random stream in a fixed order
    (the model's initialization first), so two runs with one seed build the same parts. Sets the
    process's thread count to the run's (``decide`` recorded or restored it)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    model = _model(config, data, ctx)
    method = get_method(config.method)(method_setup(config, len(data.train), data.train.num_classes),
                                       **config.method_args).to(ctx.device)
    if ctx.enabled:
        # One random stream per rank (attack random starts, dropout): otherwise every shard of a
        # global batch would get the same noise. Rank 0 keeps the single-process stream.
        torch.manual_seed(config.seed + 7_919 * ctx.rank)
    train_model, attack_model, cuda_graphs = _wrapped(config, model, ctx)
    # The model's mode during the training attack (--attack-bn), set once through the method.
    method.set_attack_mode(attack_model, config.attack_bn)
    on_cuda = ctx.device.type == "cuda"
    if on_cuda:  # fixed input shapes: let cuDNN time its convolution algorithms once and keep the fastest
        torch.backends.cudnn.benchmark = True
    # fused: one kernel for the whole parameter update on CUDA (the same SGD arithmetic)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, fused=True if on_cuda else None)
    augment = AUGMENTATIONS[data.info.augmentation if config.augment else "none"]
    return Parts(model, train_model, attack_model, optimizer, method, augment, cuda_graphs)
