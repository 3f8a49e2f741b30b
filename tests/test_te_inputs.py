"""The drop-in TE API (``TELoss``, ``TEPGD``) refuses bad inputs with one-line errors instead of
silently doing something else (or failing with an AttributeError deep inside)."""

from __future__ import annotations

import pytest
import torch

from at_memorization import TELoss, TEPGD


def _one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def _attack(te: TELoss, batch: int = 4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, te.num_classes)).eval()
    x, y = torch.rand(batch, 3, 4, 4), torch.arange(batch) % te.num_classes
    return TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=2), x, y


def test_tepgd_without_index_refuses_once_the_penalty_is_active():
    te = TELoss(8, 3, start_epoch=2, end_epoch=4)
    attack, x, y = _attack(te)
    assert attack(x, y, epoch=1).shape == x.shape  # before start_epoch: plain PGD, no index needed
    with pytest.raises(ValueError, match="index") as info:
        attack(x, y, epoch=3)  # the penalty is on: without index it would silently be dropped
    assert "epoch 2" in _one_line(info)


@pytest.mark.parametrize("num_samples, num_classes, bad", [
    (10, 10.5, "num_classes"), (10, 10.0, "num_classes"), (10.0, 3, "num_samples"), (10.5, 3, "num_samples"),
    (True, 3, "num_samples"), (10, "10", "num_classes"), (None, 3, "num_samples"),
])
def test_teloss_sizes_must_be_ints(num_samples, num_classes, bad):
    with pytest.raises(TypeError, match=f"{bad} must be an int") as info:
        TELoss(num_samples, num_classes)
    _one_line(info)
    # Integer-like sizes (numpy ints, 0-d integer tensors) still work, as plain ints.
    import numpy as np

    te = TELoss(np.int64(5), torch.tensor(3), start_epoch=1, end_epoch=2)
    assert (te.num_samples, te.num_classes) == (5, 3) and te.ensemble.shape == (5, 3)
    assert type(te.num_samples) is int and type(te.num_classes) is int


@pytest.mark.parametrize("index", [[0, 1], (0, 1), None], ids=["list", "tuple", "none"])
def test_index_that_is_not_a_tensor(index):
    te = TELoss(6, 3, start_epoch=1, end_epoch=2)
    logits = torch.randn(2, 3)
    for call in (lambda: te.update(logits, index, 1), lambda: te(logits, index, 2)):
        with pytest.raises(TypeError, match="index must be a 1-D integer tensor") as info:
            call()
        assert type(index).__name__ in _one_line(info)
    attack, x, y = _attack(te, batch=2)
    if index is not None:  # index=None is TEPGD's "no index", tested above
        with pytest.raises(TypeError, match="index must be a 1-D integer tensor"):
            attack(x, y, index=index, epoch=2)


@pytest.mark.parametrize("index, error, words", [
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "integer tensor, got torch.float32"),
    (torch.tensor([0, 1, 2, 8]), IndexError, "out of range [0, 8)"),
    (torch.tensor([-1, 1, 2, 3]), IndexError, "out of range [0, 8)"),
    (torch.tensor([0, 1, 2]), ValueError, "shape (4,)"),
    (torch.tensor([[0, 1, 2, 3]]), ValueError, "shape (4,)"),
], ids=["float", "too-large", "negative", "too-short", "2-d"])
def test_tepgd_checks_index_at_every_epoch(index, error, words):
    """Before the penalty starts the index is unused; a bad one still fails at once, not at start_epoch."""
    te = TELoss(8, 3, start_epoch=2, end_epoch=4)
    attack, x, y = _attack(te)
    for epoch in (1, 3):  # before start_epoch, and with the penalty on
        with pytest.raises(error) as info:
            attack(x, y, index=index, epoch=epoch)
        assert words in _one_line(info)


def test_teloss_refuses_a_complex_index():
    te = TELoss(6, 3, start_epoch=1, end_epoch=2)
    with pytest.raises(TypeError, match="integer tensor, got torch.complex64") as info:
        te.update(torch.randn(2, 3), torch.tensor([0j, 1j]), 1)
    _one_line(info)


def test_tepgd_takes_a_teloss():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="te must be a TELoss"):
        TEPGD(model, torch.nn.MSELoss())
