"""The package's PGD loop (a torchattacks ``PGD`` subclass with hooks), its variants, and the evaluation attacks.

``PenalizedPGD`` and ``PenalizedTPGD`` accept a ``penalty(logits) -> scalar`` added to the inner
loss at every step (temporal ensembling uses this). Without a penalty they compute exactly what
torchattacks' ``PGD`` / ``TPGD`` compute. Inputs and outputs are images in [0, 1]; normalization, if
any, lives inside the model (RobustBench's convention), so never call ``set_normalization_used``.

Every attack here computes input gradients only: while it runs, the model's parameters do not
require grad (``input_gradients_only``; their flags are restored afterwards, also on error). Eager
``autograd.grad`` with respect to the input skips weight gradients anyway, but a compiled model
(``torch.compile``: AOTAutograd compiles one backward for every input that requires grad) would
compute them at every attack step and throw them away.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
import torchattacks

Penalty = Optional[Callable[[torch.Tensor], torch.Tensor]]


@contextlib.contextmanager
def input_gradients_only(model: torch.nn.Module) -> Iterator[None]:
    """Inside, none of ``model``'s parameters requires grad; afterwards (also on error) those that did
    require it again. Nested uses are safe (the inner one finds nothing to freeze).

    An attack needs the gradient with respect to its input only. Eager autograd already skips the
    weight gradients there, so this changes no eager result; but a model compiled with
    ``torch.compile`` differentiates every graph input that requires grad, so without this its attack
    steps compute (and discard) every weight gradient. Frozen parameters also give the attack its
    own compiled graph, with input gradients only. Pass the bare module (not a DDP wrapper), as the
    trainer does; the parameters are the same objects.
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _InputGradientsOnly:
    """Runs a torchattacks attack (its ``__call__``) under ``input_gradients_only(self.model)``."""

    def __call__(self, *args, **kwargs):
        with input_gradients_only(self.model):
            return super().__call__(*args, **kwargs)


class PenalizedPGD(_InputGradientsOnly, torchattacks.PGD):
    """Madry et al.'s PGD (Linf or L2) maximizing ``loss_fn(logits, labels) + penalty(logits)``.

    The package's one PGD loop: ``forward`` reads top to bottom, and an attack that differs overrides
    its hooks, not the loop: ``_target`` (what the inner loss compares the logits with),
    ``_random_start`` (the first point, clamped to [0, 1] or not), ``_inner_loss`` (and ``loss_fn``)
    and ``_step`` (the ascent step and projection). ``CWLinf``, ``PenalizedTPGD`` (TRADES) and the MART
    plugin's ``MARTPGD`` do so.
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, norm="Linf"):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        if norm not in ("Linf", "L2"):
            raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
        self.norm = norm
        self.supported_mode = ["default"]

    def forward(self, images, labels=None, penalty: Penalty = None, clean_logits: torch.Tensor | None = None):
        """``x_adv`` for the batch. ``clean_logits``: the clean batch's logits, for an attack whose
        target is computed from them (TRADES' KL target); the others ignore them."""
        images = images.clone().detach().to(self.device)
        target = self._target(images, labels, clean_logits)
        adv_images = self._random_start(images) if self.random_start else images.clone().detach()
        for _ in range(self.steps):
            adv_images.requires_grad = True
            logits = self.get_logits(adv_images)
            cost = self._inner_loss(logits, target, penalty)
            # Input gradients only: no weight gradients are accumulated during the attack.
            grad = torch.autograd.grad(cost, adv_images)[0]
            adv_images = self._step(adv_images, images, grad)
        # Every step ends in [0, 1]. Without steps this is the start, which TRADES' L2 and MART's
        # references leave unclamped before their loops and clamp after them.
        return torch.clamp(adv_images, min=0, max=1).detach()

    # ------------------------------------------------------------------ the hooks
    def _target(self, images: torch.Tensor, labels, clean_logits: torch.Tensor | None):
        return labels.clone().detach().to(self.device)

    def _random_start(self, images: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf" and isinstance(self.eps, torch.Tensor):  # one radius per channel (TEPGD)
            start = images + torch.empty_like(images).uniform_(-1.0, 1.0) * self.eps
        elif self.norm == "Linf":
            start = images + torch.empty_like(images).uniform_(-self.eps, self.eps)
        else:
            # L2: a uniform direction with a radius in [0, eps], as torchattacks' PGDL2.
            delta = torch.randn_like(images)
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            radius = torch.empty_like(norms).uniform_(0, 1)
            start = images + delta / norms.clamp_min(1e-12) * radius * self.eps
        return torch.clamp(start, min=0, max=1).detach()

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def _inner_loss(self, logits: torch.Tensor, target, penalty: Penalty) -> torch.Tensor:
        cost = self.loss_fn(logits, target)
        return cost if penalty is None else cost + penalty(logits)

    def _step(self, adv_images, images, grad):
        if self.norm == "Linf":
            adv_images = adv_images.detach() + self.alpha * grad.sign()
            delta = torch.clamp(adv_images - images, min=-self.eps, max=self.eps)
        else:
            grad_norms = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-10)
            delta = adv_images.detach() + self.alpha * grad / grad_norms - images
            delta_norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(self.eps / delta_norms.clamp_min(1e-12), max=1.0)
        return torch.clamp(images + delta, min=0, max=1).detach()


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``f(x)_y - max_{j != y} f(x)_j`` per example (negative when misclassified)."""
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return correct - others.max(dim=1).values


class CWLinf(PenalizedPGD):
    """PGD on the Carlini-Wagner margin loss (the 'CW' row of robustness tables).

    Maximizes ``min(max_{j != y} f_j - f_y, kappa)`` as TRADES'/MART's CW evaluation
    (``-relu(f_y - max_j f_j + kappa)``): it pushes every point until it is misclassified by kappa.
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=30, kappa: float = 50.0, norm="Linf"):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=True, norm=norm)
        self.kappa = kappa

    def loss_fn(self, logits, labels):
        return (-margins(logits.float(), labels)).clamp(max=self.kappa).mean()


