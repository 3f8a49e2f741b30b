"""Temporal ensembling (Dong et al., ICLR 2022): the drop-in ``TELoss``, the ``TEPGD`` attack, the
``TemporalEnsembling`` extension that adds TE to any method, and the ``pgd-at-te`` / ``trades-te``
methods (registered through entry points in setup.cfg)."""

from .attack import TEPGD
from .loss import TELoss, ramp
from .methods import PGDATTE, TRADESTE, TemporalEnsembling

__all__ = ["PGDATTE", "TEPGD", "TELoss", "TRADESTE", "TemporalEnsembling", "ramp"]
