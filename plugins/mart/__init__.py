"""MART (Wang et al., ICLR 2020): the ``MARTPGD`` attack, the drop-in ``mart_loss`` and the ``mart``
method (registered through an entry point in setup.cfg)."""

from .attack import MARTPGD
from .loss import mart_loss
from .methods import MART

__all__ = ["MART", "MARTPGD", "mart_loss"]
