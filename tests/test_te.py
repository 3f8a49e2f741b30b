"""TELoss, TEPGD and the TE methods against straightforward reference computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from at_memorization import TELoss, TEPGD
from at_memorization.methods import TrainingSetup, get_method
from at_memorization.methods.base import MethodError
from at_memorization.plugins.temporal_ensembling import TEScheduleWarning


def reference_ramp(e, start, end):
    if e < start:
        return 0.0
    if e > end:
        return 1.0
    return math.exp(-5 * (1 - (e - start) / (end - start)) ** 2)


@pytest.mark.parametrize("epoch", [1, 89, 90, 91, 100, 120, 149, 150, 151, 200])
def test_weight_follows_the_papers_ramp(epoch):
    with pytest.warns(TEScheduleWarning):  # the paper's schedule fits 200-epoch runs only, and it says so
        te = TELoss(num_samples=4, num_classes=3)  # defaults: 300, start 90, end 150
    assert te.weight(epoch) == pytest.approx(300.0 * reference_ramp(epoch, 90, 150), rel=1e-12)


def test_ramp_shape():
    te = TELoss(4, 3, reg_weight=1.0, start_epoch=10, end_epoch=20)
    weights = [te.weight(e) for e in range(1, 25)]
    assert weights[:9] == [0.0] * 9
    assert weights[9] == pytest.approx(math.exp(-5))  # epoch 10: the start of the ramp
    assert weights[19] == 1.0 and weights[-1] == 1.0  # reaches the maximum at end_epoch
    assert all(a <= b for a, b in zip(weights, weights[1:]))


def test_ema_and_normalization_after_several_updates():
    torch.manual_seed(0)
    n, c, m = 12, 5, 0.7
    te = TELoss(n, c, momentum=m, start_epoch=2, end_epoch=4)
    reference = torch.zeros(n, c)
    batches = [torch.tensor([0, 3, 5]), torch.tensor([3, 7, 11, 0]), torch.tensor([5, 6]), torch.tensor([0])]
    for epoch in (1, 2, 3):
        for index in batches:
            logits = torch.randn(len(index), c)
            te.update(logits, index, epoch)
            if epoch >= 2:  # nothing happens before start_epoch
                for row, i in enumerate(index.tolist()):
                    reference[i] = m * reference[i] + (1 - m) * torch.softmax(logits[row], 0)
    torch.testing.assert_close(te.ensemble, reference, rtol=1e-6, atol=1e-7)
    index = torch.tensor([0, 3, 6])
    target = te.target(index)
    torch.testing.assert_close(target, reference[index] / reference[index].sum(1, keepdim=True))
    torch.testing.assert_close(target.sum(1), torch.ones(3))


def test_nothing_happens_before_start_epoch():
    te = TELoss(8, 4, start_epoch=3, end_epoch=5)
    logits = torch.randn(4, 4, requires_grad=True)
    index = torch.arange(4)
    te.update(logits, index, epoch=2)
    assert torch.count_nonzero(te.ensemble) == 0
    penalty = te(logits, index, epoch=2)
    assert penalty.item() == 0.0
    penalty.backward()  # differentiable, with an exactly zero gradient
    assert torch.count_nonzero(logits.grad) == 0


def test_penalty_value_and_gradient_match_the_formula():
    torch.manual_seed(1)
    n, c, epoch = 10, 6, 7
    te = TELoss(n, c, momentum=0.9, reg_weight=300.0, start_epoch=5, end_epoch=9, allow_duplicate_indices=True)
    index = torch.tensor([1, 4, 4, 9])  # a sample twice in the batch (a sampler drawing with replacement)
    for _ in range(3):
        te.update(torch.randn(4, c), index, epoch)
    logits = torch.randn(4, c, dtype=torch.float32, requires_grad=True)
    penalty = te(logits, index, epoch)

    w = 300.0 * reference_ramp(epoch, 5, 9)
    rows = te.ensemble[index]
    p = rows / rows.sum(1, keepdim=True)
    s = torch.softmax(logits.detach(), 1)
    expected = w * ((s - p) ** 2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)

    penalty.backward()
    # d/dz of w * mean((softmax(z) - p)^2), written out: g = 2w(s - p)/(B*C), dz = s * (g - <g, s>)
    g = 2 * w * (s - p) / s.numel()
    expected_grad = s * (g - (g * s).sum(1, keepdim=True))
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_ensemble_is_fp32_under_autocast_and_casts():
    te = TELoss(6, 3, start_epoch=1, end_epoch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.Linear(4, 3)(torch.randn(2, 4))
        assert logits.dtype == torch.bfloat16
        te.update(logits, torch.tensor([0, 5]), epoch=2)
        penalty = te(logits, torch.tensor([0, 5]), epoch=2)
    assert te.ensemble.dtype == torch.float32
    assert penalty.dtype == torch.float32
    te.to(torch.bfloat16)
    assert te.ensemble.dtype == torch.float32


def test_state_dict_round_trip_and_mismatch():
    te = TELoss(6, 3, start_epoch=1, end_epoch=2)
    te.update(torch.randn(3, 3), torch.tensor([0, 2, 4]), epoch=1)
    state = te.state_dict()
    assert torch.equal(state["ensemble"], te.ensemble)
    fresh = TELoss(6, 3, start_epoch=1, end_epoch=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ensemble, te.ensemble)
    with pytest.raises((ValueError, RuntimeError)):
        TELoss(7, 3, start_epoch=1, end_epoch=2).load_state_dict(state)


@pytest.mark.parametrize(
    "logits, index, error, message",
    [
        (torch.randn(2, 3), torch.tensor([0, 6]), IndexError, "out of range"),
        (torch.randn(2, 3), torch.tensor([-1, 0]), IndexError, "out of range"),
        (torch.randn(2, 4), torch.tensor([0, 1]), ValueError, "shape"),
        (torch.randn(3, 3), torch.tensor([0, 1]), ValueError, "match"),
        (torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([0]), ValueError, "NaN"),
        (torch.randn(1, 3), torch.tensor([0.0]), TypeError, "integer"),
    ],
)
def test_bad_inputs_raise_clear_errors(logits, index, error, message):
    te = TELoss(6, 3, start_epoch=1, end_epoch=2)
    with pytest.raises(error, match=message):
        te.update(logits, index, epoch=1)
    with pytest.raises(error, match=message):
        te(logits, index, epoch=2)


@pytest.mark.parametrize("kwargs", [dict(momentum=1.0), dict(reg_weight=-1.0), dict(start_epoch=5, end_epoch=5),
                                    dict(start_epoch=0, end_epoch=3)])
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        TELoss(4, 3, **kwargs)


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def test_tepgd_with_zero_weight_is_torchattacks_pgd():
    model = _tiny_model().eval()
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    te = TELoss(5, 4, start_epoch=3, end_epoch=5)
    torch.manual_seed(7)
    ours = TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=5)(x, y, index=torch.arange(5), epoch=1)
    torch.manual_seed(7)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5)(x, y)
    assert torch.equal(ours, theirs)


def test_tepgd_inner_loss_includes_the_penalty():
    model = _tiny_model().eval()
    x, y, index = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0]), torch.arange(5)
    te = TELoss(5, 4, reg_weight=1e4, start_epoch=1, end_epoch=2)
    te.update(torch.randn(5, 4) * 5, index, epoch=3)  # an ensemble far from the model's predictions
    attack = TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=5)
    torch.manual_seed(3)
    with_penalty = attack(x, y, index=index, epoch=3)
    torch.manual_seed(3)
    without = attack(x, y)  # no index: plain PGD
    assert not torch.equal(with_penalty, without)
    assert (with_penalty - x).abs().max() <= 8 / 255 + 1e-6
    # The penalty-aware attack reaches a larger penalty than plain PGD.
    with torch.no_grad():
        assert te(model(with_penalty), index, 3) > te(model(without), index, 3)


def test_te_methods_derive_start_and_end_and_say_so():
    setup = TrainingSetup(num_samples=10, num_classes=4, epochs=20)
    method = get_method("pgd-at-te")(setup)
    assert (method.extension("te").te.start_epoch, method.extension("te").te.end_epoch) == (round(0.45 * 20), round(0.75 * 20))
    assert any("45%" in note for note in method.notes)
    paper = get_method("trades-te")(TrainingSetup(num_samples=10, num_classes=4, epochs=200))
    assert (paper.extension("te").te.start_epoch, paper.extension("te").te.end_epoch) == (90, 150) and paper.notes == []
    given = get_method("pgd-at-te")(setup, te_start=3, te_end=8, te_weight=10.0, te_momentum=0.5)
    assert (given.extension("te").te.start_epoch, given.extension("te").te.end_epoch, given.extension("te").te.reg_weight, given.extension("te").te.momentum) == (3, 8, 10.0, 0.5)
    with pytest.raises(MethodError):
        get_method("pgd-at-te")(setup, te_start=8, te_end=3)


def test_trades_te_loss_matches_the_papers_formula():
    torch.manual_seed(0)
    setup = TrainingSetup(num_samples=6, num_classes=4, epochs=10)
    method = get_method("trades-te")(setup, te_start=1, te_end=2, beta=6.0)
    model = _tiny_model()
    x, y, index = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6)
    x_adv = method.attack(model, x, y, index, epoch=2)
    assert torch.count_nonzero(method.extension("te").te.ensemble) > 0  # updated from eval-mode clean logits
    model.train()
    loss, logs = method.loss(model, x, x_adv, y, index, epoch=2)
    clean, adv = model(x), model(x_adv)
    kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="sum") / len(y)
    p = method.extension("te").te.target(index)
    penalty = method.extension("te").te.weight(2) * ((F.softmax(clean, 1) - p) ** 2).mean()
    expected = F.cross_entropy(clean, y) + 6.0 * kl + penalty
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["te_loss"].item() == pytest.approx(penalty.item(), rel=1e-5)


def test_pgd_at_te_loss_is_ce_plus_penalty_on_adversarial_logits():
    torch.manual_seed(0)
    setup = TrainingSetup(num_samples=6, num_classes=4, epochs=10)
    method = get_method("pgd-at-te")(setup, te_start=1, te_end=3)
    model = _tiny_model()
    x, y, index = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6)
    x_adv = method.attack(model, x, y, index, epoch=2)
    model.train()
    loss, logs = method.loss(model, x, x_adv, y, index, epoch=2)
    adv = model(x_adv)
    penalty = method.extension("te").te.weight(2) * ((F.softmax(adv, 1) - method.extension("te").te.target(index)) ** 2).mean()
    assert loss.item() == pytest.approx((F.cross_entropy(adv, y) + penalty).item(), rel=1e-5)
    state = method.state_dict()
    other = get_method("pgd-at-te")(setup, te_start=1, te_end=3)
    other.load_state_dict(state)
    assert torch.equal(other.extension("te").te.ensemble, method.extension("te").te.ensemble)


def test_trades_kl_matches_trades_code_and_keeps_gradients_finite_when_probabilities_underflow():
    """TRADES' own KL form gives NaN gradients w.r.t. the clean logits once a clean probability is 0
    (a TRADES-TE run diverged this way on an H200); ours has the same value and finite gradients."""
    from at_memorization.methods.trades import trades_kl

    torch.manual_seed(0)
    adv, clean = torch.randn(8, 10), torch.randn(8, 10) * 3
    reference = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="sum") / len(adv)
    assert torch.allclose(trades_kl(adv, clean), reference, rtol=1e-6, atol=1e-7)

    clean = clean.clone()
    clean[:, 0] += 200.0  # every other class underflows to probability 0 in fp32
    assert (F.softmax(clean, 1) == 0).any()
    for form in ("trades-code", "ours"):
        a, c = adv.clone().requires_grad_(), clean.clone().requires_grad_()
        value = (F.kl_div(F.log_softmax(a, 1), F.softmax(c, 1), reduction="batchmean") if form == "trades-code"
                 else trades_kl(a, c))
        value.backward()
        finite = torch.isfinite(c.grad).all() and torch.isfinite(a.grad).all()
        assert bool(finite) == (form == "ours"), form
