"""Where TE starts and where its weight peaks, for a run of a given length and learning-rate schedule.

The paper's run (official ``train_te.py``) trains 200 epochs with ``MultiStepLR(milestones=[100, 150])``
and places TE at epochs 90 and 150 (counted from 1): the ensemble and penalty start 10 epochs (5% of
the run) before the first decay, and the weight reaches its maximum at the last epoch before the
second decay. Its cosine runs keep 90 and 150, i.e. 45% and 75% of the run. ``te_schedule`` applies
these relations to other schedules; docs/drop_in.md has a table for common codebases.
"""

from __future__ import annotations

import math
import numbers
import operator

LR_SCHEDULES = ("multistep", "step", "cosine", "one-cycle")

# The paper's relations: start 5% of the run before the first decay; the weight peaks at the second
# decay, or 25% of the run after the first one where there is no second; 45% / 75% of an annealing phase.
LEAD_FRACTION, SINGLE_DECAY_RAMP_FRACTION = 0.05, 0.25
START_FRACTION, END_FRACTION = 0.45, 0.75


def round_half_up(value: float) -> int:
    """``floor(value + 0.5)``: 4.5 -> 5, unlike Python's ``round`` (half to even, 4.5 -> 4)."""
    return math.floor(value + 0.5)


def _epochs(value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"epochs must be an int, got a bool ({value})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"epochs must be an int, got {type(value).__name__} {value!r}") from None
    if value < 2:
        raise ValueError(f"epochs must be >= 2 (TE needs a start and a later peak), got {value}")
    return value


def _milestones(milestones, epochs: int) -> list[int]:
    if milestones is None or isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
        raise TypeError(f"milestones must be a list of ints (MultiStepLR's), got {milestones!r}")
    values = []
    for value in milestones:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"milestones must be ints (epochs trained before each decay), got {value!r}")
        values.append(int(value))
    if not values or values != sorted(set(values)) or values[0] < 1:
        raise ValueError(f"milestones must be increasing positive ints, got {list(milestones)}")
    in_run = [m for m in values if m < epochs]
    if not in_run:
        raise ValueError(f"no milestone falls inside the {epochs}-epoch run (milestones {values}): the learning rate "
                         f"never decays; use lr_schedule='cosine' (45% / 75%) or give start and end yourself")
    return in_run


def te_schedule(epochs: int, *, epoch_origin: int, lr_schedule: str, milestones=None, step_size=None, peak=None
                ) -> tuple[int, int]:
    """``(start_epoch, end_epoch)`` for ``TELoss``, placed relative to the run's learning-rate decays.

    Computed as epochs counted from 1 (the k-th epoch of the run) and returned in your counting
    (one less for ``epoch_origin=0``). Fractions are rounded half up (``floor(x + 0.5)``).

    - ``"multistep"``: ``milestones`` as given to ``torch.optim.lr_scheduler.MultiStepLR`` stepped
      once per epoch, i.e. the number of epochs trained before each decay (the paper: ``[100, 150]``;
      TRADES' ``if epoch >= 75`` in a loop from 1: ``[74]``; milestones at or after the last epoch
      are ignored). TE starts 5% of the run before the first decay (``m1 - round(0.05 * epochs)``,
      at least epoch 1) and its weight peaks at ``m2``, the last epoch before the second decay; with
      a single decay, at ``min(epochs, m1 + round(0.25 * epochs))``. The paper: 90 and 150.
    - ``"step"``: ``StepLR(step_size=s)``, i.e. milestones ``s, 2s, ...``.
    - ``"cosine"``: ``CosineAnnealingLR`` over the run: 45% and 75% of the run, as the official
      code's cosine runs (90 and 150 of 200).
    - ``"one-cycle"``: the learning rate rises until ``peak`` epochs have passed (may be
      fractional: fast_adversarial's ``CyclicLR`` peaks at ``epochs / 2``) and then anneals: TE at
      45% and 75% of the annealing part, ``peak + 0.45 * (epochs - peak)`` and ``peak + 0.75 * (epochs - peak)``.

    The end is always at least one epoch after the start.

    Parameters
    ----------
    epochs : int
        Length of the run in epochs (>= 2).
    epoch_origin : int
        The number of your first epoch, 0 or 1.
    lr_schedule : str
        ``"multistep"``, ``"step"``, ``"cosine"`` or ``"one-cycle"``.
    milestones : list of int, optional
        ``"multistep"``: epochs trained before each decay (MultiStepLR's milestones).
    step_size : int, optional
        ``"step"``: StepLR's period in epochs.
    peak : float, optional
        ``"one-cycle"``: epochs until the learning rate peaks.
    """
    epochs = _epochs(epochs)
    if isinstance(epoch_origin, bool) or epoch_origin not in (0, 1):
        raise ValueError(f"epoch_origin must be 0 or 1 (the number of your first epoch), got {epoch_origin!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {lr_schedule!r}")
    given = {"milestones": milestones, "step_size": step_size, "peak": peak}
    needed = {"multistep": "milestones", "step": "step_size", "one-cycle": "peak", "cosine": None}[lr_schedule]
    for name, value in given.items():
        if name != needed and value is not None:
            raise TypeError(f"lr_schedule={lr_schedule!r} takes no {name}=")
    if needed is not None and given[needed] is None:
        raise TypeError(f"lr_schedule={lr_schedule!r} needs {needed}=")

    if lr_schedule == "step":
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"step_size must be a positive int (StepLR's), got {step_size!r}")
        milestones = list(range(int(step_size), epochs, int(step_size))) or [int(step_size)]
    if lr_schedule in ("multistep", "step"):
        decays = _milestones(milestones, epochs)
        start = max(1, decays[0] - round_half_up(LEAD_FRACTION * epochs))
        single_decay_end = min(epochs, decays[0] + round_half_up(SINGLE_DECAY_RAMP_FRACTION * epochs))
        end = decays[1] if len(decays) > 1 else single_decay_end
    else:
        origin = 0.0
        if lr_schedule == "one-cycle":
            if isinstance(peak, bool) or not isinstance(peak, numbers.Real) or not 0 <= peak < epochs:
                raise ValueError(f"peak must be a number of epochs in [0, {epochs}), got {peak!r}")
            origin = float(peak)
        start = max(1, round_half_up(origin + START_FRACTION * (epochs - origin)))
        end = round_half_up(origin + END_FRACTION * (epochs - origin))
    end = max(end, start + 1)
    shift = epoch_origin - 1
    return start + shift, end + shift


def default_schedule(epochs: int) -> tuple[int, int]:
    """``at-mem train``'s and ``TELoss.for_run``'s default, counted from 1: the paper's 90 and 150 for
    200 epochs, else ``round(0.45 * epochs)`` and ``round(0.75 * epochs)`` with Python's ``round``
    (halves to even: 10 epochs start at 4; kept so that recorded runs keep their schedule)."""
    if epochs == 200:
        return 90, 150
    start = max(1, round(START_FRACTION * epochs))
    return start, max(round(END_FRACTION * epochs), start + 1)
