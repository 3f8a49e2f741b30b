"""The interface every training method implements (built-ins and plugins alike).

A method is its attack (inner maximization), its training loss (outer minimization) and its own
per-run state. The trainer calls, for every batch::

    x_adv = method.attack(model, x, y, index, epoch)          # model: the bare module, any mode
    loss, logs = method.loss(model, x, x_adv, y, index, epoch) # model: as trained (DDP), train mode

``index`` holds the samples' positions in the training set, ``epoch`` counts from 1. ``logs`` maps
names to scalar tensors (batch means); the trainer averages them over the epoch without any
host-device synchronization. Everything a method needs to resume goes into ``state_dict()`` as
tensors and plain Python values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Hyperparameter:
    """A method's own setting, exposed as ``--<name with dashes>`` by the CLI."""

    name: str  # python keyword, e.g. "te_momentum" -> --te-momentum
    type: type
    default: Any  # None: the method derives it (e.g. from the number of epochs)
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class TrainingSetup:
    """What a method may know about the run."""

    num_samples: int
    num_classes: int
    epochs: int
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "Linf"


class MethodError(ValueError):
    """A method cannot be built with the given settings."""


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()

    def __init__(self, setup: TrainingSetup, **hparams):
        self.setup = setup
        known = {h.name: h for h in self.hyperparameters}
        unknown = sorted(set(hparams) - set(known))
        if unknown:
            raise MethodError(f"method {self.name!r} takes no setting {', '.join(unknown)}")
        self.hparams = {name: h.default if hparams.get(name) is None else h.type(hparams[name])
                        for name, h in known.items()}
        self.notes: list[str] = []  # messages for the run's log (e.g. derived defaults)

    # -- the attack object: built once per model by build_attack, reused at every step
    def build_attack(self, model: torch.nn.Module):
        raise NotImplementedError

    def make_attack(self, model: torch.nn.Module):
        """One attack object per model, built on first use (not once per step)."""
        if getattr(self, "_attack", None) is None or self._attack.model is not model:
            self._attack = self.build_attack(model)
        return self._attack

    # -- the two halves of a training step
    def attack(self, model: torch.nn.Module, x, y, index, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, x, x_adv, y, index, epoch: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # -- optional hooks around the update (the trainer calls them for every method, never by name)
    def before_loss(self, model: torch.nn.Module, x, x_adv, y, index, epoch: int) -> None:
        """After the attack, before ``loss``: e.g. AWP perturbs the weights here. ``model`` is the
        bare model (not a DDP wrapper), in train mode."""

    def before_step(self, model: torch.nn.Module, optimizer, epoch: int) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``: e.g. AWP restores the weights here,
        so the update applies the perturbed point's gradients to the unperturbed weights."""

    # -- optional hooks
    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        """Plain per-epoch values to log (e.g. a schedule's weight)."""
        return {}

    def to(self, device) -> "Method":
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def config(self) -> dict:
        """The resolved settings, plain values only (saved with the run)."""
        return dict(self.hparams)
