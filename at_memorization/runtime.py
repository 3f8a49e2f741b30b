"""What a process needs before any training: the device, torchrun's process group, seeds, and an
eval-mode context that always restores the model's mode."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
import time

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
    elif resolved.type == "mps" and not torch.backends.mps.is_available():  # Apple GPUs, macOS only
        raise DeviceError(f"device {device} requested but MPS is not available here (use {use_cpu})")
    elif resolved.type not in ("cpu", "mps"):
        raise DeviceError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return resolved


# --------------------------------------------------------------------------- one process fails, all stop
# A process of a multi-process run that fails writes its one-line message into the run's rendezvous
# store (torch.distributed's key-value store); every other process watches it and stops within
# PEER_WATCH_S with that message, instead of waiting in a collective until a timeout or the scheduler
# kills it (a failed peer blocks NCCL collectives; gloo's fail with a traceback).
FAILURE_KEY = "at_mem/failure"
PEER_WATCH_S = 0.5
_run_number = 0  # the DistributedContexts made in this process (each rank makes them in the same order)


def _failure_key() -> str:
    """The key of the current run's failure: a later run in the same process group has its own."""
    return f"{FAILURE_KEY}/{_run_number}"


def _store():
    """The default process group's store, or None (no group, or a torch without it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def report_failure(message: str) -> None:
    """This process fails with ``message`` (one line): tell the others of its run, if any."""
    store = _store()
    if store is None or peer_failure(wait_s=0.0) is not None:  # the first failure is the one to report
        return
    try:
        store.set(_failure_key(), f"process {dist.get_rank()} of this run failed: {message}")
    except (RuntimeError, OSError):  # the store's host is gone: the others see that too
        pass


def _reported_failure(store) -> str | None:
    """The current run's reported failure in ``store``, or None; raises RuntimeError/OSError when the
    store's host is gone."""
    key = _failure_key()
    return store.get(key).decode("utf-8", "replace") if store.check([key]) else None


def peer_failure(wait_s: float = 0.0) -> str | None:
    """The failure another process reported (waiting up to ``wait_s`` for it), or None."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            failure = _reported_failure(store)
        except (RuntimeError, OSError):  # the store's host (rank 0 under srun) ended: not a failure by itself
            return None
        if failure is not None or time.monotonic() >= deadline:
            return failure
        time.sleep(0.05)


class _PeerWatch:
    """A daemon thread that ends this process when another one of its run reported a failure: this
    process may be blocked in a collective that never ends. It stops watching when the store's host
    is gone (a finished rank 0 under srun)."""

    def __init__(self):
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="at-mem-peer-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        watched = _run_number
        while not self.stopped.wait(PEER_WATCH_S) and watched == _run_number:  # a later run has its own watch
            store = _store()
            if store is None:  # the process group was torn down: the run is over
                return
            try:
                failure = _reported_failure(store)
            except (RuntimeError, OSError):  # its host ended (a finished rank 0 under srun): nothing more to hear
                return
            if failure is not None and not self.stopped.is_set():
                own = f"process {dist.get_rank()} of this run"
                if failure.startswith(own):
                    continue
                sys.stderr.write(f"\nError: {failure}; this process ({dist.get_rank()}) stops too\n")
                sys.stderr.flush()
                os._exit(1)  # the main thread may wait in a collective forever: no clean-up is possible

    def stop(self) -> None:
        self.stopped.set()


# --------------------------------------------------------------------------- srun as a launcher
def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[07-09,12],cpu1`` -> ``gpu07`` (the zero padding kept)."""
    first = nodelist.split(",", 1)[0]
    if "[" not in first:
        return first
    prefix, _, rest = nodelist.partition("[")
    ranges, _, suffix = rest.partition("]")
    return prefix + ranges.split(",", 1)[0].split("-", 1)[0] + suffix.split(",", 1)[0]


def slurm_distributed_environment(env=None) -> dict[str, str]:
    """torchrun's variables for a process that ``srun`` started as one task of several (none when torchrun
    started it, or it is not a task of a multi-task step): RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS,
    LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR the first host of the job's nodes, MASTER_PORT from the job id
    (unless given). SLURM_STEP_ID marks an srun task: a batch script also has SLURM_PROCID=0."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    job = int(env.get("SLURM_JOB_ID", "0"))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or "localhost"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(20_000 + job % 20_000)}


class DistributedContext:
    """The launcher's environment (torchrun's, or srun's translated by
    :func:`slurm_distributed_environment`): rank, world size and the device of this process."""

    def __init__(self, device: str | None):
        os.environ.update(slurm_distributed_environment())  # init_process_group's env:// reads them
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
        # The group of the control messages (a stop request, agreed at every step): on the CPU with gloo,
        # so that agreeing never waits for the GPU's queue of work (None: the default group, gloo already).
        self.control_group = None
        if self.enabled and dist.get_backend() != "gloo":
            self.control_group = dist.new_group(backend="gloo")
        global _run_number
        _run_number += 1
        self.peer_watch = _PeerWatch() if self.enabled and _store() is not None else None

    def shutdown(self) -> None:
        """After a finished run: all processes meet, then the process group we created is torn down
        (a process that exits with it alive can abort in the backend's threads, exit status -6)."""
        if self.peer_watch is not None:  # before the last collective: a finished peer may close the store
            self.peer_watch.stop()
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


