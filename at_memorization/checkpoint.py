"""Checkpoints: tensors and plain Python values only, written atomically, loaded with weights_only.

Layout (``FORMAT_VERSION`` 1)::

    {"format": "at-memorization", "format_version": 1,
     "model": state_dict (fp32), "model_name": str, "num_classes": int, "in_chans": int,
     "dataset": str, "optimizer": state_dict, "scheduler": {"lr": float},
     "method": {"name": str, "config": {...}, "state": {...}},
     "epoch": int, "config": {...}, "rng": {...}, "best": {...}, "history": [metrics per epoch]}
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path

import torch

FORMAT = "at-memorization"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a usable at-memorization checkpoint; the message says why."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file (created 0600 by mkstemp) normal permissions, then rename it."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _write_atomic(path: str | Path, mode: str, write) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over ``path``.

    A reader (or a resumed run) sees either the old file or the new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    _write_atomic(path, "wb", lambda handle: torch.save(obj, handle))


def write_text_atomic(text: str, path: str | Path) -> None:
    _write_atomic(path, "w", lambda handle: handle.write(text))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load one of our checkpoints safely, or raise CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps both garbage bytes ("Unsupported operand ...") and disallowed classes
        # ("Unsupported global: GLOBAL argparse.Namespace ...") in UnpicklingError: tell them apart.
        match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if match:
            raise CheckpointError(
                f"{path}: refused: loading it would need unpickling arbitrary Python objects "
                f"({match.group(1)}); checkpoints hold tensors and plain values only"
            ) from error
        detail = str(error.__context__ or "").strip() or "not a torch checkpoint"
        raise CheckpointError(f"{path}: unreadable checkpoint ({detail.splitlines()[0][:160]})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: {str(error)[:160]})") from error
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an at-memorization checkpoint (no 'format': {FORMAT!r} entry)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {obj.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("model", "model_name", "num_classes", "dataset"):
        if key not in obj:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return obj


def cpu_state_dict(model) -> dict:
    """The model's state dict on the CPU, floating-point tensors in fp32 (what checkpoints hold)."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}


def build_model_from_checkpoint(checkpoint: dict):
    """The trained model, in eval mode, on the CPU."""
    from .models import build_model

    model = build_model(checkpoint["model_name"], checkpoint["num_classes"], checkpoint.get("in_chans", 3),
                        checkpoint.get("img_size", 32))
    model.load_state_dict(checkpoint["model"])
    return model.eval()
