"""``TELoss``: temporal ensembling of the model's own predictions as a soft target (Dong et al. 2022).

For every training sample the loss keeps an exponential moving average of the model's clean
softmax predictions. From ``start_epoch`` on, a penalty pulls the model's predictions towards that
ensemble, with a weight that ramps up (Laine & Aila's sigmoid-shaped ramp) until ``end_epoch``::

    E[i]  <- m * E[i] + (1 - m) * softmax(f(x_i))          (each step, no gradient)
    p_i    = E[i] / sum(E[i])
    penalty = w(epoch) * mean over batch and classes of (softmax(logits_i) - p_i) ** 2
    w(e)   = reg_weight * ramp(e);  ramp(e) = 0 if e < start, 1 if e > end,
             exp(-5 * (1 - (e - start) / (end - start)) ** 2) otherwise        (epochs from 1)

Under torch.distributed each ``update`` all-gathers the batch's indices and probabilities, so every
rank applies the same update and holds the same ensemble.

A foreign training loop needs three calls (docs/drop_in.md): ``TELoss.for_run`` (the schedule scaled
to the run, in the loop's own epoch counting), ``te.update_from(model, x, index, epoch)`` once per
step (eval mode, no gradient, the model's modes restored, a repeated update of the same batch in
the same step refused), and ``te.attack_penalty(index, epoch)`` / ``te(logits, index, epoch)`` in
the attack's inner loss and in the training loss. ``te_schedule`` places the schedule relative to
the run's learning-rate decays, and ``trades_attack_loss`` is the attack loss of a TRADES loop.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from at_memorization.methods.base import MethodError
from at_memorization.user_errors import UserError

from .schedule import default_schedule, te_schedule


class TEStateError(MethodError):
    """A saved TE state does not fit this ``TELoss`` (a ``ValueError``; the CLI prints it as one line)."""


def _positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool ({value})")
    try:
        value = operator.index(value)  # ints, numpy ints, 0-d integer tensors; not 10.5 nor "10"
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index(index, batch_size: int | None, num_samples: int, check_range: bool = True,
                allow_duplicates: bool = False) -> None:
    """Raise a one-line error unless ``index`` is a 1-D integer tensor of ``batch_size`` values in [0, num_samples).

    ``batch_size=None`` accepts any length. ``check_range`` reads the index back to the host (a
    synchronization on CUDA) and, unless ``allow_duplicates``, refuses a value repeated within the
    batch: a shuffled or sequential loader never repeats a sample in a batch, the labels do.
    """
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a 1-D integer tensor (the batch's sample positions), got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got {index.dtype}")
    if batch_size is None and index.dim() != 1:
        raise ValueError(f"index must be a 1-D tensor (one position per sample), got shape {tuple(index.shape)}")
    if batch_size is not None and (index.dim() != 1 or index.shape[0] != batch_size):
        raise ValueError(f"index must have shape ({batch_size},) to match the batch, got {tuple(index.shape)}")
    if check_range and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_samples:
            raise IndexError(f"sample index out of range [0, {num_samples}): min {low}, max {high}")
        if not allow_duplicates and index.numel() > 1:
            ordered = torch.sort(index.detach().reshape(-1)).values
            repeated = ordered[1:][ordered[1:] == ordered[:-1]]
            if repeated.numel():
                raise ValueError(f"index repeats sample {int(repeated[0])} within the batch: it must hold each "
                                 f"sample's position in the training set (WithIndex's third item), not e.g. the "
                                 f"labels; a sampler drawing with replacement needs "
                                 f"TELoss(..., allow_duplicate_indices=True)")


REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def te_penalty(logits: torch.Tensor, target: torch.Tensor, weight: float, reduction: str = "mean") -> torch.Tensor:
    """The TE penalty ``weight * mean((softmax(logits) - target)**2)``.

    The one statement of its formula, used by ``TELoss``, the attacks' inner loss and the methods'
    training loss.

    Parameters
    ----------
    logits : Tensor
        ``(batch, classes)`` logits (any float dtype; the softmax is taken in fp32).
    target : Tensor
        ``(batch, classes)`` soft targets, rows summing to 1 (``TELoss.target``).
    weight : float
        The epoch's weight ``w(e)`` (``TELoss.weight``).
    reduction : str
        ``"mean"`` (default): mean over the batch *and* the classes, the official code's value.
        ``"none"``: one value per sample, ``weight * mean over classes``, shape ``(batch,)``; its
        mean over the batch is the ``"mean"`` value. ``"sum"``: the sum of the per-sample values.
    """
    squared = (F.softmax(logits.float(), dim=1) - target).pow(2)
    reduction = _check_reduction(reduction)
    if reduction == "mean":
        return weight * squared.mean()
    per_sample = weight * squared.mean(dim=1)
    return per_sample if reduction == "none" else per_sample.sum()


def ramp(epoch: int, start_epoch: int, end_epoch: int) -> float:
    """0 before ``start_epoch``, 1 after ``end_epoch``, a sigmoid-shaped rise in between.

    Written operation for operation as the official ``sigmoid_rampup`` (memorization-AT
    ``train_te.py``): ``-5.0 * phase * phase`` rounds differently from ``-5.0 * phase ** 2``.
    """
    if epoch < start_epoch:
        return 0.0
    if epoch > end_epoch:
        return 1.0
    phase = 1.0 - (epoch - start_epoch) / (end_epoch - start_epoch)
    return math.exp(-5.0 * phase * phase)


class TERepeatedUpdateWarning(UserWarning):
    """``TELoss.update_from`` was called again for samples it already updated in the same step."""


class TERepeatedUpdateError(RuntimeError):
    """``TELoss.update_from`` with ``on_repeat="error"`` refused a second update in the same step."""


class TEScheduleWarning(UserWarning):
    """``TELoss`` was built without a schedule: the paper's, which only fits a 200-epoch run."""


