"""The learning rate of an epoch: the one place the schedules are computed."""

from __future__ import annotations

import math

from ..settings import RunConfig


def learning_rate(config: RunConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (counted from 1).

    step: ``lr * gamma ** (number of milestones < epoch)``: as the paper's code (``MultiStepLR([100,
    150])`` stepped after each epoch), epochs 1-100 train at 0.1, 101-150 at 0.01, 151-200 at 0.001.
    cosine: ``lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2``.
    """
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    milestones = config.resolve().milestones if config.milestones is None else config.milestones
    return config.lr * config.lr_gamma ** sum(epoch > m for m in milestones)
