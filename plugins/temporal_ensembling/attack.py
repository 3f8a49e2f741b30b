"""``TEPGD``: torchattacks' PGD whose inner loss adds the TE penalty (PGD-AT+TE's attack)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from at_memorization.attacks import PenalizedPGD

from .loss import TELoss, TEPenalty, _positive_int, check_index, make_normalizer, preserved_modes

# Inputs this far outside [0, 1] are not images in pixel space (normalized ones are, typically, in [-2.5, 2.8]).
_RANGE_TOLERANCE = 1e-6


class TEPGD(PenalizedPGD):
    """PGD maximizing ``CE(f(x_adv), y) + te(f(x_adv), index, epoch)``; usable in any training loop.

    >>> attack = TEPGD(model, te, eps=8/255, alpha=2/255, steps=10)
    >>> x_adv = attack(x, y, index=index, epoch=epoch)

    Images go in and come out in pixel space, [0, 1]; ``eps`` is measured there. For a model that
    expects normalized inputs (a loop that calls ``model(normalize(x))``), give ``mean``/``std`` (or
    ``normalize``): the attack normalizes inside its forward passes and the returned ``x_adv`` is
    still in [0, 1]. Inputs outside [0, 1] are refused (they are normalized images, for which eps
    would mean something else), and so is torchattacks' ``set_normalization_used``, which makes an
    attack take and return *normalized* images. A MAIR ``RobModel`` carrying ``mean``/``std``
    buffers gets its normalization applied the same way (torchattacks would expect normalized images).

    ``index`` (the batch's sample positions, a 1-D integer tensor) is required whenever the TE
    penalty is active (``te.weight(epoch) > 0``); without it the attack would silently be plain PGD.
    Without ``epoch`` (or before ``start_epoch``) it is plain PGD. A given ``index`` is checked at
    every epoch, so a wrong one fails at once rather than when the penalty starts.

    BatchNorm and dropout: the attack runs the model in eval mode, as the official ``PGD_TE``
    (``model.eval()`` before its attack) and torchattacks do; Rice et al.'s ``attack_pgd`` runs in train
    mode. ``attack.set_model_training_mode(model_training=True, batchnorm_training=True,
    dropout_training=True)`` attacks in train mode, as Rice et al. (BatchNorm's running statistics
    then also see the adversarial batches). Either way, every submodule's mode is restored after the
    call (also on errors).

    Parameters
    ----------
    model : nn.Module
        The model under attack.
    te : TELoss
        The ``TELoss`` whose penalty joins the inner loss.
    eps : float
        Radius of the threat model in pixel space (Linf or L2).
    alpha : float
        Step size. FGSM with a random start (Wong et al.; Rice et al.'s ``--attack fgsm``) is
        ``steps=1, alpha=1.25 * eps``.
    steps : int
        Number of steps.
    random_start : bool
        Start from a uniform point of the eps-ball (L2: a uniform direction and radius), clamped to [0, 1].
    norm : str
        ``"Linf"`` or ``"L2"``.
    restarts : int
        Runs of PGD from independent random starts; each sample keeps the run with the largest
        ``CE + TE penalty`` (per sample, the quantity the attack maximizes; ties go to the later
        run, as Rice et al.'s ``attack_pgd`` with ``--restarts``).
    mean : sequence or Tensor, optional
        Per-channel mean of a model that expects ``(x - mean) / std``; with ``std``.
    std : sequence or Tensor, optional
        Per-channel standard deviation, with ``mean``.
    normalize : callable, optional
        Any input transform the model expects, instead of ``mean``/``std``.
    """

    def __init__(self, model, te: TELoss, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True, norm="Linf", *,
                 restarts: int = 1, mean=None, std=None, normalize=None):
        if not isinstance(te, TELoss):
            raise TypeError(f"te must be a TELoss, got {type(te).__name__}")
        self.input_transform = make_normalizer(normalize, mean, std)  # before torchattacks' __init__ (below)
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm)
        self.te = te
        self.restarts = _positive_int("restarts", restarts)

    # ------------------------------------------------------------------ normalization
    def _set_rmodel_normalization_used(self, model):
        # torchattacks calls this for a MAIR RobModel carrying mean/std buffers (a model that expects
        # normalized inputs) and would then take normalized images. TEPGD keeps images in [0, 1] and
        # applies the RobModel's normalization inside its forward passes, unless given its own.
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        if mean is None or std is None or self.input_transform is not None:
            return
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if bool((mean != 0).any()) or bool((std != 1).any()):
            self.input_transform = make_normalizer(mean=mean, std=std)

    def set_normalization_used(self, mean, std):
        raise TypeError("TEPGD takes and returns images in [0, 1]; torchattacks' set_normalization_used would make it "
                        "take normalized images. Pass TEPGD(..., mean=..., std=...) instead: the attack then "
                        "normalizes inside its forward passes.")

    def get_logits(self, inputs, labels=None, *args, **kwargs):
        if self.input_transform is not None:
            inputs = self.input_transform(inputs)
        return self.model(inputs)

    def _check_pixel_range(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got "
                            f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
        if self.te.validate and images.numel():
            low, high = float(images.min()), float(images.max())
            if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"TEPGD takes images in [0, 1] (pixel space; eps={self.eps:g} is measured there), got "
                                 f"values in [{low:.3g}, {high:.3g}]: these look normalized. Pass the [0, 1] batch "
                                 f"and give TEPGD(..., mean=..., std=...) for a model that expects normalized inputs.")

    # ------------------------------------------------------------------ the attack
    def __call__(self, images, labels=None, *args, **kwargs):
        # torchattacks' own restore only calls model.train() when the model was training: it leaves a
        # model attacked with set_model_training_mode(model_training=True) from eval mode in train
        # mode, and does not restore submodules' own modes. Restore every one of them.
        with preserved_modes(self.model):
            return super().__call__(images, labels, *args, **kwargs)

    def forward(self, images, labels, index=None, epoch=None, penalty=None):
        """``x_adv`` for the batch; ``index`` and ``epoch`` switch the TE penalty on (see the class).

        Parameters
        ----------
        images : Tensor
            The clean batch in [0, 1].
        labels : Tensor
            Its labels.
        index : Tensor, optional
            The batch's positions in the training set; required once the penalty is active.
        epoch : int, optional
            The current epoch, counted from ``te.epoch_origin``; None: plain PGD.
        penalty : callable, optional
            A ready-made ``penalty(logits)`` instead of the TE penalty (``index``/``epoch`` then unused).
        """
        self._check_pixel_range(images)
        if penalty is None:
            if index is not None:
                check_index(index, images.shape[0], self.te.num_samples, check_range=self.te.validate)
            if epoch is not None:
                self.te._check_epoch(epoch)
                if self.te.weight(epoch) > 0:
                    if index is None:
                        raise ValueError(f"TEPGD needs index= (the batch's sample positions) at epoch {epoch}: "
                                         f"the TE penalty is active from epoch {self.te.start_epoch} on")
                    penalty = self.te.attack_penalty(index.to(self.device), epoch, reduction="mean")
        if self.restarts == 1:
            return super().forward(images, labels, penalty=penalty)
        labels = labels.clone().detach().to(self.device)
        best, best_objective = None, None
        for _ in range(self.restarts):
            adv = super().forward(images, labels, penalty=penalty)
            with torch.no_grad():
                logits = self.get_logits(adv)
                objective = F.cross_entropy(logits, labels, reduction="none")
                if isinstance(penalty, TEPenalty):
                    objective = objective + penalty(logits, reduction="none")
                # An arbitrary penalty callable has no per-sample form: restarts are ranked by CE alone.
            if best is None:
                best, best_objective = adv, objective
            else:
                better = objective >= best_objective
                best = torch.where(better.view(-1, *([1] * (adv.dim() - 1))), adv, best)
                best_objective = torch.maximum(objective, best_objective)
        return best
