"""Checkpoints: tensors and plain Python values only, written atomically, loaded with weights_only.

Layout (``FORMAT_VERSION`` 1)::

    {"format": "at-memorization", "format_version": 1,
     "model": state_dict (fp32), "model_name": str, "num_classes": int, "in_chans": int, "img_size": int,
     "dataset": str, "optimizer": state_dict, "scheduler": {"kind": str, "lr": float},
     "method": {"name": str, "config": {the method's resolved settings}, "state": {...}},
     "epoch": int, "config": {the RunConfig}, "rng": {...}, "rng_per_rank": [{...}, ...],
     "best": {...}, "history": [metrics per epoch], "data_fingerprint": str,
     "partial": {...}  (only in a mid-epoch last.pt: the epoch loop's state)}

``make_checkpoint`` assembles it, ``save_atomic`` writes it, ``load_checkpoint`` reads and checks it,
and ``run_setting`` reads a run setting with the defaults stated once (``at_memorization.settings``).
Which file of a run folder holds which checkpoint, and when one may replace another, is the run
folder's business (``at_memorization.runfolder``).
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path

import torch

from .atomic import write_atomic
from .settings import RunConfig
from .user_errors import UserError

FORMAT = "at-memorization"
FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    """The file is not a usable at-memorization checkpoint; the message says why."""


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (``atomic.write_atomic``).

    Serialized in memory first, then written with plain file writes: a failing write then reports
    the operating system's reason ("File too large", "No space left on device") instead of
    PyTorch's stream error.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, "wb", lambda handle: handle.write(buffer.getbuffer()))


def _torch_load(path: Path, map_location, what: str):
    """``torch.load(weights_only=True)``, every failure a one-line CheckpointError."""
    try:
        with warnings.catch_warnings():  # a raw pickle (not torch.save's): the error below is the one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps both garbage bytes ("Unsupported operand ...") and disallowed classes in
        # UnpicklingError: tell them apart. Disallowed classes read "Unsupported global: GLOBAL
        # argparse.Namespace" (torch 2.4-2.5) or "Trying to load unsupported GLOBAL posix.system" (later).
        match = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(error))
        if match:
            raise CheckpointError(
                f"{path}: refused: loading it would need unpickling arbitrary Python objects "
                f"({match.group(1)}); {what}s hold tensors and plain values only"
            ) from error
        detail = str(error.__context__ or "").strip() or "not a torch file"
        raise CheckpointError(f"{path}: unreadable {what} ({detail.splitlines()[0][:160]})") from error
    except Exception as error:  # noqa: BLE001  (garbage bytes fail anywhere in the unpickler: IndexError, ...)
        detail = " ".join(str(error).split())[:160]  # one line
        raise CheckpointError(f"{path}: unreadable {what} ({type(error).__name__}: {detail})") from error


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check_types(obj: dict, path: Path) -> None:
    """One-line errors for entries of the wrong type (a hand-edited or foreign-made checkpoint)."""
    for key in ("num_classes", "in_chans", "img_size"):
        if key in obj and not (_is_int(obj[key]) and obj[key] >= 1):
            raise CheckpointError(f"{path}: {key!r} must be a positive int, got {_describe(obj[key])}")
    for key in ("model_name", "dataset"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise CheckpointError(f"{path}: {key!r} must be a non-empty str, got {_describe(obj[key])}")
    if "epoch" in obj and not (_is_int(obj["epoch"]) and obj["epoch"] >= 0):
        raise CheckpointError(f"{path}: 'epoch' must be a non-negative int, got {_describe(obj['epoch'])}")
    for key in ("config", "method", "best", "scheduler"):
        if key in obj and not isinstance(obj[key], dict):
            raise CheckpointError(f"{path}: {key!r} must be a dict, got {type(obj[key]).__name__}")
    if "method" in obj:
        if not isinstance(obj["method"].get("name", ""), str):
            raise CheckpointError(f"{path}: 'method' name must be a str, got {_describe(obj['method']['name'])}")
        if not isinstance(obj["method"].get("state", {}), dict):
            raise CheckpointError(f"{path}: 'method' state must be a dict, got "
                                  f"{type(obj['method']['state']).__name__}")
    if "history" in obj and not isinstance(obj["history"], list):
        raise CheckpointError(f"{path}: 'history' must be a list, got {type(obj['history']).__name__}")
    model = obj["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: 'model' must be a dict of tensors (a state dict), got {type(model).__name__}")
    for key, value in model.items():
        if not isinstance(key, str) or not (isinstance(value, torch.Tensor) or key.endswith("_extra_state")):
            raise CheckpointError(f"{path}: 'model' must be a dict of tensors (a state dict), but its entry "
                                  f"{key!r} is a {type(value).__name__}")


def make_checkpoint(*, model: torch.nn.Module, model_name: str, num_classes: int, in_chans: int, img_size: int,
                    dataset: str, optimizer_state: dict, schedule: str, lr: float, method_name: str,
                    method_settings: dict, method_state: dict, epoch: int, config: dict, rng_states: list[dict],
                    best: dict, history: list[dict], data_fingerprint: str | None) -> dict:
    """A training checkpoint in the layout above (the one place it is assembled; ``load_checkpoint``
    is the one place it is read). ``rng_states``: every process's generator states, rank 0's first."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": cpu_state_dict(model), "model_name": model_name, "num_classes": num_classes,
        "in_chans": in_chans, "img_size": img_size, "dataset": dataset,
        "optimizer": optimizer_state, "scheduler": {"kind": schedule, "lr": lr},
        "method": {"name": method_name, "config": dict(method_settings), "state": method_state},
        "epoch": epoch, "config": config, "rng": rng_states[0], "rng_per_rank": rng_states,
        "best": dict(best), "history": list(history), "data_fingerprint": data_fingerprint,
    }


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load one of our checkpoints safely, or raise CheckpointError with a one-line reason.

    Checks the format, the required entries and the types of the entries the library reads
    (``num_classes`` a positive int, ``model`` a dict of tensors, ...); whether the weights fit
    the model is checked when it is built (``build_model_from_checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    obj = _torch_load(path, map_location, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an at-memorization checkpoint (no 'format': {FORMAT!r} entry)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {obj.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    for key in ("model", "model_name", "num_classes", "dataset"):
        if key not in obj:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    _check_types(obj, path)
    return obj


def run_setting(state: dict, key: str):
    """A setting of the run that wrote ``state`` (its ``config``); for a checkpoint written before
    the setting existed, RunConfig's resolved default. The one place such defaults are read."""
    config = state.get("config") or {}
    if key in config:
        return config[key]
    return getattr(RunConfig().resolve(), key)


def cpu_state_dict(model) -> dict:
    """The model's state dict on the CPU, floating-point tensors in fp32 (what checkpoints hold)."""
    return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))


def _weights(state) -> dict:
    """The state dict of a checkpoint (its "model" entry), or ``state`` itself if it is one."""
    return state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state


def check_finite_weights(state: dict, path: str | Path = "checkpoint") -> None:
    """Raise CheckpointError naming the first floating-point tensor with a NaN or inf value.

    ``state``: a checkpoint (its "model" state dict is checked) or a state dict.
    """
    for key, value in _weights(state).items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int(finite.numel() - finite.sum())
                raise CheckpointError(f"{path}: model weights are not finite: {key} has {bad} NaN or inf "
                                      f"value{'s' if bad != 1 else ''} (of {value.numel()})")


def _weight_problems(model, state_dict) -> list[str]:
    """Why ``state_dict`` does not fit ``model`` (missing, unexpected and misshapen entries)."""
    expected = model.state_dict()
    problems = []
    for key, target in expected.items():
        if key not in state_dict:
            problems.append(f"missing key {key!r}")
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            if isinstance(target, torch.Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif isinstance(target, torch.Tensor) and value.shape != target.shape:
            problems.append(f"{key} has shape {_shape(value)}, the model expects {_shape(target)}")
    problems += [f"unexpected key {key!r}" for key in state_dict if key not in expected]
    return problems


def load_weights_into(model, state_dict, path: str | Path = "checkpoint", what: str = "model", *,
                      model_name: str | None = None):
    """``model.load_state_dict(state_dict)`` (strict), every misfit a one-line CheckpointError::

        <path>: <what> weights do not fit <model_name>: conv1.weight has shape [8, 3, 3, 3], the model expects [64, 3, 3, 3]

    Returns the model. ``model_name`` defaults to the model's class name.
    """
    name = model_name or type(model).__name__
    prefix = f"{path}: {what} weights do not fit {name}"
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{prefix}: they are a {type(state_dict).__name__}, not a state dict")
    problems = _weight_problems(model, state_dict)
    if problems:
        shown = "; ".join(problems[:2])  # two: a renamed key is one missing and one unexpected
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(f"{prefix}: {shown}{more}")
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:  # e.g. a value torch cannot copy
        detail = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{prefix}: {detail}") from error
    return model


def build_model_from_checkpoint(checkpoint: dict, path: str | Path | None = None):
    """The trained model, in eval mode, on the CPU.

    Raises CheckpointError (one line, naming ``path``: pass the file the checkpoint came from)
    when the weights do not fit the model the checkpoint names or are not finite.
    """
    from .models import build_model

    path = "checkpoint" if path is None else path
    check_finite_weights(checkpoint, path)
    model = build_model(checkpoint["model_name"], checkpoint["num_classes"], checkpoint.get("in_chans", 3),
                        checkpoint.get("img_size", 32))
    load_weights_into(model, checkpoint["model"], path, model_name=checkpoint["model_name"])
    return model.eval()


def _load_dict(path: Path, kind: str, expected: str) -> dict:
    """A run's ``kind`` file (a dict of ``expected``), or a one-line CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {kind} file")
    loaded = _torch_load(path, "cpu", f"{kind} file")
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a {kind} file (a {type(loaded).__name__}, expected a dict of {expected})")
    return loaded


def load_labels(path: str | Path, num_samples: int | None = None) -> dict:
    """A run's labels.pt, checked, or a one-line CheckpointError: ``labels`` and ``clean_labels``,
    integer tensors of one shape ``(num_samples,)``."""
    path = Path(path)
    labels = _load_dict(path, "labels", "labels and clean_labels")
    for key in ("labels", "clean_labels"):
        value = labels.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dim() != 1:
            raise CheckpointError(f"{path}: labels entry {key!r} must be a 1-D integer tensor, got "
                                  f"{_describe(value) if not isinstance(value, torch.Tensor) else value.dtype}")
        if num_samples is not None and value.shape[0] != num_samples:
            raise CheckpointError(f"{path}: labels entry {key!r} has {value.shape[0]} labels, the run has "
                                  f"{num_samples} training points")
    return labels


def load_initial_weights(path: str | Path) -> dict:
    """A run's init.pt (the model's state dict before training, for distances from it), or a one-line
    CheckpointError; whether it fits a model is the caller's to check."""
    return _load_dict(Path(path), "weights", "the model's tensors")


TRACKING_ENTRIES = {"adv_correct": torch.uint8, "adv_loss": torch.float16}  # shape (epochs, samples)
TRACKING_OPTIONAL = {"recorded": torch.uint8}  # shape (epochs,)


def load_tracking(path: str | Path, epochs: int | None, num_samples: int | None) -> dict:
    """A run's tracking.pt (``--track-samples``), checked, or a one-line CheckpointError.

    Expected: ``adv_correct`` (uint8) and ``adv_loss`` (float16), both of shape
    ``(epochs, num_samples)``; optionally ``recorded`` (uint8, shape ``(epochs,)``). ``epochs=None``,
    ``num_samples=None``: any number (the same in every entry).
    """
    path = Path(path)
    tracked = _load_dict(path, "tracking", ", ".join(TRACKING_ENTRIES))
    for key in TRACKING_ENTRIES:
        if key not in tracked:
            raise CheckpointError(f"{path}: tracking file lacks {key!r}")
    unexpected = [key for key in tracked if key not in TRACKING_ENTRIES and key not in TRACKING_OPTIONAL]
    if unexpected:
        raise CheckpointError(f"{path}: tracking file has an unexpected entry {unexpected[0]!r}")
    if isinstance(tracked["adv_correct"], torch.Tensor) and tracked["adv_correct"].dim() == 2:
        epochs = tracked["adv_correct"].shape[0] if epochs is None else epochs
        num_samples = tracked["adv_correct"].shape[1] if num_samples is None else num_samples
    for key, value in tracked.items():
        dtype = {**TRACKING_ENTRIES, **TRACKING_OPTIONAL}[key]
        shape = (epochs, num_samples) if key in TRACKING_ENTRIES else (epochs,)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: tracking entry {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{path}: tracking entry {key!r} has shape {_shape(value)}, expected "
                                  f"{list(shape)} for this run ({'epochs' if len(shape) == 1 else 'epochs x samples'})")
        if value.dtype != dtype:
            raise CheckpointError(f"{path}: tracking entry {key!r} is {value.dtype}, expected {dtype}")
    return tracked
