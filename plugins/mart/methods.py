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
    hyperparameters = (Hyperparameter("mart_beta", float, 6.0, "MART: weight of the misclassification-aware KL term",
                                      minimum=0.0),)
    regularized_logits = "adv"  # an extension's loss term applies to the adversarial logits, as for PGD-AT

    def __init__(self, setup, **method_args):
        super().__init__(setup, **method_args)
        if setup.norm != "Linf":
            raise MethodError(f"{self.name} supports the Linf threat model only (the reference code has no L2 "
                              f"attack), got norm {setup.norm!r}")
        self.beta = self.settings["mart_beta"]

    def build_attack(self, model) -> MARTPGD:
        s = self.setup
        return MARTPGD(model, eps=s.eps, alpha=s.step_size, steps=s.steps)

    def training_logits(self, model, x, x_adv):
        # The order of the two forward passes is the reference's (it sets BatchNorm's running statistics).
        logits_clean = model(x)
        return {"clean": logits_clean, "adv": model(x_adv)}

    def base_loss(self, logits, y):
        loss_adv, loss_robust = mart_terms(logits["clean"], logits["adv"], y)
        return loss_adv + self.beta * loss_robust, {"mart_adv_loss": loss_adv, "mart_kl_loss": loss_robust}
