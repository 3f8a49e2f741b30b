"""Clean, PGD-20, CW and AutoAttack accuracy with RobustBench's protocol.

RobustBench's protocol: the model takes [0, 1] inputs, is in eval mode, and is attacked with
AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square; 100-iteration APGD) on the first
``n_examples`` test points at eps 8/255 (Linf) or 0.5 (L2). For CIFAR-10/100 with the official files
present we call ``robustbench.eval.benchmark`` itself; for other data the same AutoAttack is run
from pyautoattack directly. Never torchattacks' ``AutoAttack`` (10-step APGD).

:func:`robustbench_protocol` is the public entry point for tensors a user already has (RobustBench's
``benchmark`` only loads its own data sets, downloading them when absent).

Every evaluation runs on an isolated random stream (see ``randomness.isolated_rng``), so it can be
called inside a training process without changing the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import sys
from pathlib import Path
from typing import Callable

import torch

from .attacks import cw30, pgd20
from .data import as_float, torchvision_files_present
from .randomness import isolated_rng
from .records import ATTACK_NAMES
from .runtime import resolve_device

# name -> factory(model, eps, norm) for torchattacks-style attacks
ATTACKS: dict[str, Callable] = {"pgd20": pgd20, "cw": cw30}
ALL_ATTACKS = ATTACK_NAMES  # evaluate's default: every attack, in records.ATTACK_NAMES' order
ROBUSTBENCH_DATASETS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
# RobustBench's leaderboard radii (images in [0, 1]).
ROBUSTBENCH_EPS = {"Linf": 8 / 255, "L2": 0.5}


def default_batch_size(device) -> int:
    """Evaluation batch size: large on a GPU (attacks on 1,024 images keep it busy), moderate on a CPU."""
    return 1024 if torch.device(device).type == "cuda" else 256


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def correct_flags(model, images, labels, *, batch_size: int = 256, device="cpu", attack=None, seed: int = 0,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Per-example correctness (bool) on clean or attacked inputs; the model is put in eval mode."""
    from .runtime import eval_mode

    flags = []
    with eval_mode(model), isolated_rng(seed):
        for x, y in _batches(images, labels, batch_size):
            x, y = as_float(x).to(device), y.to(device)
            if attack is not None:
                x = attack(x, y)
            with torch.no_grad():
                flags.append((model(x).argmax(1) == y).cpu())
            if progress:
                progress(len(y))
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def accuracy(model, images, labels, **kwargs) -> float:
    flags = correct_flags(model, images, labels, **kwargs)
    return flags.float().mean().item() if flags.numel() else float("nan")


AUTOATTACK_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")  # the attacks of version "standard", in order


class _AutoAttackStatus(logging.Handler):
    """pyautoattack's debug log ("apgd-t - 2/4 - 5 out of 250 successfully perturbed", "robust accuracy
    after apgd-t: ...") as progress: ``progress.note(line)`` per batch, ``progress(1)`` per finished attack."""

    def __init__(self, progress):
        super().__init__(logging.DEBUG)
        self.progress = progress
        self.skipped = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:  # pyautoattack's sanity checks: always shown
                print(f"autoattack warning: {message}", file=sys.stderr, flush=True)
            if message.startswith("robust accuracy after"):
                self.progress(1)
            if message.startswith("no robust"):
                self.skipped = "the other attacks skipped (no robust point left); "
            if hasattr(self.progress, "note") and (" - " in message or message.startswith(("running", "robust"))):
                self.progress.note(self.skipped + message)
        except Exception:  # noqa: BLE001  (progress must never break an evaluation)
            pass


def _autoattack_standard(model, x, y, *, eps: float, norm: str, device, batch_size: int, seed: int,
                         progress=None) -> torch.Tensor:
    """The adversarial inputs of pyautoattack's AutoAttack ``standard`` (model already in eval mode).

    ``progress``: called with 1 when each of its attacks (``AUTOATTACK_STANDARD``) finishes; its
    ``note(text)``, if it has one, gets pyautoattack's per-batch status lines."""
    import pyautoattack

    logger = logging.getLogger("auto-attack")
    handler = _AutoAttackStatus(progress) if progress else None
    saved = logger.level, logger.propagate
    if handler is not None:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # its debug lines go to the progress, not to the root logger's handlers
    try:
        with isolated_rng(seed):
            adversary = pyautoattack.AutoAttack(model, device=device, eps=eps, norm=norm, seed=seed,
                                                version="standard")
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
    return x_adv


def autoattack_accuracy(model, images, labels, *, eps: float, norm: str = "Linf", device="cpu",
                        batch_size: int = 256, seed: int = 0, progress=None) -> float:
    """AutoAttack ``standard`` from pyautoattack (the package RobustBench uses); ``progress`` as in
    ``_autoattack_standard``."""
    model.eval()
    x, y = as_float(images), labels.clone()
    x_adv = _autoattack_standard(model, x, y, eps=eps, norm=norm, device=device, batch_size=batch_size, seed=seed,
                                 progress=progress)
    return accuracy(model, x_adv, y, batch_size=batch_size, device=device)