def trades_attack_loss(kl_sum: torch.Tensor, logits_adv: torch.Tensor, beta: float, penalty: Penalty = None
                       ) -> torch.Tensor:
    """The loss TRADES' attack maximizes, with a penalty as the paper's ``TRADES_TE`` adds it.

    ``kl_sum`` (TRADES' ``KLDivLoss(size_average=False)``, summed over the batch) alone while there
    is no penalty, or the penalty is inactive (a TE penalty before its start: ``penalty.active`` is
    False); else ``(beta / B) * kl_sum + penalty(logits_adv)``, B the batch size. The scaling keeps
    the penalty's share of the attack's gradient what it is in the official code; leaving it out
    weakens the penalty by ``B / beta``.

    Parameters
    ----------
    kl_sum : Tensor
        ``KL(p_clean || p_adv)`` summed over the batch (``nn.KLDivLoss(reduction="sum")``).
    logits_adv : Tensor
        ``(batch, classes)`` logits of the adversarial batch (what ``kl_sum`` was computed from).
    beta : float
        TRADES' robustness weight (the paper: 6).
    penalty : callable, optional
        ``penalty(logits)``, e.g. ``TELoss.attack_penalty(index, epoch)``; None: no penalty.
    """
    if penalty is None or not getattr(penalty, "active", True):
        return kl_sum
    return beta / logits_adv.shape[0] * kl_sum + penalty(logits_adv)


class PenalizedTPGD(PenalizedPGD):
    """TRADES' attack: maximize ``(beta/B) * KL_sum(adv || clean) + penalty(adv logits)``.

    ``beta`` only rescales the KL term, which matters when a penalty is added (TRADES+TE).

    ``norm="Linf"`` is torchattacks' ``TPGD`` (sign steps of ``alpha``, start clamped to [0, 1]).
    ``norm="L2"`` is the ``norm == 'l2'`` branch of ``TRADES_TE`` in the paper's code,
    dongyp13/memorization-AT ``loss.py`` at commit 5edda6cc135ebfe0785a05a4d08ebfce17e38116:
    start ``x + 0.001 * randn`` (not clamped), steps of ``alpha`` along ``grad / (||grad||_2 + 1e-10)``,
    projection of the perturbation onto the L2 ball with ``renorm(p=2, dim=0, maxnorm=eps)``, then
    clamping to [0, 1]. (TRADES' own ``trades.py``, ``distance == 'l_2'``, differs: SGD on delta with
    ``lr = 2 * eps / steps`` and the clamp before the renorm.)
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps=10, beta: float = 1.0, norm="Linf"):
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=True, norm=norm)
        self.beta = beta

    def _target(self, images, labels, clean_logits):
        """The clean distribution (labels are not used)."""
        if clean_logits is None:
            with torch.no_grad():  # a fixed target: no graph to keep alive through the steps
                clean_logits = self.get_logits(images)
        return F.softmax(clean_logits.detach().float(), dim=1)

    def _random_start(self, images):
        start = images + 0.001 * torch.randn_like(images)
        return (torch.clamp(start, min=0, max=1) if self.norm == "Linf" else start).detach()

    def _inner_loss(self, logits, target, penalty):
        cost = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="sum")
        return trades_attack_loss(cost, logits, self.beta, penalty)

    def _step(self, adv_images, images, grad):
        if self.norm == "Linf":
            return super()._step(adv_images, images, grad)
        # the paper's code, operation for operation (see the class docstring)
        shape = (-1,) + (1,) * (images.dim() - 1)
        grad_norms = torch.norm(grad.reshape(grad.shape[0], -1), dim=1).view(shape)
        delta = adv_images.detach() + self.alpha * (grad / (grad_norms + 1e-10)) - images
        delta = delta.reshape(images.shape[0], -1).renorm(p=2, dim=0, maxnorm=self.eps).view_as(images)
        return torch.clamp(images + delta, min=0, max=1).detach()


# --------------------------------------------------------------------------- evaluation attacks
def pgd20(model, eps: float = 8 / 255, norm: str = "Linf"):
    """PGD-20 with step 2/255 (Linf) or eps/4 (L2), one random start."""
    alpha = 2 / 255 if norm == "Linf" else eps / 4
    return PenalizedPGD(model, eps=eps, alpha=alpha, steps=20, random_start=True, norm=norm)


def cw30(model, eps: float = 8 / 255, norm: str = "Linf"):
    """CW-Linf: 30 PGD steps (step 2/255) on the margin loss, one random start."""
    alpha = 2 / 255 if norm == "Linf" else eps / 4
    return CWLinf(model, eps=eps, alpha=alpha, steps=30, norm=norm)


def selection_pgd(model, eps: float, step_size: float, steps: int, norm: str = "Linf"):
    """The per-epoch test attack of a training run (``--eval-steps`` PGD steps of the training step
    size): it measures ``test_robust_acc`` each epoch, which selects ``best.pt``."""
    return PenalizedPGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True, norm=norm)
