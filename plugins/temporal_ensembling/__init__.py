"""Temporal ensembling (Dong et al., ICLR 2022): the drop-in ``TELoss``, the ``TEPGD`` attack and
the ``pgd-at-te`` / ``trades-te`` methods (registered through entry points in setup.cfg)."""

from .attack import TEPGD
from .loss import TELoss, ramp
from .methods import PGDATTE, TRADESTE

__all__ = ["PGDATTE", "TEPGD", "TELoss", "TRADESTE", "ramp"]
