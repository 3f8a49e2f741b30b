"""PGD-AT+TE and TRADES+TE, registered as ``pgd-at-te`` and ``trades-te`` through entry points."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from at_memorization.methods import Hyperparameter, MethodError
from at_memorization.methods.pgd_at import PGDAT
from at_memorization.methods.trades import TRADES, trades_kl
from at_memorization.runtime import eval_mode

from .loss import TELoss, te_penalty

TE_HYPERPARAMETERS = (
    Hyperparameter("te_momentum", float, 0.9, "TE: momentum of the per-sample prediction average"),
    Hyperparameter("te_weight", float, 300.0, "TE: maximum weight of the penalty"),
    Hyperparameter("te_start", int, None, "TE: first epoch of the ensemble and penalty (200 epochs: 90; else round(0.45*epochs))"),
    Hyperparameter("te_end", int, None, "TE: epoch where the weight reaches its maximum (200 epochs: 150; else round(0.75*epochs))"),
)


class TemporalEnsemblingMixin:
    """Builds and drives a ``TELoss`` for a method; shared by the PGD-AT and TRADES variants."""

    def __init__(self, setup, **hparams):
        super().__init__(setup, **hparams)  # the PGD-AT or TRADES method next in the MRO
        self._init_te(setup)

    def _init_te(self, setup) -> None:
        h = self.hparams
        start, end = h["te_start"], h["te_end"]
        if start is None or end is None:
            if setup.epochs == 200:
                default_start, default_end = 90, 150
            else:
                default_start, default_end = round(0.45 * setup.epochs), round(0.75 * setup.epochs)
                default_start = max(1, default_start)
                default_end = max(default_end, default_start + 1)
            if start is None and end is None and setup.epochs != 200:
                self.notes.append(f"TE: {setup.epochs} epochs, so the ensemble starts at epoch {default_start} "
                                  f"(45%) and its weight peaks at epoch {default_end} (75%)")
            start = default_start if start is None else start
            end = default_end if end is None else end
            h["te_start"], h["te_end"] = start, end
        if start > setup.epochs:
            raise MethodError(f"{self.name}: TE starts at epoch {start} (--te-start) but the run has {setup.epochs} "
                              f"epochs, so TE would never switch on; use --te-start <= {setup.epochs}")
        if h["te_weight"] < 0 or not 0.0 <= h["te_momentum"] < 1.0:
            raise MethodError(f"{self.name}: --te-weight must be >= 0 and --te-momentum in [0, 1), got "
                              f"{h['te_weight']} and {h['te_momentum']}")
        if end > setup.epochs:
            self.notes.append(f"warning: TE's weight peaks at epoch {end} (--te-end) but the run has {setup.epochs} "
                              f"epochs: it never reaches --te-weight {h['te_weight']:g}")
        try:
            self.te = TELoss(setup.num_samples, setup.num_classes, momentum=h["te_momentum"],
                             reg_weight=h["te_weight"], start_epoch=start, end_epoch=end)
        except ValueError as error:
            raise MethodError(f"{self.name}: {error}") from error
        # The trainer passes valid indices and stops on non-finite losses itself; skipping the
        # checks avoids a host-device synchronization per step.
        self.te.validate = False
        self.te.equal_rank_batches = True  # the trainer's per-rank batches always have equal sizes

    def _update_ensemble(self, model, x, index, epoch):
        """Eval-mode clean logits of the batch, fed to the ensemble (None before TE starts)."""
        if not self.te.active(epoch):
            return None
        with eval_mode(model), torch.no_grad():
            clean_logits = model(x)
        self.te.update(clean_logits, index, epoch)
        return clean_logits

    def _penalty(self, index, epoch):
        """The inner-loss penalty for the attack; the target is gathered once, not at every step."""
        weight = self.te.weight(epoch)
        if weight == 0.0:
            return None
        target = self.te.target(index)
        return lambda logits: te_penalty(logits, target, weight)

    def on_epoch_start(self, epoch):
        return {"te_weight": self.te.weight(epoch)}

    def to(self, device):
        self.te.to(device)
        return self

    def state_dict(self):
        return {"te": dict(self.te.state_dict())}

    def load_state_dict(self, state):
        self.te.load_state_dict(state["te"])


class PGDATTE(TemporalEnsemblingMixin, PGDAT):
    name = "pgd-at-te"
    description = "PGD-AT + temporal ensembling (Dong et al. 2022): TE penalty in attack and loss"
    hyperparameters = PGDAT.hyperparameters + TE_HYPERPARAMETERS

    def attack(self, model, x, y, index, epoch):
        self._update_ensemble(model, x, index, epoch)
        return self.make_attack(model)(x, y, penalty=self._penalty(index, epoch))

    def loss(self, model, x, x_adv, y, index, epoch):
        logits_adv = model(x_adv)
        te_loss = self.te(logits_adv, index, epoch)
        loss = F.cross_entropy(logits_adv, y) + te_loss
        return loss, {"train_adv_acc": (logits_adv.argmax(1) == y).float().mean(), "te_loss": te_loss}


class TRADESTE(TemporalEnsemblingMixin, TRADES):
    name = "trades-te"
    description = "TRADES + temporal ensembling (Dong et al. 2022): TE penalty in attack (adv) and loss (clean)"
    hyperparameters = TRADES.hyperparameters + TE_HYPERPARAMETERS

    def attack(self, model, x, y, index, epoch):
        # The eval-mode clean logits serve both the ensemble update and TRADES' KL target.
        clean_logits = self._update_ensemble(model, x, index, epoch)
        return self.make_attack(model)(x, y, penalty=self._penalty(index, epoch), clean_logits=clean_logits)

    def loss(self, model, x, x_adv, y, index, epoch):
        logits_clean = model(x)
        logits_adv = model(x_adv)
        te_loss = self.te(logits_clean, index, epoch)
        loss = F.cross_entropy(logits_clean, y) + self.beta * trades_kl(logits_adv, logits_clean) + te_loss
        return loss, {"train_adv_acc": (logits_adv.argmax(1) == y).float().mean(), "te_loss": te_loss}
