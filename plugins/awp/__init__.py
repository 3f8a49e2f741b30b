"""Adversarial Weight Perturbation (Wu, Xia & Wang, NeurIPS 2020) as a method plugin.

``pgd-at-awp``, ``trades-awp`` and ``pgd-at-te-awp`` (see ``methods.py``), registered through
the ``at_memorization.methods`` entry points in setup.cfg. The ``AdversarialWeightPerturbation``
extension adds AWP to any method that lists it in ``extensions``.
"""

from .awp import AWP_EPS, AWP_HYPERPARAMETERS, AdversarialWeightPerturbation, awp_weight_names
from .methods import PGDATAWP, PGDATTEAWP, TRADESAWP

__all__ = ["AWP_EPS", "AWP_HYPERPARAMETERS", "AdversarialWeightPerturbation", "PGDATAWP", "PGDATTEAWP", "TRADESAWP",
           "awp_weight_names"]