class TEDeviceError(UserError, RuntimeError):
    """The ``TELoss`` was sent to a device this machine does not have."""


# Inputs this far outside [0, 1] are already normalized (CIFAR-10's normalized pixels span [-2.0, 2.1]);
# augmentation noise stays well within it.
NORMALIZED_MARGIN = 0.5
NEVER_UPDATED = -1  # the epoch recorded for an ensemble row no update has reached (epochs are >= 0)


ON_REPEAT = ("warn", "ignore", "error")

# The paper's schedule, in epochs counted from 1 (official train_te.py: --start-es 90 --end-es 150).
PAPER_START_EPOCH, PAPER_END_EPOCH = 90, 150


@contextlib.contextmanager
def preserved_modes(model: nn.Module):
    """Inside the block the model may change modes freely; after it (also on errors) every
    submodule's ``training`` flag is what it was before, e.g. a BatchNorm frozen in eval mode
    inside a model in train mode stays frozen."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def make_normalizer(normalize=None, mean=None, std=None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The input transform a model expects, from ``normalize`` (a callable) or ``mean``/``std``
    (per-channel sequences or tensors: ``(x - mean) / std`` over dimension 1); None for neither."""
    if normalize is not None:
        if mean is not None or std is not None:
            raise ValueError("give either normalize= or mean=/std=, not both")
        if not callable(normalize):
            raise TypeError(f"normalize must be a callable (a function of the input batch), got "
                            f"{type(normalize).__name__}")
        return normalize
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError("mean= and std= go together: give both (per-channel values) or neither")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).detach().clone()
    std_t = torch.as_tensor(std, dtype=torch.float32).detach().clone()
    if mean_t.dim() > 1 and mean_t.shape != std_t.shape:
        raise ValueError(f"mean and std must have the same shape, got {tuple(mean_t.shape)} and {tuple(std_t.shape)}")
    if mean_t.dim() <= 1 and mean_t.numel() != std_t.numel():
        raise ValueError(f"mean and std must have one value per channel each, got {mean_t.numel()} and "
                         f"{std_t.numel()}")
    if not bool((std_t > 0).all()):
        raise ValueError("std must be positive")

    def _normalize(x: torch.Tensor) -> torch.Tensor:
        m, s = mean_t, std_t
        if m.dim() <= 1:  # per-channel values: broadcast over dimension 1 of (N, C, ...)
            channels = m.numel()
            if x.dim() < 2 or (channels != 1 and x.shape[1] != channels):
                raise ValueError(f"mean/std have {channels} channels but the input has shape {tuple(x.shape)}")
            shape = (1, channels) + (1,) * (x.dim() - 2)
            m, s = m.reshape(shape), s.reshape(shape)
        return (x - m.to(x.device, x.dtype)) / s.to(x.device, x.dtype)

    _normalize.mean, _normalize.std = mean_t, std_t
    return _normalize


