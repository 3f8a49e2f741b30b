"""PGD adversarial training (Madry et al., 2018): minimize CE on PGD examples."""

from __future__ import annotations

import torch.nn.functional as F

from ..attacks import PenalizedPGD
from .base import Method


class PGDAT(Method):
    name = "pgd-at"
    description = "PGD adversarial training (Madry et al. 2018), Linf or L2"
    regularized_logits = "adv"  # an extension's loss term (TE) applies to the adversarial logits

    def build_attack(self, model) -> PenalizedPGD:
        s = self.setup
        return PenalizedPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, random_start=True, norm=s.norm)

    def training_logits(self, model, x, x_adv):
        return {"adv": model(x_adv)}

    def base_loss(self, logits, y):
        return F.cross_entropy(logits["adv"], y), {}
