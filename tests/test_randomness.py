"""Evaluation must not change a training run's random stream; RNG state survives a checkpoint."""

import random

import numpy as np
import torch

from at_memorization.evaluation import accuracy, autoattack_accuracy
from at_memorization.attacks import pgd20
from at_memorization.randomness import capture_rng, isolated_rng, restore_rng


def _draws():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def _seed_all(seed):
    torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()


def test_capture_and_restore_round_trip_through_a_weights_only_file(tmp_path):
    _seed_all(1)
    torch.randn(5), random.random(), np.random.rand()  # advance every stream
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = _draws()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_apgd_based_evaluation_leaves_the_global_stream_alone():
    model = _model()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    _seed_all(123)
    expected = _draws()
    _seed_all(123)
    # AutoAttack's APGD/FAB/Square call torch.manual_seed internally; PGD draws random starts.
    autoattack_accuracy(model, x, y, eps=8 / 255, device="cpu", batch_size=8)
    accuracy(model, x, y, attack=pgd20(model), batch_size=8)
    assert _draws() == expected


def test_isolated_rng_is_reproducible():
    with isolated_rng(5):
        first = torch.rand(4)
    with isolated_rng(5):
        second = torch.rand(4)
    assert torch.equal(first, second)
