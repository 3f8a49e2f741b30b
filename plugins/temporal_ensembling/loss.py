"""``TELoss``: temporal ensembling of the model's own predictions as a soft target (Dong et al. 2022).

For every training sample the loss keeps an exponential moving average of the model's clean
softmax predictions. From ``start_epoch`` on, a penalty pulls the model's predictions towards that
ensemble, with a weight that ramps up (Laine & Aila's sigmoid-shaped ramp) until ``end_epoch``::

    E[i]  <- m * E[i] + (1 - m) * softmax(f(x_i))          (each step, no gradient)
    p_i    = E[i] / sum(E[i])
    penalty = w(epoch) * mean over batch and classes of (softmax(logits_i) - p_i) ** 2
    w(e)   = reg_weight * ramp(e);  ramp(e) = 0 if e < start, 1 if e > end,
             exp(-5 * (1 - (e - start) / (end - start)) ** 2) otherwise        (epochs from 1)

Under torch.distributed each ``update`` all-gathers the batch's indices and probabilities, so every
rank applies the same update and holds the same ensemble.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from at_memorization.methods.base import MethodError


class TEStateError(MethodError):
    """A saved TE state does not fit this ``TELoss`` (a ``ValueError``; the CLI prints it as one line)."""


def _positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool ({value})")
    try:
        value = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not 10.5 nor "10"
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index(index, batch_size: int, num_samples: int, check_range: bool = True) -> None:
    """Raise a one-line error unless ``index`` is a 1-D integer tensor of ``batch_size`` values in [0, num_samples).

    ``check_range`` reads the index back to the host (a synchronization on CUDA).
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a 1-D integer tensor (the batch's sample positions), got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] != batch_size:
        raise ValueError(f"index must have shape ({batch_size},) to match the batch, got {tuple(index.shape)}")
    if check_range and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_samples:
            raise IndexError(f"sample index out of range [0, {num_samples}): min {low}, max {high}")


def te_penalty(logits: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """The TE penalty, ``weight * mean((softmax(logits) - target)**2)``: the one statement of its
    formula, used by ``TELoss``, the attacks' inner loss and the methods' training loss."""
    return weight * (F.softmax(logits.float(), dim=1) - target).pow(2).mean()


def ramp(epoch: int, start_epoch: int, end_epoch: int) -> float:
    """0 before ``start_epoch``, 1 after ``end_epoch``, a sigmoid-shaped rise in between."""
    if epoch < start_epoch:
        return 0.0
    if epoch > end_epoch:
        return 1.0
    return math.exp(-5.0 * (1.0 - (epoch - start_epoch) / (end_epoch - start_epoch)) ** 2)


class TELoss(nn.Module):
    """Temporal-ensembling penalty; a drop-in term for any training loop.

    >>> te = TELoss(num_samples=50000, num_classes=10)
    >>> te.update(clean_logits, index, epoch)      # once per step, before the penalty
    >>> loss = ce + te(adv_logits, index, epoch)

    ``validate`` (default True) also checks index ranges and finiteness, which costs a
    host-device synchronization on CUDA; a trainer that guarantees both can switch it off.
    """

    def __init__(self, num_samples: int, num_classes: int, momentum: float = 0.9, reg_weight: float = 300.0,
                 start_epoch: int = 90, end_epoch: int = 150, sync_distributed: bool = True):
        super().__init__()
        num_samples = _positive_int("num_samples", num_samples)
        num_classes = _positive_int("num_classes", num_classes, minimum=2)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        if not 1 <= start_epoch < end_epoch:
            raise ValueError(f"need 1 <= start_epoch < end_epoch, got start {start_epoch}, end {end_epoch}")
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.momentum, self.reg_weight = float(momentum), float(reg_weight)
        self.start_epoch, self.end_epoch = int(start_epoch), int(end_epoch)
        self.sync_distributed = sync_distributed
        self.validate = True
        # Set by a trainer whose ranks always step with equal batch sizes (as DistributedSampler
        # gives): the all-gather then needs no size exchange, so no host-device synchronization.
        self.equal_rank_batches = False
        # fp32 whatever the autocast context: tiny EMA increments would vanish in bf16.
        self.register_buffer("ensemble", torch.zeros(self.num_samples, self.num_classes, dtype=torch.float32))

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, num_classes={self.num_classes}, momentum={self.momentum}, "
                f"reg_weight={self.reg_weight}, start_epoch={self.start_epoch}, end_epoch={self.end_epoch}")

    def _apply(self, fn, recurse=True):
        # Moving to a device is fine; casting the ensemble to a low precision is not.
        super()._apply(fn, recurse)
        if self.ensemble.dtype != torch.float32:
            self.ensemble = self.ensemble.float()
        return self

    def get_extra_state(self) -> dict:
        return {"num_samples": self.num_samples, "num_classes": self.num_classes, "momentum": self.momentum,
                "reg_weight": self.reg_weight, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, Mapping) or not {"num_samples", "num_classes"} <= state.keys():
            raise TEStateError("TE state is malformed: its settings lack num_samples and num_classes")
        if (state["num_samples"], state["num_classes"]) != (self.num_samples, self.num_classes):
            raise TEStateError(f"TE state is for {state['num_samples']} samples x {state['num_classes']} classes, "
                               f"this TELoss has {self.num_samples} x {self.num_classes}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked here rather than in load_state_dict so that a TELoss inside another module gets
        # the same one-line errors (torch's own are multi-line RuntimeErrors).
        key = prefix + "ensemble"
        if key not in state_dict:
            if strict:
                raise TEStateError(f"TE state has no {key!r} (the per-sample ensemble)")
        else:
            ensemble = state_dict[key]
            expected = (self.num_samples, self.num_classes)
            if not isinstance(ensemble, torch.Tensor):
                raise TEStateError(f"TE state: {key} is a {type(ensemble).__name__}, not a tensor")
            if tuple(ensemble.shape) != expected:
                raise TEStateError(f"TE state: the ensemble has shape {list(ensemble.shape)}, this TELoss expects "
                                   f"{list(expected)} ({self.num_samples} samples x {self.num_classes} classes)")
            if not ensemble.is_floating_point():
                raise TEStateError(f"TE state: the ensemble is {ensemble.dtype}, not floating point")
            if not bool(torch.isfinite(ensemble).all()):
                raise TEStateError("TE state: the ensemble contains NaN or inf")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ schedule
    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch

    def weight(self, epoch: int) -> float:
        return self.reg_weight * ramp(epoch, self.start_epoch, self.end_epoch)

    # ------------------------------------------------------------------ checks
    def _check(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a tensor of shape (batch, {self.num_classes}), got {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (batch, {self.num_classes}), got {tuple(logits.shape)}")
        check_index(index, logits.shape[0], self.num_samples, check_range=self.validate)
        if self.validate and logits.numel() and not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or inf")

    # ------------------------------------------------------------------ the two operations
    @torch.no_grad()
    def update(self, clean_logits: torch.Tensor, index: torch.Tensor, epoch: int) -> None:
        """``E[index] = m * E[index] + (1 - m) * softmax(clean_logits)``; nothing before start_epoch."""
        self._check(clean_logits, index)
        if not self.active(epoch):
            return
        probs = F.softmax(clean_logits.detach().float(), dim=1)
        index = index.to(self.ensemble.device, torch.int64)
        probs = probs.to(self.ensemble.device)
        if self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            index, probs = _all_gather_rows(index, probs, equal_sizes=self.equal_rank_batches)
        # Repeated indices (DistributedSampler pads with them; a user's sampler may draw them) all
        # get their first row's values, so the write below is deterministic. Cheap: one scatter.
        index, probs = _first_occurrences(index, probs, self.num_samples)
        self.ensemble[index] = self.momentum * self.ensemble[index] + (1.0 - self.momentum) * probs

    def target(self, index: torch.Tensor) -> torch.Tensor:
        """The ensemble rows normalized to sum 1 (``update`` must have run for them)."""
        rows = self.ensemble[index.to(self.ensemble.device, torch.int64)]
        return rows / rows.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """``weight(epoch) * mean((softmax(logits) - target)**2)``; exactly 0 before start_epoch."""
        self._check(logits, index)
        w = self.weight(epoch)
        if w == 0.0:
            return (logits.float() * 0.0).sum()
        return te_penalty(logits, self.target(index).to(logits.device), w)


def _first_occurrences(index: torch.Tensor, probs: torch.Tensor, num_samples: int):
    """Give every repeated index (DistributedSampler pads with repeats) the row of its first occurrence.

    Shapes stay fixed and nothing is read back to the host (``torch.unique`` would synchronize
    with the GPU on every step).
    """
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((num_samples,), index.numel(), device=index.device, dtype=positions.dtype)
    first.scatter_reduce_(0, index, positions, reduce="amin")
    return index, probs[first[index]]


def _all_gather_rows(index: torch.Tensor, probs: torch.Tensor, equal_sizes: bool = False):
    """Concatenate every rank's (index, probs) in rank order; batches may differ in size.

    ``equal_sizes``: the caller guarantees the same batch size on every rank, which skips the size
    exchange (a host-device synchronization per call).
    """
    world = dist.get_world_size()
    if equal_sizes:
        all_index = [torch.empty_like(index) for _ in range(world)]
        all_probs = [torch.empty_like(probs) for _ in range(world)]
        dist.all_gather(all_index, index.contiguous())
        dist.all_gather(all_probs, probs.contiguous())
        return torch.cat(all_index), torch.cat(all_probs)
    size = torch.tensor([index.numel()], device=index.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    pad = longest - index.numel()
    padded_index = F.pad(index, (0, pad))
    padded_probs = F.pad(probs, (0, 0, 0, pad))
    all_index = [torch.empty_like(padded_index) for _ in range(world)]
    all_probs = [torch.empty_like(padded_probs) for _ in range(world)]
    dist.all_gather(all_index, padded_index)
    dist.all_gather(all_probs, padded_probs)
    return (torch.cat([t[:n] for t, n in zip(all_index, sizes)]),
            torch.cat([t[:n] for t, n in zip(all_probs, sizes)]))
