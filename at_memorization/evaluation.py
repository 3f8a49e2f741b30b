"""Clean, PGD-20, CW and AutoAttack accuracy with RobustBench's protocol.

RobustBench's protocol: the model takes [0, 1] inputs, is in eval mode, and is attacked with
AutoAttack ``standard`` (APGD-CE, APGD-T, FAB-T, Square; 100-iteration APGD) on the first
``n_examples`` test points at eps 8/255 (Linf) or 0.5 (L2). For CIFAR-10/100 with the official files
present we call ``robustbench.eval.benchmark`` itself; for other data the same AutoAttack is run
from pyautoattack directly. Never torchattacks' ``AutoAttack`` (10-step APGD).

Every evaluation runs on an isolated random stream (see ``randomness.isolated_rng``), so it can be
called inside a training process without changing the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from .attacks import cw30, pgd20
from .data import torchvision_files_present
from .randomness import isolated_rng

# name -> factory(model, eps, norm) for torchattacks-style attacks
ATTACKS: dict[str, Callable] = {"pgd20": pgd20, "cw": cw30}
ALL_ATTACKS = ("clean", "pgd20", "cw", "autoattack")
ROBUSTBENCH_DATASETS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def default_batch_size(device) -> int:
    """Evaluation batch size: large on a GPU (attacks on 1,024 images keep it busy), moderate on a CPU."""
    return 1024 if torch.device(device).type == "cuda" else 256


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


def correct_flags(model, images, labels, *, batch_size: int = 256, device="cpu", attack=None, seed: int = 0,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Per-example correctness (bool) on clean or attacked inputs; the model is put in eval mode."""
    from .runtime import eval_mode

    flags = []
    with eval_mode(model), isolated_rng(seed):
        for x, y in _batches(images, labels, batch_size):
            x, y = _as_float(x).to(device), y.to(device)
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


def autoattack_accuracy(model, images, labels, *, eps: float, norm: str = "Linf", device="cpu",
                        batch_size: int = 256, seed: int = 0) -> float:
    """AutoAttack ``standard`` from pyautoattack (the package RobustBench uses)."""
    import pyautoattack

    model.eval()
    x, y = _as_float(images), labels.clone()
    with isolated_rng(seed):
        adversary = pyautoattack.AutoAttack(model, device=device, eps=eps, norm=norm, seed=seed, version="standard")
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return accuracy(model, x_adv, y, batch_size=batch_size, device=device)


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
    from .checkpoint import write_text_atomic

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
                                                            device=device, batch_size=batch_size, seed=seed)
            results["autoattack_protocol"] = "pyautoattack standard (RobustBench's AutoAttack)"
    return results
