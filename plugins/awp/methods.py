"""PGD-AT+AWP, TRADES+AWP and PGD-AT+TE+AWP, registered as ``pgd-at-awp``, ``trades-awp`` and
``pgd-at-te-awp`` through entry points: each is its base method with ``extensions``.

Defaults are the reference's (csdongxian/AWP@a7acf5d): ``AT_AWP/train_cifar10.py`` has
``--awp-gamma 0.01 --awp-warmup 0`` (epochs from 0, AWP while ``epoch >= awp_warmup``: from the
first epoch) and a proxy SGD with lr 0.01; ``trades_AWP/train_trades_cifar.py`` has
``--awp-gamma 0.005 --awp-warmup 10`` (epochs from 1, AWP while ``epoch >= 10``: 9 epochs without it
in a 200-epoch run) and a proxy SGD with the model's initial lr, 0.1.
"""

from __future__ import annotations

from at_memorization.methods.pgd_at import PGDAT
from at_memorization.methods.trades import TRADES
from at_memorization.plugins.temporal_ensembling.methods import TemporalEnsembling

from .awp import AdversarialWeightPerturbation


class PGDATAWP(PGDAT):
    name = "pgd-at-awp"
    description = "PGD-AT + adversarial weight perturbation (Wu et al. 2020): proxy ascent on -CE(adv)"
    extensions = (AdversarialWeightPerturbation,)
    awp_default_gamma, awp_default_warmup, awp_proxy_lr = 0.01, 0, 0.01


class TRADESAWP(TRADES):
    name = "trades-awp"
    description = "TRADES + adversarial weight perturbation (Wu et al. 2020): proxy ascent on -(CE + beta*KL)"
    extensions = (AdversarialWeightPerturbation,)
    awp_default_gamma, awp_default_warmup, awp_proxy_lr = 0.005, 9, 0.1


class PGDATTEAWP(PGDAT):
    name = "pgd-at-te-awp"
    description = ("PGD-AT + temporal ensembling + adversarial weight perturbation: the proxy ascends "
                   "-(CE(adv) + TE penalty), the method's own loss")
    extensions = (TemporalEnsembling, AdversarialWeightPerturbation)
    awp_default_gamma, awp_default_warmup, awp_proxy_lr = 0.01, 0, 0.01
