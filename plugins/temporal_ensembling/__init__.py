"""Temporal ensembling (Dong et al., ICLR 2022): the drop-in ``TELoss``, the ``TEPGD`` attack, the
``WithIndex`` / ``without_index`` data helpers, the ``TemporalEnsembling`` extension that adds TE to
any method, and the ``pgd-at-te`` / ``trades-te`` methods (registered through entry points in
setup.cfg). docs/drop_in.md shows TE in foreign training loops."""

from .attack import TEPGD
from .data import WithIndex, without_index
from .loss import TELoss, TEPenalty, TERepeatedUpdateError, TERepeatedUpdateWarning, ramp, te_penalty
from .methods import PGDATTE, TRADESTE, TemporalEnsembling

__all__ = ["PGDATTE", "TEPGD", "TELoss", "TEPenalty", "TERepeatedUpdateError", "TERepeatedUpdateWarning",
           "TRADESTE", "TemporalEnsembling", "WithIndex", "ramp", "te_penalty", "without_index"]
