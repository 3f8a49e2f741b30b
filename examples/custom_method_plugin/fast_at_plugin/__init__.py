"""FGSM adversarial training with a random start (Wong, Rice & Kolter 2020, "fast AT").

A complete third-party method: subclass ``Method``, implement ``attack`` and ``loss``, declare
hyperparameters (each becomes an ``at-mem train`` flag), register it through an entry point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from at_memorization.methods import Hyperparameter, Method


class FastAT(Method):
    name = "fast-at"
    description = "FGSM with a random start (Wong et al. 2020), an example plugin"
    hyperparameters = (Hyperparameter("fgsm_step", float, None, "FGSM step size [default: 1.25 * eps]"),)

    def __init__(self, setup, **hparams):
        super().__init__(setup, **hparams)
        if self.hparams["fgsm_step"] is None:
            self.hparams["fgsm_step"] = 1.25 * setup.eps

    def attack(self, model, x, y, index, epoch):
        eps, step = self.setup.eps, self.hparams["fgsm_step"]
        delta = torch.empty_like(x).uniform_(-eps, eps).requires_grad_(True)
        was_training = model.training
        model.eval()
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        grad, = torch.autograd.grad(loss, delta)
        model.train(was_training)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        return (x + delta).clamp(0, 1)

    def loss(self, model, x, x_adv, y, index, epoch):
        logits = model(x_adv)
        return F.cross_entropy(logits, y), {"train_adv_acc": (logits.argmax(1) == y).float().mean()}
