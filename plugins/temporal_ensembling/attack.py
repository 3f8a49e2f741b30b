"""``TEPGD``: torchattacks' PGD whose inner loss adds the TE penalty (PGD-AT+TE's attack)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from at_memorization.attacks import PenalizedPGD, trades_attack_loss

from .loss import TELoss, TEPenalty, _positive_int, check_index, make_normalizer, preserved_modes

__all__ = ["TEPGD", "trades_attack_loss"]  # trades_attack_loss: TRADES' attack loss, shared with the trades methods

# Inputs this far outside [0, 1] are not images in pixel space (normalized ones are, typically, in [-2.5, 2.8]).
_RANGE_TOLERANCE = 1e-6
# The official code's and Rice et al.'s spellings of the threat models, and torchattacks'.
_NORMS = {"linf": "Linf", "l_inf": "Linf", "l2": "L2", "l_2": "L2"}


def _norm(norm) -> str:
    if not isinstance(norm, str) or norm.lower() not in _NORMS:
        raise ValueError(f"norm must be 'Linf' or 'L2' (any case; 'l_inf'/'l_2' too), got {norm!r}")
    return _NORMS[norm.lower()]


def _radius(name: str, value, norm: str):
    """A float, or a per-channel tensor of shape (1, C, 1, 1) in pixel space (Linf only)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return float(value)
    if norm != "Linf":
        raise ValueError(f"a per-channel {name} is for norm='Linf'; the L2 ball has one radius")
    channels = value.numel()
    if tuple(value.shape) not in ((channels,), (channels, 1, 1), (1, channels, 1, 1)):
        raise ValueError(f"a per-channel {name} has shape (C,), (C, 1, 1) or (1, C, 1, 1), got {tuple(value.shape)}")
    value = value.detach().float().reshape(1, -1, 1, 1).clone()
    if not bool((value > 0).all()):
        raise ValueError(f"{name} must be positive, got {value.flatten().tolist()}")
    return value


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
    Without ``epoch`` (and without ``index``), or before ``start_epoch``, it is plain PGD; ``index``
    without ``epoch`` is refused (the penalty would silently be dropped). A given ``index`` is
    checked at every epoch, so a wrong one fails at once rather than when the penalty starts.

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
    eps : float or Tensor
        Radius of the threat model in pixel space (Linf or L2). Linf also takes one radius per
        channel, a tensor of shape ``(C,)``, ``(C, 1, 1)`` or ``(1, C, 1, 1)``; fast_adversarial's
        ``(8 / 255) / std`` is in *normalized* units and refused with ``mean``/``std`` given (pass
        ``8 / 255``).
    alpha : float or Tensor
        Step size, per channel like ``eps``. FGSM with a random start (Wong et al.; Rice et al.'s
        ``--attack fgsm``) is ``steps=1, alpha=1.25 * eps``.
    steps : int
        Number of steps.
    random_start : bool
        Start from a uniform point of the eps-ball (L2: a uniform direction and radius), clamped to [0, 1].
    norm : str
        ``"Linf"`` or ``"L2"``, in any case (the official code's ``"linf"``/``"l2"``; also ``"l_inf"``/``"l_2"``).
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
        norm = _norm(norm)
        eps, alpha = _radius("eps", eps, norm), _radius("alpha", alpha, norm)
        self._refuse_normalized_units(eps, "eps")
        self._refuse_normalized_units(alpha, "alpha")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start, norm=norm)
        self.te = te
        self.restarts = _positive_int("restarts", restarts)

    def _refuse_normalized_units(self, radius, name: str) -> None:
        """fast_adversarial's ``epsilon = (8 / 255) / std`` differs per channel exactly as 1 / std: with
        ``std`` given, such a radius is in normalized units and would be ~4x too large in pixel space."""
        std = getattr(self.input_transform, "std", None)
        if not isinstance(radius, torch.Tensor) or std is None or std.numel() != radius.numel():
            return
        pixel = radius.flatten() * std.flatten()
        if not torch.allclose(radius.flatten(), radius.flatten()[0]) and torch.allclose(pixel, pixel[0], rtol=1e-5):
            raise ValueError(f"{name} = {float(pixel[0]):.6g} / std per channel is in normalized units "
                             f"(fast_adversarial's convention); TEPGD measures it in pixel space: pass "
                             f"{name}={float(pixel[0]):.6g}")

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
                eps = self.eps.flatten().tolist() if isinstance(self.eps, torch.Tensor) else f"{self.eps:g}"
                raise ValueError(f"TEPGD takes images in [0, 1] (pixel space; eps={eps} is measured there), got "
                                 f"values in [{low:.3g}, {high:.3g}]: these look normalized. Pass the [0, 1] batch "
                                 f"and give TEPGD(..., mean=..., std=...) for a model that expects normalized inputs.")

    def _place_radii(self, images: torch.Tensor) -> None:
        """Per-channel radii on the attack's device (the loop's hooks broadcast them over the batch)."""
        for name in ("eps", "alpha"):
            radius = getattr(self, name)
            if not isinstance(radius, torch.Tensor):
                continue
            if images.dim() != 4 or images.shape[1] != radius.shape[1]:
                raise ValueError(f"a per-channel {name} has {radius.shape[1]} channels but the images have shape "
                                 f"{tuple(images.shape)}")
            setattr(self, name, radius.to(self.device, images.dtype))

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
        self._place_radii(images)
        if penalty is None:
            if index is not None:
                check_index(index, images.shape[0], self.te.num_samples, check_range=self.te.validate,
                            allow_duplicates=self.te.allow_duplicate_indices)
                if epoch is None:
                    raise ValueError("TEPGD got index= without epoch=: the TE penalty needs both, so the attack would "
                                     "silently be plain PGD; pass epoch= (your loop's epoch counter) too")
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
