"""``mart_loss``: MART's outer loss on given clean and adversarial logits (a drop-in term).

Transcribed from YisenWang/MART ``mart.py`` (commit 2d83e17b381dd2ee52223695e517bf6d5ff09c2c)::

    adv_probs = softmax(logits_adv)
    new_y     = the most likely wrong class under adv_probs (from argsort(adv_probs)[:, -2:])
    loss_adv  = CE(logits_adv, y) + nll_loss(log(1.0001 - adv_probs + 1e-12), new_y)     # the "BCE"
    loss_rob  = (1 / B) * sum_i KL(nat_probs_i || adv_probs_i) * (1.0000001 - nat_probs_i[y_i])
    loss      = loss_adv + beta * loss_rob

with the KL written as ``KLDivLoss(reduction='none')(log(adv_probs + 1e-12), nat_probs).sum(1)``.
The one difference: the clean distribution enters the KL as log-probabilities (``log_target``). The
value is the same (to rounding), but the reference's form has a NaN gradient with respect to the
clean logits as soon as one clean probability underflows to 0 (d/dp of p*log(p) at p = 0), the
failure ``at_memorization.methods.trades.trades_kl`` avoids for TRADES. Gradients flow through
both the KL target and the ``1 - p_y`` weight, as in the reference (nothing is detached).
Computed in float32 whatever the autocast context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mart_terms(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor):
    """``(loss_adv, loss_robust)``: CE + BCE on the adversarial logits, and the weighted KL term."""
    logits_clean, logits_adv = logits_clean.float(), logits_adv.float()
    batch_size = len(logits_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_log_probs = F.log_softmax(logits_clean, dim=1)
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_log_probs, reduction="none", log_target=True).sum(dim=1)
    loss_robust = (1.0 / batch_size) * torch.sum(kl * (1.0000001 - true_probs))
    return loss_adv, loss_robust


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float = 6.0):
    """MART's training loss ``loss_adv + beta * loss_robust`` (a scalar)."""
    loss_adv, loss_robust = mart_terms(logits_clean, logits_adv, y)
    return loss_adv + float(beta) * loss_robust
