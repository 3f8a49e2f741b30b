"""MART (Wang et al., ICLR 2020), registered as ``mart`` through an entry point.

"Improving Adversarial Robustness Requires Revisiting Misclassified Examples". The attack is
``MARTPGD`` (Linf PGD on CE from ``x + 0.001 * randn``) and the loss ``mart_loss``, both after the
authors' code (YisenWang/MART, commit 2d83e17b381dd2ee52223695e517bf6d5ff09c2c, ``mart.py``), whose
default weight is beta = 6 (``mart_loss``'s default and ``train_wideresnet.py``, WRN-34-10;
``train_resnet.py``, ResNet-18, uses 5).

The setting is ``mart_beta`` (``--mart-beta``), not ``beta``: ``--beta`` is TRADES' and a shared
flag would silently mean two different things. eps, step size and steps are the run's (``--eps``,
``--step-size``, ``--steps``); the reference's CIFAR-10 settings are 0.031, 0.007 and 10.
"""

from __future__ import annotations

from at_memorization.methods import Hyperparameter, Method, MethodError

from .attack import MARTPGD
from .loss import mart_terms


class MART(Method):
    name = "mart"
    description = "MART (Wang et al. 2020): CE + BCE on adv + beta * KL(adv || clean) * (1 - p_y(clean)), Linf"
    hyperparameters = (Hyperparameter("mart_beta", float, 6.0, "MART: weight of the misclassification-aware KL term"),)

    def __init__(self, setup, **hparams):
        super().__init__(setup, **hparams)
        if setup.norm != "Linf":
            raise MethodError(f"{self.name} supports the Linf threat model only (the reference code has no L2 "
                              f"attack), got norm {setup.norm!r}")
        self.beta = self.hparams["mart_beta"]
        if not self.beta >= 0:  # also NaN
            raise MethodError(f"{self.name}: --mart-beta must be a number >= 0, got {self.beta}")

    def build_attack(self, model) -> MARTPGD:
        s = self.setup
        return MARTPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps)

    def attack(self, model, x, y, index, epoch):
        # torchattacks puts the model in eval mode for the attack and restores it, as mart.py does
        return self.make_attack(model)(x, y)

    def loss(self, model, x, x_adv, y, index, epoch):
        # The order of the two forward passes is the reference's (it sets BatchNorm's running statistics).
        logits_clean = model(x)
        logits_adv = model(x_adv)
        loss_adv, loss_robust = mart_terms(logits_clean, logits_adv, y)
        loss = loss_adv + self.beta * loss_robust
        return loss, {"train_adv_acc": (logits_adv.argmax(1) == y).float().mean(),
                      "mart_adv_loss": loss_adv, "mart_kl_loss": loss_robust}
