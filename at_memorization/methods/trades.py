"""TRADES (Zhang et al., 2019): CE on clean inputs + beta * KL(adv || clean)."""

from __future__ import annotations

import torch.nn.functional as F

from ..attacks import PenalizedTPGD
from .base import Hyperparameter, Method, MethodError


def trades_kl(logits_adv, logits_clean):
    """KL(p_clean || p_adv), batch mean: the value of TRADES' ``KLDiv(log_softmax(adv), softmax(clean))``.

    The clean distribution is passed as log-probabilities (``log_target``): the same value, but
    TRADES' form has a NaN gradient with respect to the clean logits as soon as one clean
    probability underflows to 0 (d/dp of p*log(p) at p = 0), which killed a TRADES-TE run on the
    first GPU (an H200, fp32). Here the gradient stays finite.
    """
    return F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.log_softmax(logits_clean.float(), dim=1),
                    reduction="batchmean", log_target=True)


class TRADES(Method):
    name = "trades"
    description = "TRADES (Zhang et al. 2019): CE(clean) + beta * KL(adv || clean), Linf or L2"
    hyperparameters = (Hyperparameter("beta", float, 6.0, "TRADES' robustness weight"),)

    def __init__(self, setup, **hparams):
        super().__init__(setup, **hparams)
        if setup.norm not in ("Linf", "L2"):
            raise MethodError(f"{self.name} supports the Linf and L2 threat models, got norm {setup.norm!r}")
        self.beta = self.hparams["beta"]
        if not self.beta >= 0:  # also NaN
            raise MethodError(f"{self.name}: --beta must be a number >= 0, got {self.beta}")

    def build_attack(self, model) -> PenalizedTPGD:
        s = self.setup
        return PenalizedTPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, beta=self.beta, norm=s.norm)

    def attack(self, model, x, y, index, epoch):
        return self.make_attack(model)(x, y)

    def loss(self, model, x, x_adv, y, index, epoch):
        logits_clean = model(x)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_clean, y) + self.beta * trades_kl(logits_adv, logits_clean)
        return loss, {"train_adv_acc": (logits_adv.argmax(1) == y).float().mean()}
