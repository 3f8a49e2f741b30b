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

    def build_attack(self, model) -> PenalizedPGD:
        s = self.setup
        return PenalizedPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True, norm=s.norm)

    def loss(self, model, x, x_adv, y, index, epoch):
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        return loss, {"train_adv_acc": (logits_adv.argmax(1) == y).float().mean()}
