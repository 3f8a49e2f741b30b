"""Adversarial Weight Perturbation (Wu, Xia & Wang, NeurIPS 2020) as a method plugin.

``pgd-at-awp``, ``trades-awp`` and ``pgd-at-te-awp`` (see ``methods.py``), registered through
the ``at_memorization.methods`` entry points in setup.cfg. ``AWPMixin`` adds AWP to any method.
"""

from .awp import AWP_EPS, AWPMixin, awp_weight_names
from .methods import AWP_HYPERPARAMETERS, PGDATAWP, PGDATTEAWP, TRADESAWP

__all__ = ["AWP_EPS", "AWP_HYPERPARAMETERS", "AWPMixin", "PGDATAWP", "PGDATTEAWP", "TRADESAWP", "awp_weight_names"]
