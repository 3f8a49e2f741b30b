"""Temporal ensembling (Dong et al., ICLR 2022): the drop-in ``TELoss``, the ``TEPGD`` attack, the
``WithIndex`` / ``without_index`` data helpers, the ``TemporalEnsembling`` extension that adds TE to
any method, and the ``pgd-at-te`` / ``trades-te`` methods (registered through entry points in
setup.cfg); ``te_schedule`` (TE placed relative to a run's learning-rate decays) and
``trades_attack_loss`` (the attack loss of a TRADES loop with TE). docs/drop_in.md shows TE in
foreign training loops."""

from .attack import TEPGD, trades_attack_loss
from .data import WithIndex, without_index
from .loss import (TEDeviceError, TELoss, TEPenalty, TERepeatedUpdateError, TERepeatedUpdateWarning, TEScheduleWarning,
                   ramp, te_penalty)
from .methods import PGDATTE, TRADESTE, TemporalEnsembling
from .schedule import te_schedule

__all__ = ["PGDATTE", "TEDeviceError", "TEPGD", "TELoss", "TEPenalty", "TERepeatedUpdateError",
           "TERepeatedUpdateWarning", "TEScheduleWarning", "TRADESTE", "TemporalEnsembling", "WithIndex", "ramp",
           "te_penalty", "te_schedule", "trades_attack_loss", "without_index"]