def _describe_tensor(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _protocol_device(model, device) -> torch.device:
    if device is None:  # where the model is
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
        return torch.device("cpu")
    return resolve_device(device, use_cpu="device='cpu'")


def _check_protocol_inputs(x, y, threat_model, eps, batch_size, seed):
    """Normalized ``(threat_model, eps, batch_size, seed, x, y)``, or a one-line ValueError/TypeError."""
    norms = {name.lower(): name for name in ROBUSTBENCH_EPS}
    if not isinstance(threat_model, str) or threat_model.lower() not in norms:
        raise ValueError(f"threat_model must be 'Linf' or 'L2' (RobustBench's AutoAttack threat models), "
                         f"not {threat_model!r}")
    threat_model = norms[threat_model.lower()]
    if eps is None:
        eps = ROBUSTBENCH_EPS[threat_model]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive number (RobustBench: 8/255 for Linf, 0.5 for L2), not {eps!r}")
    for name, value in (("batch_size", batch_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (name == "batch_size" and value < 1):
            raise ValueError(f"{name} must be {'a positive' if name == 'batch_size' else 'an'} integer, not {value!r}")
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (N, C, H, W) image tensor, not {_describe_tensor(x)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"x must hold float images in [0, 1] (or uint8 pixels), not {x.dtype}")
    x = as_float(x)
    if not torch.isfinite(x).all():
        raise ValueError("x has NaN or infinite values; it must hold images in [0, 1]")
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"x must hold images in [0, 1] (RobustBench models normalize inside), "
                         f"but its values range over [{low:.4g}, {high:.4g}]")
    if not torch.is_tensor(y) or y.dim() != 1 or y.dtype in (torch.bool,) or y.is_floating_point() \
            or y.is_complex():
        raise TypeError(f"y must be a 1-D tensor of integer class labels, not {_describe_tensor(y)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    if y.min().item() < 0:
        raise ValueError(f"y must hold class indices >= 0 (its smallest is {y.min().item()})")
    return threat_model, float(eps), int(batch_size), int(seed), x, y.long()


def robustbench_protocol(model, x, y, *, threat_model: str = "Linf", eps: float | None = None,
                         batch_size: int | None = None, device=None, seed: int = 0,
                         progress: Callable[[str], Callable[[int], None] | None] | None = None) -> dict:
    """RobustBench's evaluation protocol on your own tensors; nothing is downloaded or written.

    What ``robustbench.eval.benchmark`` does after loading its data set: clean accuracy (as
    ``robustbench.utils.clean_accuracy``), then AutoAttack ``version='standard'`` (APGD-CE, APGD-T,
    FAB-T, Square; from pyautoattack, the package RobustBench uses) on all points at once with the
    same ``batch_size`` for both, and the accuracy on its adversarial inputs.

    ``model``: a ``torch.nn.Module`` taking images in [0, 1] (normalization inside) and returning
    ``(N, classes)`` logits, at least 10 classes (AutoAttack ``standard`` targets 9 other classes).
    It is moved to ``device`` and run in eval mode (its previous mode is restored afterwards;
    ``benchmark`` only warns about train mode). ``x``: ``(N, C, H, W)`` floats in [0, 1] (uint8 pixels
    are divided by 255); ``y``: ``(N,)`` integer labels. ``threat_model``: ``"Linf"`` or ``"L2"``;
    ``eps`` defaults to the leaderboard's 8/255 (Linf) or 0.5 (L2). ``batch_size`` defaults to 1024
    on a GPU, 256 on a CPU (``benchmark``: 32); it can change which random restarts a point gets, so
    report it with the numbers. ``device``: ``None`` means the model's device. ``seed`` fixes
    AutoAttack's random restarts (``benchmark`` leaves it to the clock); the caller's random state is
    left unchanged. ``progress``: as in :func:`evaluate`, called with ``"clean"`` and
    ``"autoattack"``; the callable it returns gets the number of points done (AutoAttack has no
    per-batch hook: its points are reported when it finishes).

    Returns ``{"clean_acc", "autoattack_acc"`` (fractions), ``"n_examples", "eps", "threat_model",
    "version": "standard", "batch_size", "seed"}``. Bad input raises a one-line ValueError/TypeError.
    """
    from .runtime import eval_mode

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module taking images in [0, 1], not {_describe_tensor(model)}")
    device = _protocol_device(model, device)
    if batch_size is None:
        batch_size = default_batch_size(device)
    threat_model, eps, batch_size, seed, x, y = _check_protocol_inputs(x, y, threat_model, eps, batch_size, seed)
    model = model.to(device)
    n = x.shape[0]
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x[:1].to(device))
        if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"the model must return one (N, classes) logits tensor; on one image it returned "
                             f"{_describe_tensor(logits)}")
        n_classes = logits.shape[1]
        if n_classes < 10:
            raise ValueError(f"AutoAttack 'standard' targets 9 other classes, so the model must output at least "
                             f"10 classes; it outputs {n_classes}")
        if y.max().item() >= n_classes:
            raise ValueError(f"y has label {y.max().item()} but the model outputs {n_classes} classes")
        clean = correct_flags(model, x, y, batch_size=batch_size, device=device, seed=seed,
                              progress=progress and progress("clean"))
        x_adv = _autoattack_standard(model, x, y, eps=eps, norm=threat_model, device=device,
                                     batch_size=batch_size, seed=seed)
        robust = correct_flags(model, x_adv, y, batch_size=batch_size, device=device, seed=seed,
                               progress=progress and progress("autoattack"))
    return {"clean_acc": int(clean.sum()) / n, "autoattack_acc": int(robust.sum()) / n, "n_examples": n,
            "eps": eps, "threat_model": threat_model, "version": "standard", "batch_size": batch_size,
            "seed": seed}


def official_files_present(dataset: str, data_dir: str | Path) -> bool:
    folder = ROBUSTBENCH_DATASETS.get(dataset)
    if folder is None:
        return False
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if dataset == "cifar10" else CIFAR100
    return torchvision_files_present(cls, data_dir)


def robustbench_benchmark(model, *, dataset: str, n_examples: int, data_dir, eps: float, norm: str = "Linf",
                          device="cpu", batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """``robustbench.eval.benchmark`` itself (needs the official CIFAR files in ``data_dir``)."""
    from ._compat import import_robustbench

    rb_eval = import_robustbench("eval")
    model.eval()
    with isolated_rng(seed):
        return rb_eval.benchmark(model, n_examples=n_examples, dataset=dataset, threat_model=norm,
                                 to_disk=False, data_dir=str(data_dir), device=torch.device(device),
                                 batch_size=batch_size, eps=eps)


def write_model_card(path: str | Path, *, dataset: str, eps: float, clean_acc: float, autoattack_acc: float,
                     extra: dict | None = None) -> Path:
    """A RobustBench ``model_info`` JSON (its ``ModelInfo`` fields: accuracies as percent strings)."""
    from ._compat import import_robustbench

    rb_utils = import_robustbench("utils")
    info = rb_utils.ModelInfo(dataset=dataset, eps=eps, clean_acc=str(round(clean_acc * 100, 2)),
                              autoattack_acc=str(round(autoattack_acc * 100, 2)))
    record = {k: v for k, v in dataclasses.asdict(info).items() if v is not None}
    record.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .atomic import write_text_atomic

    write_text_atomic(json.dumps(record, indent=2) + "\n", path)
    return path


def evaluate(model, images, labels, *, attacks=ALL_ATTACKS, eps: float = 8 / 255, norm: str = "Linf",
             device="cpu", batch_size: int = 256, seed: int = 0, dataset: str | None = None, data_dir=None,
             progress: Callable[[str], Callable[[int], None] | None] | None = None) -> dict:
    """Accuracy under each requested attack, as fractions: ``{"clean_acc": ..., "pgd20_acc": ...}``.

    ``autoattack`` goes through ``robustbench.eval.benchmark`` when ``dataset`` is CIFAR-10/100 and
    its official files are in ``data_dir`` (then ``images``/``labels`` are not used for it).
    As in RobustBench, ``autoattack`` always comes with ``clean_acc`` on the same points, even when
    ``clean`` is not requested (measured once when both are).
    """
    unknown = [a for a in attacks if a not in ALL_ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ALL_ATTACKS)}, all")
    model = model.to(device).eval()
    results: dict = {}
    benchmark = ("autoattack" in attacks and dataset is not None and data_dir is not None
                 and official_files_present(dataset, data_dir))
    # robustbench.eval.benchmark returns its own clean accuracy; pyautoattack's run needs ours.
    if "clean" in attacks or ("autoattack" in attacks and not benchmark):
        results["clean_acc"] = accuracy(model, images, labels, batch_size=batch_size, device=device,
                                        progress=progress and progress("clean"))
    for name in attacks:
        if name in ATTACKS:
            attack = ATTACKS[name](model, eps=eps, norm=norm)
            results[f"{name}_acc"] = accuracy(model, images, labels, batch_size=batch_size, device=device,
                                              attack=attack, seed=seed, progress=progress and progress(name))
    if "autoattack" in attacks:
        if benchmark:
            clean, robust = robustbench_benchmark(model, dataset=dataset, n_examples=len(labels), data_dir=data_dir,
                                                  eps=eps, norm=norm, device=device, batch_size=batch_size, seed=seed)
            results["autoattack_acc"] = robust
            results["autoattack_protocol"] = "robustbench.eval.benchmark"
            results.setdefault("clean_acc", clean)
        else:
            results["autoattack_acc"] = autoattack_accuracy(model, images, labels, eps=eps, norm=norm,
                                                            device=device, batch_size=batch_size, seed=seed,
                                                            progress=progress and progress("autoattack"))
            results["autoattack_protocol"] = "pyautoattack standard (RobustBench's AutoAttack)"
    return results
