"""What a process needs before any training: the device, torchrun's process group, seeds, and an
eval-mode context that always restores the model's mode."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from .user_errors import UserError


class TrainingError(UserError, RuntimeError):
    """A run cannot start or continue; the message says why in one line."""


def seed_everything(seed: int) -> None:
    """Every global stream (torch, Python, NumPy): two runs with one seed then agree in full."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode inside the block, its previous mode restored after (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class DeviceError(TrainingError, ValueError):
    """A device that does not exist here; a ValueError too, as a bad argument of a library call."""


def resolve_device(device: str | None, use_cpu: str = "--device cpu") -> torch.device:
    """A device name as a torch.device (default: cuda when available), or a one-line DeviceError;
    ``use_cpu`` is how the caller's user asks for the CPU (``--device cpu``, ``device='cpu'``). The one
    device parser."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device} requested but CUDA is not available (use {use_cpu})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif resolved.type not in ("cpu", "mps"):
        raise DeviceError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
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
        self.owns_group = self.world_size > 1 and not dist.is_initialized()
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def shutdown(self) -> None:
        """After a finished run: all processes meet, then the process group we created is torn down
        (a process that exits with it alive can abort in the backend's threads, exit status -6)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

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


