"""Temporal ensembling as an extension of any method, and PGD-AT+TE / TRADES+TE, registered as
``pgd-at-te`` and ``trades-te`` through entry points.

``TemporalEnsembling`` is the regularizer of Dong et al. (ICLR 2022): a per-sample running average
of the model's eval-mode clean predictions (``TELoss``), and the penalty
``weight(epoch) * mean((softmax(logits) - average)**2)`` (``te_penalty``) added both to the attack's
inner loss (on the adversarial logits) and to the training loss (on the logits the base method
names: adversarial for PGD-AT, clean for TRADES, as in the paper's code). A TE variant of another
method is that method's class with ``extensions = (TemporalEnsembling,)``.
"""

from __future__ import annotations

import torch

from at_memorization.methods import Extension, Hyperparameter, LoggedValue, MethodError
from at_memorization.methods.pgd_at import PGDAT
from at_memorization.methods.trades import TRADES
from at_memorization.runtime import eval_mode

from .loss import TELoss, default_schedule, te_penalty


class TemporalEnsembling(Extension):
    """The TE regularizer for the method that lists it; ``te`` is its ``TELoss``."""

    key = "te"
    has_state = True
    # The epoch's ramped weight; runs recorded before it was named te_weight_now logged it as te_weight.
    logged = (LoggedValue("te_weight_now", "TE weight", aliases=("te_weight",)),)
    hyperparameters = (
        Hyperparameter("te_momentum", float, 0.9, "TE: momentum of the per-sample prediction average",
                       minimum=0.0, maximum=1.0, exclusive_maximum=True),
        Hyperparameter("te_weight", float, 300.0, "TE: maximum weight of the penalty (the logged te_weight_now "
                       "is the ramped weight of the epoch)", minimum=0.0),
        Hyperparameter("te_start", int, None, "TE: first epoch of the ensemble and penalty (200 epochs: 90; else "
                       "round(0.45*epochs))", minimum=1, derived=lambda values: default_schedule(values["epochs"])[0]),
        Hyperparameter("te_end", int, None, "TE: epoch where the weight reaches its maximum (200 epochs: 150; else "
                       "round(0.75*epochs))", minimum=1, derived=lambda values: default_schedule(values["epochs"])[1]),
    )

    def __init__(self, method):
        super().__init__(method)
        setup, h, name = method.setup, method.settings, method.name
        start, end = h["te_start"], h["te_end"]  # given, or derived from the run's epochs (hyperparameters)
        if {"te_start", "te_end"} <= set(method.derived) and setup.epochs != 200:
            method.notes.append(f"TE: {setup.epochs} epochs, so the ensemble starts at epoch {start} "
                                f"(45%) and its weight peaks at epoch {end} (75%)")
        if start > setup.epochs:
            raise MethodError(f"{name}: TE starts at epoch {start} (--te-start) but the run has {setup.epochs} "
                              f"epochs, so TE would never switch on; use --te-start <= {setup.epochs}")
        if end > setup.epochs:
            method.notes.append(f"warning: TE's weight peaks at epoch {end} (--te-end) but the run has "
                                f"{setup.epochs} epochs: it never reaches --te-weight {h['te_weight']:g}")
        try:
            self.te = TELoss(setup.num_samples, setup.num_classes, momentum=h["te_momentum"],
                             reg_weight=h["te_weight"], start_epoch=start, end_epoch=end)
        except ValueError as error:
            raise MethodError(f"{name}: {error}") from error
        # The trainer passes valid indices and stops on non-finite losses itself; skipping the
        # checks avoids a host-device synchronization per step.
        self.te.validate = False
        self.te.equal_rank_batches = True  # the trainer's per-rank batches always have equal sizes

    def before_attack(self, model, x, index, epoch):
        """Eval-mode clean logits of the batch, fed to the ensemble (None before TE starts)."""
        if not self.te.active(epoch):
            return None
        with eval_mode(model), torch.no_grad():
            clean_logits = model(x)
        self.te.update(clean_logits, index, epoch)
        return clean_logits

    def attack_penalty(self, index, epoch):
        """The penalty on the attack's logits; the soft target is gathered once, not at every step."""
        weight = self.te.weight(epoch)
        if weight == 0.0:
            return None
        target = self.te.target(index)
        return lambda logits: te_penalty(logits, target, weight)

    def loss_term(self, logits, index, epoch):
        te_loss = self.te(logits, index, epoch)
        return te_loss, {"te_loss": te_loss}

    def on_epoch_start(self, epoch):
        return {"te_weight_now": self.te.weight(epoch)}

    def to(self, device):
        self.te.to(device)

    def state_dict(self):
        return dict(self.te.state_dict())

    def load_state_dict(self, state):
        self.te.load_state_dict(state)


class PGDATTE(PGDAT):
    name = "pgd-at-te"
    description = "PGD-AT + temporal ensembling (Dong et al. 2022): TE penalty in attack and loss"
    extensions = (TemporalEnsembling,)


class TRADESTE(TRADES):
    name = "trades-te"
    description = "TRADES + temporal ensembling (Dong et al. 2022): TE penalty in attack (adv) and loss (clean)"
    extensions = (TemporalEnsembling,)
