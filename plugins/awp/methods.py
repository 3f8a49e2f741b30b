"""PGD-AT+AWP, TRADES+AWP and PGD-AT+TE+AWP, registered as ``pgd-at-awp``, ``trades-awp`` and
``pgd-at-te-awp`` through entry points.

Defaults are the reference's (csdongxian/AWP@a7acf5d): ``AT_AWP/train_cifar10.py`` has
``--awp-gamma 0.01 --awp-warmup 0`` (epochs from 0, AWP while ``epoch >= awp_warmup``: from the
first epoch) and a proxy SGD with lr 0.01; ``trades_AWP/train_trades_cifar.py`` has
``--awp-gamma 0.005 --awp-warmup 10`` (epochs from 1, AWP while ``epoch >= 10``: 9 epochs without it
in a 200-epoch run) and a proxy SGD with the model's initial lr, 0.1.
"""

from __future__ import annotations

from at_memorization.methods import Hyperparameter
from at_memorization.methods.pgd_at import PGDAT
from at_memorization.methods.trades import TRADES
from at_memorization.plugins.temporal_ensembling.methods import PGDATTE

from .awp import AWPMixin

AWP_HYPERPARAMETERS = (
    Hyperparameter("awp_gamma", float, None, "AWP: size of the weight perturbation relative to each layer's weight "
                   "norm, 0 for none (the reference's: 0.01 for pgd-at-awp and pgd-at-te-awp, 0.005 for trades-awp)"),
    Hyperparameter("awp_warmup", int, None, "AWP: epochs trained without it before it starts (the reference's: 0; "
                   "trades-awp: 9 of 200 epochs, 4.5% of other lengths rounded down)"),
)


class PGDATAWP(AWPMixin, PGDAT):
    name = "pgd-at-awp"
    description = "PGD-AT + adversarial weight perturbation (Wu et al. 2020): proxy ascent on -CE(adv)"
    hyperparameters = PGDAT.hyperparameters + AWP_HYPERPARAMETERS
    awp_default_gamma = 0.01
    awp_default_warmup = 0
    awp_proxy_lr = 0.01


class TRADESAWP(AWPMixin, TRADES):
    name = "trades-awp"
    description = "TRADES + adversarial weight perturbation (Wu et al. 2020): proxy ascent on -(CE + beta*KL)"
    hyperparameters = TRADES.hyperparameters + AWP_HYPERPARAMETERS
    awp_default_gamma = 0.005
    awp_default_warmup = 9
    awp_proxy_lr = 0.1


class PGDATTEAWP(AWPMixin, PGDATTE):
    name = "pgd-at-te-awp"
    description = ("PGD-AT + temporal ensembling + adversarial weight perturbation: the proxy ascends "
                   "-(CE(adv) + TE penalty), the method's own loss")
    hyperparameters = PGDATTE.hyperparameters + AWP_HYPERPARAMETERS
    awp_default_gamma = 0.01
    awp_default_warmup = 0
    awp_proxy_lr = 0.01
