"""FGSM adversarial training with a random start (Wong, Rice & Kolter 2020, "fast AT"), and its
temporal-ensembling variant, as a third-party plugin.

A complete method: subclass ``Method``, write its three parts (``run_attack``, ``training_logits``,
``base_loss``), declare its settings (each becomes an ``at-mem train`` flag), register it through
an entry point (setup.cfg). Because the attack accepts a ``penalty``, any extension composes with
it: ``fast-at-te`` below is the whole TE variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from at_memorization.methods import Hyperparameter, Method
from at_memorization.plugins.temporal_ensembling import TemporalEnsembling
from at_memorization.runtime import eval_mode


class FastAT(Method):
    name = "fast-at"
    description = "FGSM with a random start (Wong et al. 2020), an example plugin"
    hyperparameters = (Hyperparameter("fgsm_step", float, None, "FGSM step size [default: 1.25 * eps]"),)
    regularized_logits = "adv"  # an extension's loss term applies to the adversarial logits

    def __init__(self, setup, **method_args):
        super().__init__(setup, **method_args)
        if self.settings["fgsm_step"] is None:
            self.settings["fgsm_step"] = 1.25 * setup.eps

    def run_attack(self, model, x, y, penalty=None, clean_logits=None):
        eps, step = self.setup.eps, self.settings["fgsm_step"]
        delta = torch.empty_like(x).uniform_(-eps, eps).requires_grad_(True)
        with eval_mode(model):
            logits = model((x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits, y) + (penalty(logits) if penalty is not None else 0.0)
            grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        return (x + delta).clamp(0, 1)

    def training_logits(self, model, x, x_adv):
        return {"adv": model(x_adv)}

    def base_loss(self, logits, y):
        return F.cross_entropy(logits["adv"], y), {}


class FastATTE(FastAT):
    name = "fast-at-te"
    description = "fast AT + temporal ensembling, composed from the two (an example plugin)"
    extensions = (TemporalEnsembling,)
