"""PGD adversarial training (Madry et al., 2018): minimize CE on PGD examples."""

from __future__ import annotations

import torch.nn.functional as F

from ..attacks import PenalizedPGD
from .base import Method


class PGDAT(Method):
    name = "pgd-at"
    description = "PGD adversarial training (Madry et al. 2018), Linf or L2"

    def attack(self, model, x, y, index, epoch):
        return self.make_attack(model)(x, y)

    def make_attack(self, model) -> PenalizedPGD:
        """One attack object per model, built on first use (not once per step)."""
        if getattr(self, "_attack", None) is None or self._attack.model is not model:
            s = self.setup
            self._attack = PenalizedPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True, norm=s.norm)
        return self._attack

    def loss(self, model, x, x_adv, y, index, epoch):
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        return loss, {"train_adv_acc": (logits_adv.argmax(1) == y).float().mean()}
