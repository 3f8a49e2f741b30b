"""Shared pieces of the analysis: loading runs and checkpoints, their data, the three training losses.

All analyses run the model in **eval mode** (dropout off, BatchNorm on its running statistics), so
that a loss is a deterministic function of the weights; the training losses themselves were
computed in train mode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attacks import PenalizedPGD, PenalizedTPGD, margins  # noqa: F401  (re-exported)
from ..methods.trades import trades_kl
from ..checkpoint import build_model_from_checkpoint, load_checkpoint, run_setting
from ..runtime import eval_mode
from ..data import IndexedDataset, load_data, load_split


class AnalysisError(ValueError):
    """The input cannot be analysed (missing file, wrong kind of run); the message says why in one line."""


# --------------------------------------------------------------------------- run directories
def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (``metrics.jsonl``), in epoch order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise AnalysisError(f"{path} not found: {run_dir} is not an `at-mem train` run directory")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise AnalysisError(f"{path}:{number}: not JSON ({error.msg})") from error
    if not records:
        raise AnalysisError(f"{path} is empty: the run has not finished an epoch yet")
    return sorted(records, key=lambda r: r["epoch"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        last = path / "last.pt"
        if not last.is_file():
            raise AnalysisError(f"{path} is a directory without last.pt: give a checkpoint file or a run directory")
        return last
    if not path.exists():
        raise AnalysisError(f"{path}: no such checkpoint file or run directory")
    return path


@dataclass
class LoadedCheckpoint:
    path: Path
    state: dict
    model: torch.nn.Module
    config: dict

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    @property
    def eps(self) -> float:
        return float(run_setting(self.state, "eps"))

    @property
    def step_size(self) -> float:
        return float(run_setting(self.state, "step_size"))

    @property
    def steps(self) -> int:
        return int(run_setting(self.state, "steps"))

    @property
    def norm(self) -> str:
        return run_setting(self.state, "norm")

    @property
    def beta(self) -> float:
        method = self.state.get("method", {})
        return float(method.get("config", {}).get("beta", 6.0))

    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def load_for_analysis(path: str | Path, device="cpu") -> LoadedCheckpoint:
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    model = build_model_from_checkpoint(state, path=path).to(device).eval()
    return LoadedCheckpoint(path, state, model, dict(state.get("config", {})))


def training_split(checkpoint: LoadedCheckpoint, data_dir: str | Path | None = None) -> IndexedDataset:
    """The run's training set with the labels it was trained on.

    Rebuilt from the checkpoint's configuration (train size, label noise, input noise, seed); when
    the run directory holds ``labels.pt`` those exact labels are used.
    """
    config = checkpoint.config
    data = load_data(checkpoint.state["dataset"], data_dir or config.get("data_dir", "./data"),
                     train_size=config.get("train_size"), test_size=1, label_noise=config.get("label_noise", 0.0),
                     input_noise=config.get("input_noise"), input_noise_fraction=config.get("input_noise_fraction", 1.0),
                     seed=config.get("seed", 0))
    train = data.train
    labels_file = checkpoint.run_dir / "labels.pt"
    if labels_file.is_file():
        saved = torch.load(labels_file, map_location="cpu", weights_only=True)["labels"]
        if saved.shape == train.labels.shape:
            train.labels = saved.to(torch.int64)
    return train


def test_split(checkpoint: LoadedCheckpoint, data_dir: str | Path | None = None, size: int | None = None) -> IndexedDataset:
    return load_split(checkpoint.state["dataset"], data_dir or checkpoint.config.get("data_dir", "./data"),
                      train=False, size=size)


def take(dataset: IndexedDataset, n: int, device="cpu", *, seed: int | None = None):
    """Float images in [0, 1] and labels of ``n`` points: the first ``n``, or a seeded random sample."""
    n = min(n, len(dataset))
    if seed is None:
        index = torch.arange(n)
    else:
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    images, labels, _ = dataset.batch(index)
    return images.float().div(255).to(device), labels.to(device)


# --------------------------------------------------------------------------- losses and attacks
def pgd_examples(model, x, y, *, eps, step_size, steps, norm="Linf", seed=0, batch_size=256):
    """PGD examples (CE, random start) for the model as it is now, on a fixed random stream."""
    from ..randomness import isolated_rng

    attack = PenalizedPGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True, norm=norm)
    out = []
    with eval_mode(model), isolated_rng(seed):
        for start in range(0, len(y), batch_size):
            out.append(attack(x[start:start + batch_size], y[start:start + batch_size]))
    return torch.cat(out) if out else x.clone()


def trades_examples(model, x, y, *, eps, step_size, steps, seed=0, batch_size=256):
    """TRADES' KL attack (TPGD) examples for the model as it is now."""
    from ..randomness import isolated_rng

    attack = PenalizedTPGD(model, eps=eps, alpha=step_size, steps=steps)
    out = []
    with eval_mode(model), isolated_rng(seed):
        for start in range(0, x.shape[0], batch_size):
            out.append(attack(x[start:start + batch_size], y[start:start + batch_size]))
    return torch.cat(out) if out else x.clone()


def trades_loss(model, x, x_adv, y, beta):
    """CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), as TRADES trains."""
    logits_clean = model(x)
    return F.cross_entropy(logits_clean, y) + beta * trades_kl(model(x_adv), logits_clean)


def finite_or_none(value):
    """JSON has no inf/nan: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
