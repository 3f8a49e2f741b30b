"""TRADES (Zhang et al., 2019): CE on clean inputs + beta * KL(adv || clean)."""

from __future__ import annotations

import torch.nn.functional as F

from ..attacks import PenalizedTPGD
from ..settings import Hyperparameter
from .base import Method, MethodError


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
    hyperparameters = (Hyperparameter("beta", float, 6.0, "TRADES' robustness weight", minimum=0.0),)
    regularized_logits = "clean"  # TRADES+TE penalizes the clean logits in the loss (the paper's code)

    def __init__(self, setup, **method_args):
        super().__init__(setup, **method_args)
        if setup.norm not in ("Linf", "L2"):
            raise MethodError(f"{self.name} supports the Linf and L2 threat models, got norm {setup.norm!r}")
        self.beta = self.settings["beta"]

    def build_attack(self, model) -> PenalizedTPGD:
        s = self.setup
        return PenalizedTPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps, beta=self.beta, norm=s.norm)

    def run_attack(self, model, x, y, penalty=None, clean_logits=None):
        # clean_logits: eval-mode logits an extension (TE) already computed serve as the KL target
        return self.make_attack(model)(x, y, penalty=penalty, clean_logits=clean_logits)

    def training_logits(self, model, x, x_adv):
        # clean first: the order of the forward passes sets BatchNorm's running statistics
        logits_clean = model(x)
        return {"clean": logits_clean, "adv": model(x_adv)}

    def base_loss(self, logits, y):
        clean, adv = logits["clean"], logits["adv"]
        return F.cross_entropy(clean, y) + self.beta * trades_kl(adv, clean), {}
