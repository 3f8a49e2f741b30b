"""Shared pieces of the analysis: loading runs and checkpoints, their data, and the training methods' own
attacks and losses, built through the method registry.

All analyses run the model in **eval mode** (dropout off, BatchNorm on its running statistics), so
that a loss is a deterministic function of the weights; the training losses themselves were
computed in train mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..methods import Method, TrainingSetup, get_method
from ..checkpoint import build_model_from_checkpoint, load_checkpoint, load_labels, run_setting
from ..runfolder import RunFolder, RunFolderError
from ..runtime import eval_mode
from ..user_errors import AnalysisError
from ..data import IndexedDataset, load_data, load_split


# --------------------------------------------------------------------------- run directories
def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of a run (``metrics.jsonl``), in epoch order: the run folder's one reader."""
    try:
        return RunFolder(run_dir).read_metrics()
    except RunFolderError as error:
        raise AnalysisError(str(error)) from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        last = RunFolder(path).last
        if not last.is_file():
            raise AnalysisError(f"{path} is a directory without {last.name}: give a checkpoint file or a run directory")
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
    labels_file = RunFolder(checkpoint.run_dir).labels
    if labels_file.is_file():
        train.labels = load_labels(labels_file, len(train.labels))["labels"].to(torch.int64)
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
def analysis_method(name: str, *, eps: float, step_size: float, steps: int, norm: str = "Linf",
                    **settings) -> Method:
    """A registered training method, built to reuse its attack and its own loss (not copies of them).

    ``settings`` are the method's (e.g. ``beta=6.0`` for trades). The analyses use the method's
    ``run_attack`` and ``base_loss`` only, which do not read the training set's size or the number
    of epochs; those are placeholders here (a method with extensions, which do read them, is refused).
    """
    setup = TrainingSetup(num_samples=1, num_classes=1, epochs=1, eps=eps, step_size=step_size, steps=steps,
                          norm=norm)
    cls = get_method(name)
    if cls.extensions:
        raise AnalysisError(f"method {name!r} has extensions ({', '.join(e.key for e in cls.extensions)}); "
                            f"the analyses use base methods' attacks and losses")
    return cls(setup, **settings)


def method_examples(method: Method, model, x, y, *, seed=0, batch_size=256):
    """The method's adversarial examples for the model as it is now (eval mode, a fixed random stream)."""
    from ..randomness import isolated_rng

    out = []
    with eval_mode(model), isolated_rng(seed):
        for start in range(0, len(y), batch_size):
            out.append(method.run_attack(model, x[start:start + batch_size], y[start:start + batch_size]))
    return torch.cat(out) if out else x.clone()


def method_loss(method: Method, model, x, x_adv, y) -> torch.Tensor:
    """The method's own training objective on fixed adversarial examples (its extensions left out)."""
    return method.base_loss(method.training_logits(model, x, x_adv), y)[0]


def pgd_examples(model, x, y, *, eps, step_size, steps, norm="Linf", seed=0, batch_size=256):
    """PGD examples (CE, random start), pgd-at's attack, for the model as it is now."""
    method = analysis_method("pgd-at", eps=eps, step_size=step_size, steps=steps, norm=norm)
    return method_examples(method, model, x, y, seed=seed, batch_size=batch_size)


def finite_or_none(value):
    """JSON has no inf/nan: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
