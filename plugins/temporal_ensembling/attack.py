"""``TEPGD``: torchattacks' PGD whose inner loss adds the TE penalty (PGD-AT+TE's attack)."""

from __future__ import annotations

from at_memorization.attacks import PenalizedPGD

from .loss import TELoss, check_index


class TEPGD(PenalizedPGD):
    """Maximize ``CE(f(x_adv), y) + te(f(x_adv), index, epoch)``; usable in any training loop.

    >>> attack = TEPGD(model, te, eps=8/255, alpha=2/255, steps=10)
    >>> x_adv = attack(x, y, index=index, epoch=epoch)

    ``index`` (the batch's sample positions, a 1-D integer tensor) is required whenever the TE
    penalty is active (``te.weight(epoch) > 0``); without it the attack would silently be plain PGD.
    Before then (and with the default ``epoch=0``) ``attack(x, y)`` is plain PGD. A given ``index``
    is checked at every epoch, so a wrong one fails at once rather than when the penalty starts.
    """

    def __init__(self, model, te: TELoss, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, norm="Linf"):
        if not isinstance(te, TELoss):
            raise TypeError(f"te must be a TELoss, got {type(te).__name__}")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm)
        self.te = te

    def forward(self, images, labels, index=None, epoch: int = 0, penalty=None):
        if penalty is None:
            if index is not None:
                check_index(index, images.shape[0], self.te.num_samples, check_range=self.te.validate)
            if self.te.weight(epoch) > 0:
                if index is None:
                    raise ValueError(f"TEPGD needs index= (the batch's sample positions) at epoch {epoch}: "
                                     f"the TE penalty is active from epoch {self.te.start_epoch} on")
                index = index.to(self.device)

                def penalty(logits):
                    return self.te(logits, index, epoch)

        return super().forward(images, labels, penalty=penalty)
