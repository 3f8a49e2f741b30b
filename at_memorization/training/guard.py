"""Decisions that guard the loop: whether to stop (agreed by every process), whether the weights
are finite, and what to advise when training diverged. Each returns a decision or an error; none
calls back into the loop."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..atomic import WriteError
from ..runfolder import RunFolder
from ..runtime import DistributedContext, TrainingError
from ..settings import RunConfig

# A stop request is agreed between torchrun processes every this many steps: every step, so that a
# scheduler's grace period of a few seconds suffices. The agreement is a one-number all-reduce on the
# CPU (gloo), which never waits for the GPU; its cost is measured by benchmarks/stop_agreement.py.
STOP_CHECK_EVERY = 1
# A checkpoint whose weights' norm is this many times the initial weights' has diverged already, finite
# or not (e.g. 3.7e18): a resume from it diverges again at any lower learning rate.
BLOWN_UP_RATIO = 100.0


class TrainingInterrupted(Exception):
    """A requested stop (SIGTERM, SIGINT): the run's state up to ``step`` of ``epoch`` is in last.pt."""

    def __init__(self, reason: str, epoch: int, step: int, steps: int, saved: bool):
        self.reason, self.epoch, self.step, self.steps, self.saved = reason, epoch, step, steps, saved
        where = f"epoch {epoch}, after step {step} of {steps}" if step else f"the start of epoch {epoch}"
        super().__init__(f"stopped by {reason} at {where}")


def stop_agreed(ctx: DistributedContext, requested: bool, done: int) -> bool:
    """Whether to stop after step ``done``; under torchrun all processes decide together."""
    if not ctx.enabled:
        return requested
    if done % STOP_CHECK_EVERY:
        return False
    flag = torch.tensor([1.0 if requested else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return bool(flag.item() > 0)


def all_agree(ctx: DistributedContext, ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective call under torchrun)."""
    if not ctx.enabled:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def all_finite(model: torch.nn.Module, ctx: DistributedContext, loss_sum: torch.Tensor | None = None) -> bool:
    """Whether the weights, and ``loss_sum`` if given, are finite on every process."""
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    values = torch.stack([torch.linalg.vector_norm(torch.stack(norms))]
                         + ([loss_sum.reshape(()).float()] if loss_sum is not None else []))
    finite = torch.isfinite(values).all().float().reshape(1)
    if ctx.enabled:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _as_text(value) -> str:
    """A setting's value as ``--override`` reads it back (lists as 2,3)."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def diverged(where: str, folder: RunFolder, config: RunConfig, overrides: dict) -> TrainingError:
    """The divergence error: it names a checkpoint that was checked to be finite (the run folder
    never writes others) and a command that continues from it, or says that none exists."""
    lower = f"{config.lr / 10:g}"
    good = folder.last_good
    if good is None:
        return TrainingError(f"training diverged {where}; no checkpoint was written yet ({folder.init} holds the "
                             f"initial weights); start again with a lower learning rate: the same command with "
                             f"--lr {lower}")
    growth = _growth_since_init(good[0], folder)
    if growth is not None and growth > BLOWN_UP_RATIO:
        return TrainingError(
            f"training diverged {where}; the last finite checkpoint {good[0]} ({good[1]}) holds weights of "
            f"{growth:.2g} times the initial norm: it diverged already, so a resume from it would diverge again; "
            f"start a new run with a lower learning rate: its settings with --lr {lower}, in another --out")
    # this session's other overrides too: the good checkpoint may predate them
    again = "".join(f" --override {key}={_as_text(value)}" for key, value in overrides.items() if key != "lr")
    return TrainingError(
        f"training diverged {where}; the last good checkpoint is {good[0]} ({good[1]}), checked to be finite; "
        f"continue from it with a lower learning rate: at-mem train --resume --out {folder.path}{again} "
        f"--override lr={lower}")


def _norm(weights: dict) -> float:
    floats = [t.double() for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in floats]))) if floats else 0.0


def _growth_since_init(path, folder: RunFolder) -> float | None:
    """How many times the initial weights' norm the checkpoint's weights have (None: unknown)."""
    try:
        initial = _norm(ckpt.load_initial_weights(folder.init))
        grown = _norm(ckpt.load_checkpoint(path)["model"])
    except (ckpt.CheckpointError, KeyError):
        return None
    return grown / initial if initial > 0 else None


def write_failed(error: OSError, folder: RunFolder) -> TrainingError:
    """A failed write in one line: why, and how to go on without losing anything."""
    reason = (str(error) if isinstance(error, WriteError) else
              f"cannot write {error.filename or 'a run file'}: {error.strerror or error} [Errno {error.errno}]")
    good = folder.last_good
    kept = (f"nothing is lost: {good[0]} holds the last complete checkpoint ({good[1]}); once fixed, run "
            f"the same command with --resume" if good is not None else
            "no checkpoint was written yet; once fixed, run the same command again")
    return TrainingError(f"{reason} (free space, raise the file size limit or fix the folder's permissions); {kept}")
