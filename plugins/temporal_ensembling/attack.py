"""``TEPGD``: torchattacks' PGD whose inner loss adds the TE penalty (PGD-AT+TE's attack)."""

from __future__ import annotations

from at_memorization.attacks import PenalizedPGD

from .loss import TELoss


class TEPGD(PenalizedPGD):
    """Maximize ``CE(f(x_adv), y) + te(f(x_adv), index, epoch)``; usable in any training loop.

    >>> attack = TEPGD(model, te, eps=8/255, alpha=2/255, steps=10)
    >>> x_adv = attack(x, y, index=index, epoch=epoch)
    """

    def __init__(self, model, te: TELoss, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, norm="Linf"):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm)
        self.te = te

    def forward(self, images, labels, index=None, epoch: int = 0, penalty=None):
        if penalty is None and index is not None and self.te.weight(epoch) > 0:
            index = index.to(self.device)

            def penalty(logits):
                return self.te(logits, index, epoch)

        return super().forward(images, labels, penalty=penalty)
