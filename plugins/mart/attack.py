"""``MARTPGD``: the attack of MART's published code (YisenWang/MART ``mart.py``, ``mart_loss``).

Reference: github.com/YisenWang/MART at commit 2d83e17b381dd2ee52223695e517bf6d5ff09c2c,
``mart.py``, the ``distance == 'l_inf'`` branch. It is Linf PGD on the cross-entropy, but it differs
from Madry et al.'s PGD (``PenalizedPGD``) in two ways, both kept here:

* the start is ``x + 0.001 * randn`` (not a uniform draw in the eps-ball) and is *not* clamped to
  [0, 1] before the first gradient;
* the projection is ``min(max(x_adv, x - eps), x + eps)`` followed by ``clamp(0, 1)`` (the same set
  as ``x + clamp(x_adv - x, -eps, eps)``, but not the same floating-point values).

The one deliberate difference: the reference draws the noise on the host (``torch.randn(shape).cuda()``);
here it is drawn on the images' device (``randn_like``), which is the same draw on CPU and avoids a
host-to-device copy per step on a GPU.
"""

from __future__ import annotations

import torch

from at_memorization.attacks import PenalizedPGD


class MARTPGD(PenalizedPGD):
    """MART's inner maximization: ``steps`` sign steps of ``alpha`` on ``CE(f(x_adv), y)`` (+ ``penalty``).

    ``PenalizedPGD``'s loop with mart.py's start and projection as its hooks (the loop's closing clamp
    is mart.py's too)."""

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, start_std: float = 0.001):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=True, norm="Linf")
        self.start_std = start_std

    def _random_start(self, images):
        # mart.py: x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).cuda().detach() (not clamped)
        return (images + self.start_std * torch.randn_like(images)).detach()

    def _step(self, adv_images, images, grad):
        adv_images = adv_images.detach() + self.alpha * torch.sign(grad.detach())
        adv_images = torch.min(torch.max(adv_images, images - self.eps), images + self.eps)
        return torch.clamp(adv_images, 0.0, 1.0).detach()