class TEPenalty:
    """The TE penalty of one batch at one epoch as a function of logits; see ``TELoss.attack_penalty``.

    ``hook(logits)`` returns the penalty with the hook's reduction, ``hook(logits, reduction="none")``
    one value per sample. The soft target is read from the ensemble at the first call after each
    ensemble update, so a hook made before ``update_from`` still uses the updated ensemble.
    """

    def __init__(self, te: "TELoss", index: torch.Tensor, epoch, reduction: str = "mean"):
        self.te, self.index, self.epoch = te, index, epoch
        self.weight = te.weight(epoch)
        self.reduction = _check_reduction(reduction)
        self._target, self._ensemble_version = None, None

    @property
    def active(self) -> bool:
        """False before the penalty starts (it is then exactly 0)."""
        return self.weight > 0.0

    def target(self) -> torch.Tensor:
        if self._ensemble_version != self.te._ensemble_version or self._target is None:
            self._target = self.te._checked_target(self.index, self.epoch)
            self._ensemble_version = self.te._ensemble_version
        return self._target

    def __call__(self, logits: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        reduction = self.reduction if reduction is None else _check_reduction(reduction)
        self.te._check(logits, self.index, check_index_range=False)
        if self.weight == 0.0:
            return _zero_penalty(logits, reduction)
        return te_penalty(logits, self.target().to(logits.device), self.weight, reduction)


def _zero_penalty(logits: torch.Tensor, reduction: str) -> torch.Tensor:
    """An exact 0 (per sample for ``"none"``) that keeps the graph: its gradient is exactly 0."""
    zeros = (logits.float() * 0.0).sum(dim=1)
    return zeros if reduction == "none" else zeros.sum()


def _require_device(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise TEDeviceError("TELoss: this machine has no usable CUDA GPU (torch.cuda.is_available() is False): keep "
                            "the TELoss, the model and the batches on the CPU (te.to('cpu'))")


class TELoss(nn.Module):
    """Temporal-ensembling penalty (Dong et al., ICLR 2022); a drop-in term for any training loop.

    >>> te = TELoss.for_run(len(train_set), num_classes=10, epochs=200, epoch_origin=0)
    >>> te.update_from(model, x, index, epoch)              # once per step: eval mode, no_grad
    >>> penalty = te.attack_penalty(index, epoch)           # in any PGD: loss = ce + penalty(logits)
    >>> loss = F.cross_entropy(logits, y) + te(logits, index, epoch)

    Parameters
    ----------
    num_samples : int
        Size of the training set: indices are in ``[0, num_samples)``.
    num_classes : int
        Number of classes (>= 2).
    momentum : float
        Momentum ``m`` of the per-sample average, in [0, 1) (the paper: 0.9).
    reg_weight : float
        Maximum weight of the penalty (the paper: 300).
    start_epoch : int or None
        First epoch of the ensemble and the penalty, counted as the epochs you pass (see
        ``epoch_origin``). None: the paper's epoch 90 counted from 1, i.e. 89 when
        ``epoch_origin=0``. These defaults are for 200-epoch runs: ``TELoss.for_run`` scales them.
    end_epoch : int or None
        The epoch at which the weight reaches ``reg_weight`` (None: the paper's 150 counted from 1).
    sync_distributed : bool
        Under torch.distributed, all-gather every update so that all ranks hold the same ensemble.
    epoch_origin : int
        The number of your first epoch: 1 (``for epoch in range(1, epochs + 1)``, the official code
        and this package's trainer) or 0 (``for epoch in range(epochs)``, e.g. Rice et al.). Epochs
        before it are refused, which catches a loop counting from 0 with the default origin.
    reduction : str
        Default reduction of the penalty: ``"mean"`` (the paper's, mean over batch and classes),
        ``"sum"`` or ``"none"`` (one value per sample, whose mean is the ``"mean"`` value).
    on_repeat : str
        What ``update_from`` does when called again for the same samples in the same step (e.g. by a
        SAM-style optimizer that evaluates the cost function twice): ``"warn"`` (default: a
        ``TERepeatedUpdateWarning`` and no update), ``"ignore"`` (no update, silently) or
        ``"error"`` (``TERepeatedUpdateError``).
    validate : bool
        Check indices (range, no sample twice in a batch), finite logits, integer epochs that never
        decrease, and that the ensemble rows a penalty uses were updated in the penalty's epoch.
        Costs a host-device synchronization per call on CUDA; a trainer that guarantees all of it
        can pass False (also settable later as the attribute ``te.validate``).
    allow_duplicate_indices : bool
        Accept a sample twice in one batch (a sampler drawing with replacement; each repeat gets the
        first occurrence's update). Off by default: a repeated index is usually the labels passed
        as the index.

    The ensemble is ``te.ensemble``: an fp32 buffer of shape ``(num_samples, num_classes)``, row ``i``
    the running average of sample ``i``'s softmax (the official code's ``soft_labels``; all zeros
    until the sample's first update). ``te.to(device)`` moves it; ``te.state_dict()`` saves it under
    the key ``"ensemble"`` (``"<prefix>.ensemble"`` inside another module), next to ``"_extra_state"``
    with the sizes and schedule.
    """

    def __init__(self, num_samples: int, num_classes: int, momentum: float = 0.9, reg_weight: float = 300.0,
                 start_epoch: int | None = None, end_epoch: int | None = None, sync_distributed: bool = True, *,
                 epoch_origin: int = 1, reduction: str = "mean", on_repeat: str = "warn", validate: bool = True,
                 allow_duplicate_indices: bool = False):
        super().__init__()
        num_samples = _positive_int("num_samples", num_samples)
        num_classes = _positive_int("num_classes", num_classes, minimum=2)
        if isinstance(epoch_origin, bool) or epoch_origin not in (0, 1):
            raise ValueError(f"epoch_origin must be 0 or 1 (the number of your first epoch), got {epoch_origin!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {reg_weight}")
        shift = epoch_origin - 1  # the paper's epochs count from 1
        schedule_given = start_epoch is not None or end_epoch is not None
        start_epoch = PAPER_START_EPOCH + shift if start_epoch is None else start_epoch
        end_epoch = PAPER_END_EPOCH + shift if end_epoch is None else end_epoch
        if not epoch_origin <= start_epoch < end_epoch:
            raise ValueError(f"need {epoch_origin} <= start_epoch < end_epoch (epochs counted from {epoch_origin}), "
                             f"got start {start_epoch}, end {end_epoch}")
        if on_repeat not in ON_REPEAT:
            raise ValueError(f"on_repeat must be 'warn', 'ignore' or 'error', got {on_repeat!r}")
        self.num_samples, self.num_classes = int(num_samples), int(num_classes)
        self.momentum, self.reg_weight = float(momentum), float(reg_weight)
        self.start_epoch, self.end_epoch = int(start_epoch), int(end_epoch)
        self.epoch_origin = int(epoch_origin)
        self.reduction = _check_reduction(reduction)
        self.on_repeat = on_repeat
        self.sync_distributed = sync_distributed
        self.validate = bool(validate)
        self.allow_duplicate_indices = bool(allow_duplicate_indices)
        # Set by a trainer whose ranks always step with equal batch sizes (as DistributedSampler
        # gives): the all-gather then needs no size exchange, so no host-device synchronization.
        self.equal_rank_batches = False
        # fp32 whatever the autocast context: tiny EMA increments would vanish in bf16.
        self.register_buffer("ensemble", torch.zeros(self.num_samples, self.num_classes, dtype=torch.float32))
        self._ensemble_version = 0  # bumped at every change of the ensemble (penalty hooks re-read their target)
        # The epoch of each row's last update: a penalty for rows not updated in its epoch uses a stale
        # ensemble. Not saved (a loaded ensemble is updated again before its next penalty).
        self.register_buffer("_updated_at", torch.full((self.num_samples,), NEVER_UPDATED, dtype=torch.int64),
                             persistent=False)
        self._forget_steps()
        if not schedule_given:  # TELoss cannot know the run's length: say what the default assumes
            warnings.warn(f"TELoss without a schedule uses the paper's 200-epoch one (TE from epoch "
                          f"{PAPER_START_EPOCH}, full weight at {PAPER_END_EPOCH}, counted from 1): a shorter run "
                          f"never switches TE on; use TELoss.for_run(..., epochs=E, epoch_origin=0 or 1) or give "
                          f"start_epoch/end_epoch", TEScheduleWarning, stacklevel=2)

    def _forget_steps(self) -> None:
        """Reset what ties calls to steps and epochs (after a device move or a loaded state)."""
        # update_from's guard against a second update of the same samples in one step.
        self._last_update = None  # (epoch, sorted indices, entry point) of the last update
        self._step_key, self._step_seen = None, None  # (epoch, step) and the samples updated in that step
        self._latest_epoch = None  # the largest epoch seen: epochs never go back within a run

    @classmethod
    def for_run(cls, num_samples: int, num_classes: int, epochs: int, *, epoch_origin: int, momentum: float = 0.9,
                reg_weight: float = 300.0, lr_schedule: str | None = None, milestones=None, step_size=None,
                peak=None, **kwargs) -> "TELoss":
        """A ``TELoss`` whose schedule is scaled to a run of ``epochs`` epochs, in your epoch counting.

        Without ``lr_schedule`` the penalty starts at 45% of the run and its weight peaks at 75%: the
        paper's epochs 90 and 150 of 200 (exactly those for 200 epochs), the same rule as ``at-mem
        train``'s defaults, rounded with Python's ``round`` (halves to even: 10 epochs start at 4).
        With ``lr_schedule`` they are placed relative to the learning-rate decays (``te_schedule``:
        5% of the run before the first decay, full weight at the second). With ``epoch_origin=0``
        both are one less, so a loop passes its own epoch counter unchanged::

            te = TELoss.for_run(len(train_set), 10, epochs=200, epoch_origin=0)   # start 89, end 149
            for epoch in range(200):            # Rice et al.'s loop; no ``epoch + 1`` anywhere
                ...
            te = TELoss.for_run(len(train_set), 10, epochs=76, epoch_origin=1,    # TRADES: lr / 10 from
                                lr_schedule="multistep", milestones=[74])         # epoch 75: start 70, end 76

        Parameters
        ----------
        num_samples : int
            Size of the training set.
        num_classes : int
            Number of classes.
        epochs : int
            Length of the run in epochs.
        epoch_origin : int
            The number of your first epoch, 0 or 1; required, so that it is stated once.
        momentum : float
            Momentum of the per-sample average (the paper: 0.9).
        reg_weight : float
            Maximum weight of the penalty (the paper: 300).
        lr_schedule : str, optional
            ``"multistep"``, ``"step"``, ``"cosine"`` or ``"one-cycle"``: place TE relative to the
            run's learning-rate decays (``te_schedule``). None: 45% and 75% of the run.
        milestones : list of int, optional
            With ``"multistep"``: MultiStepLR's milestones (epochs trained before each decay).
        step_size : int, optional
            With ``"step"``: StepLR's period in epochs.
        peak : float, optional
            With ``"one-cycle"``: epochs until the learning rate peaks.
        **kwargs
            Any other ``TELoss`` keyword (``reduction``, ``on_repeat``, ``validate``,
            ``sync_distributed``, ``allow_duplicate_indices``); not ``start_epoch``/``end_epoch``,
            which this derives.
        """

        epochs = _positive_int("epochs", epochs)
        if isinstance(epoch_origin, bool) or epoch_origin not in (0, 1):
            raise ValueError(f"epoch_origin must be 0 or 1 (the number of your first epoch), got {epoch_origin!r}")
        for name in ("start_epoch", "end_epoch"):
            if name in kwargs:
                raise TypeError(f"TELoss.for_run derives {name} from epochs; use TELoss(...) to give it yourself")
        shift = epoch_origin - 1
        if lr_schedule is None:
            for name, value in (("milestones", milestones), ("step_size", step_size), ("peak", peak)):
                if value is not None:
                    raise TypeError(f"TELoss.for_run: {name}= needs lr_schedule= (e.g. lr_schedule='multistep')")
            start, end = (value + shift for value in default_schedule(epochs))  # counted from 1, shifted
        else:
            start, end = te_schedule(epochs, epoch_origin=epoch_origin, lr_schedule=lr_schedule,
                                     milestones=milestones, step_size=step_size, peak=peak)
        return cls(num_samples, num_classes, momentum=momentum, reg_weight=reg_weight, start_epoch=start,
                   end_epoch=end, epoch_origin=epoch_origin, **kwargs)

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, num_classes={self.num_classes}, momentum={self.momentum}, "
                f"reg_weight={self.reg_weight}, start_epoch={self.start_epoch}, end_epoch={self.end_epoch}, "
                f"epoch_origin={self.epoch_origin}, reduction={self.reduction!r}")

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]  # how nn.Module.to reads its arguments
        _require_device(device)
        return super().to(*args, **kwargs)

    def cuda(self, device=None):
        _require_device(torch.device("cuda"))
        return super().cuda(device)

    def _apply(self, fn, recurse=True):
        # Moving to a device is fine; casting the ensemble to a low precision is not.
        super()._apply(fn, recurse)
        if self.ensemble.dtype != torch.float32:
            self.ensemble = self.ensemble.float()
        self._ensemble_version += 1
        self._forget_steps()
        return self

    def get_extra_state(self) -> dict:
        return {"num_samples": self.num_samples, "num_classes": self.num_classes, "momentum": self.momentum,
                "reg_weight": self.reg_weight, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                "epoch_origin": self.epoch_origin}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, Mapping) or not {"num_samples", "num_classes"} <= state.keys():
            raise TEStateError("TE state is malformed: its settings lack num_samples and num_classes")
        if (state["num_samples"], state["num_classes"]) != (self.num_samples, self.num_classes):
            raise TEStateError(f"TE state is for {state['num_samples']} samples x {state['num_classes']} classes, "
                               f"this TELoss has {self.num_samples} x {self.num_classes}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checked here rather than in load_state_dict so that a TELoss inside another module gets
        # the same one-line errors (torch's own are multi-line RuntimeErrors).
        key = prefix + "ensemble"
        if key not in state_dict:
            if strict:
                raise TEStateError(f"TE state has no {key!r} (the per-sample ensemble)")
        else:
            ensemble = state_dict[key]
            expected = (self.num_samples, self.num_classes)
            if not isinstance(ensemble, torch.Tensor):
                raise TEStateError(f"TE state: {key} is a {type(ensemble).__name__}, not a tensor")
            if tuple(ensemble.shape) != expected:
                raise TEStateError(f"TE state: the ensemble has shape {list(ensemble.shape)}, this TELoss expects "
                                   f"{list(expected)} ({self.num_samples} samples x {self.num_classes} classes)")
            if not ensemble.is_floating_point():
                raise TEStateError(f"TE state: the ensemble is {ensemble.dtype}, not floating point")
            if not bool(torch.isfinite(ensemble).all()):
                raise TEStateError("TE state: the ensemble contains NaN or inf")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._ensemble_version += 1
        self._updated_at.fill_(NEVER_UPDATED)
        self._forget_steps()

    # ------------------------------------------------------------------ schedule
    def active(self, epoch: int) -> bool:
        """Whether the ensemble is updated at ``epoch`` (``epoch >= start_epoch``)."""
        return epoch >= self.start_epoch

    def weight(self, epoch: int) -> float:
        """``reg_weight * ramp(epoch)``: 0 before ``start_epoch``, ``reg_weight`` after ``end_epoch``."""
        return self.reg_weight * ramp(epoch, self.start_epoch, self.end_epoch)

    # ------------------------------------------------------------------ checks
    def _check_epoch(self, epoch) -> int:
        """``epoch`` as an int, refused unless a whole number >= ``epoch_origin`` (and, with
        ``validate``, not below an epoch already seen)."""
        if isinstance(epoch, bool) or not (isinstance(epoch, numbers.Real) or (
                isinstance(epoch, torch.Tensor) and epoch.dim() == 0)):
            raise TypeError(f"epoch must be a number (your loop's epoch counter), got {type(epoch).__name__}")
        if isinstance(epoch, torch.Tensor):
            epoch = epoch.item()
        if epoch < self.epoch_origin:
            hint = (" A loop that counts epochs from 0 needs epoch_origin=0 (TELoss.for_run(..., epoch_origin=0))."
                    if self.epoch_origin == 1 else "")
            raise ValueError(f"epoch {epoch} is before the first epoch: this TELoss counts epochs from "
                             f"{self.epoch_origin}.{hint}")
        if not float(epoch).is_integer():
            raise ValueError(f"epoch must be a whole number (your loop's epoch counter), got {epoch}: the ensemble "
                             f"and the schedule advance once per epoch; pass int(epoch), not a fraction of the run")
        epoch = int(epoch)
        if self.validate:
            if self._latest_epoch is not None and epoch < self._latest_epoch:
                raise ValueError(f"epoch {epoch} comes after epoch {self._latest_epoch}: epochs never go back within a "
                                 f"run; pass your loop's epoch counter (a new run needs a new TELoss)")
            self._latest_epoch = epoch
        return epoch

    def _check(self, logits: torch.Tensor, index: torch.Tensor, check_index_range: bool = True) -> None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a tensor of shape (batch, {self.num_classes}), got {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (batch, {self.num_classes}), got {tuple(logits.shape)}")
        check_index(index, logits.shape[0], self.num_samples, check_range=self.validate and check_index_range,
                    allow_duplicates=self.allow_duplicate_indices)
        if self.validate and logits.numel() and not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or inf")

    # ------------------------------------------------------------------ the ensemble update
    @torch.no_grad()
    def update(self, clean_logits: torch.Tensor, index: torch.Tensor, epoch: int) -> None:
        """``E[index] = m * E[index] + (1 - m) * softmax(clean_logits)``; nothing before start_epoch.

        The low-level update: the caller computes ``clean_logits`` (the official code: the model in
        eval mode, on the clean batch) and calls it once per step. ``update_from`` does all of that;
        an ``update_from`` for the same samples after ``update`` in the same step is a repeat (see
        ``on_repeat``), and so is an ``update`` after ``update_from``.

        Parameters
        ----------
        clean_logits : Tensor
            ``(batch, classes)`` logits of the clean batch.
        index : Tensor
            The batch's positions in the training set (1-D integer tensor).
        epoch : int
            The current epoch, counted from ``epoch_origin``.
        """
        self._check(clean_logits, index)
        epoch = self._check_epoch(epoch)
        if not self.active(epoch):
            return
        key = self._index_key(index)
        if self.validate and self._is_repeat(key, epoch, None, entry="update"):
            self._refuse_repeat(epoch, None, stacklevel=4)
            return
        self._write(clean_logits, index, epoch)
        self._record_update(key, epoch, None, entry="update")

    def _write(self, clean_logits: torch.Tensor, index: torch.Tensor, epoch: int) -> None:
        probs = F.softmax(clean_logits.detach().float(), dim=1)
        index = index.to(self.ensemble.device, torch.int64)
        probs = probs.to(self.ensemble.device)
        if self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            index, probs = _all_gather_rows(index, probs, equal_sizes=self.equal_rank_batches)
        # Repeated indices (DistributedSampler pads with them; a user's sampler may draw them) all
        # get their first row's values, so the write below is deterministic. Cheap: one scatter.
        index, probs = _first_occurrences(index, probs, self.num_samples)
        self.ensemble[index] = self.momentum * self.ensemble[index] + (1.0 - self.momentum) * probs
        self._updated_at[index] = epoch
        self._ensemble_version += 1

    def update_from(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor, epoch: int, *, step=None,
                    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None, mean=None, std=None) -> bool:
        """One step's ensemble update, done as the official code does it; returns whether it updated.

        Runs ``model`` on the clean batch ``x`` in eval mode under ``torch.no_grad()`` and feeds the
        softmax into the ensemble (``update``). Afterwards every submodule of ``model`` is back in the
        mode it had (also when the forward raises): a loop that calls ``model.train()`` once per
        epoch keeps training in train mode. Nothing runs before ``start_epoch`` (returns False).

        A second call for samples already updated in the same step does not update them again
        (``on_repeat``: warn, ignore or raise). The step is ``step`` when given (any value that
        changes every optimizer step, e.g. a global iteration counter; micro-batches of one step with
        different samples are all applied); without it, a call with the same epoch and the same set
        of indices as the previous update is the repeat (a SAM-style optimizer evaluating the cost
        function twice on one batch). A loop that feeds one fixed batch at every step of an epoch
        must pass ``step``. The check compares index sets on the ensemble's device (a host-device
        synchronization per call on CUDA).

        Parameters
        ----------
        model : nn.Module
            The model being trained (a DDP wrapper works too).
        x : Tensor
            The clean (augmented) batch, as your loop holds it.
        index : Tensor
            The batch's positions in the training set (1-D integer tensor; ``WithIndex`` yields it).
        epoch : int
            The current epoch, counted from ``epoch_origin``.
        step : hashable, optional
            Identifies the optimizer step; see above.
        normalize : callable, optional
            Applied to ``x`` before the model, for loops that normalize outside the model
            (``model(normalize(x))``).
        mean : sequence or Tensor, optional
            Per-channel mean: the model gets ``(x - mean) / std``. Give with ``std``, not with ``normalize``.
        std : sequence or Tensor, optional
            Per-channel standard deviation, with ``mean``.
        """
        normalizer = make_normalizer(normalize, mean, std)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor (the clean batch), got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("x must be a batch (its first dimension is the batch), got a 0-d tensor")
        check_index(index, x.shape[0], self.num_samples, check_range=self.validate,
                    allow_duplicates=self.allow_duplicate_indices)
        epoch = self._check_epoch(epoch)
        self._check_images(x, normalizer, mean_std_given=mean is not None)
        if not self.active(epoch):
            return False
        key = self._index_key(index)
        if self._is_repeat(key, epoch, step, entry="update_from"):
            self._refuse_repeat(epoch, step, stacklevel=3)
            return False
        with preserved_modes(model), torch.no_grad():
            model.eval()
            clean_logits = model(normalizer(x) if normalizer is not None else x)
        self._check(clean_logits, index)
        self._write(clean_logits, index, epoch)
        self._record_update(key, epoch, step, entry="update_from")
        return True

    def _check_images(self, x: torch.Tensor, normalizer, mean_std_given: bool) -> None:
        """One-line errors for batches the model would fail on, or silently misread."""
        if x.dtype == torch.uint8:
            raise TypeError("x is uint8 (raw image bytes): give update_from the float batch your model takes, "
                            "e.g. x.float() / 255")
        if normalizer is not None and not x.is_floating_point():
            raise TypeError(f"x must be a float batch to normalize, got {x.dtype}")
        if x.dim() == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3) and x.shape[1] == x.shape[2]:
            raise ValueError(f"x has shape {tuple(x.shape)}, channels last (N, H, W, C); models take (N, C, H, W): "
                             f"pass x.permute(0, 3, 1, 2)")
        pixel_scale_mean = mean_std_given and bool(((normalizer.mean >= 0) & (normalizer.mean <= 1)).all())
        if pixel_scale_mean and self.validate and x.numel():
            low, high = (float(v) for v in torch.aminmax(x.detach().float()))
            if low < -NORMALIZED_MARGIN or high > 1 + NORMALIZED_MARGIN:
                raise ValueError(f"update_from got mean=/std= but x spans [{low:.3g}, {high:.3g}]: it is normalized "
                                 f"already (e.g. transforms.Normalize in the loader) and would be normalized twice; "
                                 f"drop mean=/std=")

    def _index_key(self, index: torch.Tensor) -> torch.Tensor:
        return torch.sort(index.detach().to(self.ensemble.device, torch.int64)).values

    def _is_repeat(self, key: torch.Tensor, epoch: int, step, entry: str) -> bool:
        """Whether an update of the samples ``key`` through ``entry`` ("update" or "update_from")
        repeats one already made in this step: the same samples at the same epoch as the last update
        (``update`` only refuses those made by ``update_from``), or, with ``step``, any of them
        already updated under the same ``(epoch, step)``."""

        def same_as_last(entries) -> bool:
            last = self._last_update
            return (last is not None and last[2] in entries and last[0] == epoch and last[1].shape == key.shape
                    and bool(torch.equal(last[1], key)))

        if entry == "update":
            return same_as_last(("update_from",))
        if step is not None:
            if self._step_key == (epoch, step) and self._step_seen is not None and bool(self._step_seen[key].any()):
                return True
            return same_as_last(("update",))
        return same_as_last(("update", "update_from"))

    def _refuse_repeat(self, epoch: int, step, stacklevel: int) -> None:
        message = (f"TELoss: the samples of this batch were already updated in this step (epoch {epoch}"
                   f"{'' if step is None else f', step {step!r}'}, by update or update_from); the repeated update "
                   f"is ignored, so the ensemble gets one update per step (as the official code). A trainer that "
                   f"evaluates its cost function twice per step (SAM) does this; pass on_repeat='ignore' to TELoss "
                   f"to silence this, or step= to tell steps apart; call only one of update and update_from.")
        if self.on_repeat == "error":
            raise TERepeatedUpdateError(message)
        if self.on_repeat == "warn":
            warnings.warn(message, TERepeatedUpdateWarning, stacklevel=stacklevel)

    def _record_update(self, key: torch.Tensor, epoch: int, step, entry: str) -> None:
        self._last_update = (epoch, key, entry)
        if step is None:
            return
        if self._step_key != (epoch, step) or self._step_seen is None:
            self._step_key = (epoch, step)
            self._step_seen = torch.zeros(self.num_samples, dtype=torch.bool, device=key.device)
        self._step_seen[key] = True

    # ------------------------------------------------------------------ the penalty
    def target(self, index: torch.Tensor) -> torch.Tensor:
        """The ensemble rows normalized to sum 1 (``update`` must have run for them)."""
        rows = self.ensemble[index.to(self.ensemble.device, torch.int64)]
        return rows / rows.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def _checked_target(self, index: torch.Tensor, epoch: int) -> torch.Tensor:
        target = self.target(index)
        if self.validate and index.numel():
            rows = index.to(self.ensemble.device, torch.int64)
            updated_at = self._updated_at[rows]
            oldest = int(updated_at.min())
            if oldest < epoch:
                if oldest == NEVER_UPDATED and not bool((self.ensemble[rows].sum(1) > 0).all()):
                    raise ValueError("the TE penalty needs the ensemble of every sample in the batch, but some were "
                                     "never updated: call te.update_from(model, x, index, epoch) for the batch first, "
                                     "from start_epoch on")
                sample = int(rows[updated_at.argmin()])
                last = "never since the ensemble was loaded" if oldest == NEVER_UPDATED else f"last at epoch {oldest}"
                raise ValueError(f"the TE penalty at epoch {epoch} would use a stale ensemble: sample {sample} was "
                                 f"updated {last}; call te.update_from(model, x, index, epoch) for the batch at every "
                                 f"step, before the attack and the loss")
        return target

    def forward(self, logits: torch.Tensor, index: torch.Tensor, epoch: int, reduction: str | None = None
                ) -> torch.Tensor:
        """``weight(epoch) * mean((softmax(logits) - target)**2)``; exactly 0 before start_epoch.

        Parameters
        ----------
        logits : Tensor
            ``(batch, classes)`` logits the penalty applies to (PGD-AT: the adversarial logits;
            TRADES: the clean ones, as the official code).
        index : Tensor
            The batch's positions in the training set.
        epoch : int
            The current epoch, counted from ``epoch_origin``.
        reduction : str, optional
            ``"mean"``, ``"sum"`` or ``"none"`` (per sample); default: the ``TELoss``'s ``reduction``.
        """
        reduction = self.reduction if reduction is None else _check_reduction(reduction)
        self._check(logits, index)
        epoch = self._check_epoch(epoch)
        w = self.weight(epoch)
        if w == 0.0:
            return _zero_penalty(logits, reduction)
        return te_penalty(logits, self._checked_target(index, epoch).to(logits.device), w, reduction)

    def penalty(self, logits: torch.Tensor, index: torch.Tensor, epoch: int, reduction: str | None = None
                ) -> torch.Tensor:
        """The penalty, as ``te(logits, index, epoch)``: an explicit name for the same call.

        Parameters
        ----------
        logits : Tensor
            ``(batch, classes)`` logits.
        index : Tensor
            The batch's positions in the training set.
        epoch : int
            The current epoch, counted from ``epoch_origin``.
        reduction : str, optional
            ``"mean"``, ``"sum"`` or ``"none"``; default: the ``TELoss``'s ``reduction``.
        """
        return self(logits, index, epoch, reduction)

    def attack_penalty(self, index: torch.Tensor, epoch: int, reduction: str | None = None) -> TEPenalty:
        """The penalty of this batch at this epoch as a function of logits, for any attack's inner loss.

        Add it to the loss your attack maximizes, in one line::

            penalty = te.attack_penalty(index, epoch)
            ...
            loss = F.cross_entropy(output, y) + penalty(output)       # in every attack step

        It is exactly 0 (with a zero gradient) before ``start_epoch``, so the line can stay in the
        attack all run. ``penalty(output, reduction="none")`` gives one value per sample, e.g. to pick
        the best of several restarts by CE + penalty per sample. The soft target is read from the
        ensemble as it is at the first call after the step's ``update_from``.

        Parameters
        ----------
        index : Tensor
            The batch's positions in the training set.
        epoch : int
            The current epoch, counted from ``epoch_origin``.
        reduction : str, optional
            Default reduction of the returned function (default: the ``TELoss``'s ``reduction``).
        """
        reduction = self.reduction if reduction is None else _check_reduction(reduction)
        check_index(index, None, self.num_samples, check_range=self.validate,
                    allow_duplicates=self.allow_duplicate_indices)
        epoch = self._check_epoch(epoch)
        return TEPenalty(self, index, epoch, reduction)


def _first_occurrences(index: torch.Tensor, probs: torch.Tensor, num_samples: int):
    """Give every repeated index (DistributedSampler pads with repeats) the row of its first occurrence.

    Shapes stay fixed and nothing is read back to the host (``torch.unique`` would synchronize
    with the GPU on every step).
    """
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((num_samples,), index.numel(), device=index.device, dtype=positions.dtype)
    first.scatter_reduce_(0, index, positions, reduce="amin")
    return index, probs[first[index]]


def _all_gather_rows(index: torch.Tensor, probs: torch.Tensor, equal_sizes: bool = False):
    """Concatenate every rank's (index, probs) in rank order; batches may differ in size.

    ``equal_sizes``: the caller guarantees the same batch size on every rank, which skips the size
    exchange (a host-device synchronization per call).
    """
    world = dist.get_world_size()
    if equal_sizes:
        all_index = [torch.empty_like(index) for _ in range(world)]
        all_probs = [torch.empty_like(probs) for _ in range(world)]
        dist.all_gather(all_index, index.contiguous())
        dist.all_gather(all_probs, probs.contiguous())
        return torch.cat(all_index), torch.cat(all_probs)
    size = torch.tensor([index.numel()], device=index.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    pad = longest - index.numel()
    padded_index = F.pad(index, (0, pad))
    padded_probs = F.pad(probs, (0, 0, 0, pad))
    all_index = [torch.empty_like(padded_index) for _ in range(world)]
    all_probs = [torch.empty_like(padded_probs) for _ in range(world)]
    dist.all_gather(all_index, padded_index)
    dist.all_gather(all_probs, padded_probs)
    return (torch.cat([t[:n] for t, n in zip(all_index, sizes)]),
            torch.cat([t[:n] for t, n in zip(all_probs, sizes)]))
