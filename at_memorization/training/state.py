"""A run's state as a checkpoint, and back: :func:`dump` and :func:`restore` are a mirror pair
(tests/test_training_state.py round-trips them), as Lightning's ``dump_checkpoint``/``restore``.

What is saved: the model, the optimizer, the method's state, every rank's random streams, the
progress (finished epoch, history, best epoch) and, for a mid-epoch checkpoint, the epoch loop's
state (``partial``: step, augmentation stream, running sums, per-sample records). The layout is the
checkpoint module's (``checkpoint.make_checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from .. import checkpoint as ckpt
from ..methods import MethodError
from ..randomness import capture_rng, restore_rng
from ..runtime import DistributedContext
from ..settings import RunConfig
from .build import Parts
from .schedule import learning_rate

NO_BEST = {"epoch": 0, "test_robust_acc": -1.0, "test_clean_acc": -1.0}


@dataclass
class Progress:
    """How far a run is: ``epoch`` finished epochs, their records, the best one so far, and the loop
    state of an unfinished epoch (``partial``, from a mid-epoch checkpoint) or None."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: dict(NO_BEST))
    partial: dict | None = None

    @property
    def next_epoch(self) -> int:
        return self.partial["epoch"] if self.partial else self.epoch + 1


@dataclass(frozen=True)
class RunInfo:
    """What a checkpoint records about the run beside the state: settings and data shape."""

    config: RunConfig
    num_classes: int
    shape: tuple[int, int, int]  # (channels, height, width) of the training images
    method_settings: dict
    data_fingerprint: str | None


def per_rank(ctx: DistributedContext, value) -> list:
    """``value`` of every rank, rank 0's first (a collective call under torchrun; plain values and CPU
    tensors)."""
    if not ctx.enabled:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def rng_states(ctx: DistributedContext) -> list[dict]:
    """Every rank's generator states, rank 0's first (a collective call under torchrun)."""
    return per_rank(ctx, capture_rng())


def epoch_loop_state(ctx: DistributedContext, model, epoch: int, done: int, augment_rng, sums: dict,
                     seconds: float, track) -> dict:
    """A mid-epoch checkpoint's ``partial``: the loop's state after ``done`` steps of ``epoch``. Each rank
    draws its own augmentation, sums its own shard's losses and, until the epoch's end makes them
    rank 0's, updates its own BatchNorm statistics (which its attack uses in eval mode), so every
    rank's are kept (``per_rank``; a collective call); rank 0's stream and sums also at the top level,
    as one process saves them."""
    own = {"augment_rng": augment_rng, "sums": {k: v.detach().cpu() for k, v in sums.items()}}
    if ctx.enabled:
        own["buffers"] = {name: buffer.detach().cpu() for name, buffer in model.named_buffers()}
    ranks = per_rank(ctx, own)
    return {"epoch": epoch, "step": done, "train_seconds": seconds, "augment_rng": ranks[0]["augment_rng"],
            "sums": ranks[0]["sums"], "per_rank": ranks, "track": track}


def own_loop_state(partial: dict, ctx: DistributedContext, model) -> dict:
    """This rank's augmentation stream and sums in ``partial``, its BatchNorm statistics put back into
    ``model``: its own where every rank's was saved under the same number of processes, else the top
    level's (a checkpoint of one process, or of an older version)."""
    ranks = partial.get("per_rank")
    own = ranks[ctx.rank] if isinstance(ranks, list) and len(ranks) == ctx.world_size else partial
    for name, buffer in model.named_buffers() if "buffers" in own else ():
        buffer.copy_(own["buffers"][name])
    return own


def dump(parts: Parts, progress: Progress, info: RunInfo, rng: list[dict]) -> dict:
    """The checkpoint of ``parts`` after ``progress``: at the end of epoch ``progress.epoch``, or
    within the next epoch when ``progress.partial`` is set. Its config holds the method's settings
    resolved (as a resumed run's does), so a resumed run's checkpoints equal an uninterrupted one's."""
    config = info.config
    state = ckpt.make_checkpoint(
        model=parts.model, model_name=config.model, num_classes=info.num_classes, in_chans=info.shape[0],
        img_size=info.shape[1], dataset=config.dataset, optimizer_state=parts.optimizer.state_dict(),
        schedule=config.schedule, lr=learning_rate(config, progress.epoch), method_name=config.method,
        method_settings=info.method_settings, method_state=parts.method.state_dict(), epoch=progress.epoch,
        config={**config.to_dict(), "method_args": dict(info.method_settings)}, rng_states=rng, best=progress.best, history=progress.history,
        data_fingerprint=info.data_fingerprint)
    if progress.partial is not None:
        state["partial"] = dict(progress.partial)
    return state


def restore(parts: Parts, state: dict, config: RunConfig, ctx: DistributedContext,
            path: str | Path = "checkpoint") -> Progress:
    """Put ``state`` back into ``parts`` and this process's random streams (the mirror of
    :func:`dump`); returns the progress. ``config``: the settings the run continues with (an
    --override of momentum or weight decay must reach the optimizer)."""
    ckpt.load_weights_into(parts.model, state["model"], path, model_name=config.model)
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
        # load_state_dict restores the saved hyperparameters too: an --override of momentum or
        # weight decay must reach the optimizer (the lr is set at every epoch)
        for group in parts.optimizer.param_groups:
            group["momentum"], group["weight_decay"] = config.momentum, config.weight_decay
        parts.method.load_state_dict(state["method"]["state"])
    except (MethodError, ckpt.CheckpointError):  # already one line, naming the problem
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first = str(error).splitlines()[0][:160] if str(error) else ""
        raise ckpt.CheckpointError(f"{path}: the optimizer or method state does not fit this run "
                                   f"({type(error).__name__}: {first})") from error
    per_rank = state.get("rng_per_rank") or []
    restore_rng(per_rank[ctx.rank] if len(per_rank) == ctx.world_size else state["rng"])
    return Progress(epoch=state["epoch"], history=list(state["history"]), best=dict(state["best"]),
                    partial=state.get("partial"))
