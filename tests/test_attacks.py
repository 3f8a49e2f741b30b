"""Attacks: our torchattacks subclasses against torchattacks itself, budgets, penalties, CW, bf16."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from at_memorization.attacks import CWLinf, PenalizedPGD, PenalizedTPGD, cw30, pgd20, selection_pgd


def _model(in_chans=3, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes),
    )


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 16, 16, generator=g)
    x[0] = 0.0  # images at the borders of [0, 1] exercise the clamping
    x[1] = 1.0
    y = torch.randint(0, 10, (12,), generator=g)
    return x, y


def _run(attack, x, y, seed, **kwargs):
    torch.manual_seed(seed)
    return attack(x, y, **kwargs)


@pytest.mark.parametrize("random_start", [True, False])
def test_penalized_pgd_without_penalty_is_torchattacks_pgd(batch, random_start):
    x, y = batch
    model = _model()
    ours = PenalizedPGD(model, eps=8 / 255, alpha=2 / 255, steps=5, random_start=random_start)
    reference = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, random_start=random_start)
    a, b = _run(ours, x, y, 3), _run(reference, x, y, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_attacks_keep_the_model_mode(batch):
    x, y = batch
    model = _model().train()
    PenalizedPGD(model, steps=1)(x, y)
    assert model.training
    model.eval()
    PenalizedTPGD(model, steps=1)(x, y)
    assert not model.training


@pytest.mark.parametrize("eps", [8 / 255, 0.1])
def test_linf_budget_and_range(batch, eps):
    x, y = batch
    adv = _run(PenalizedPGD(_model(), eps=eps, alpha=eps / 2, steps=4), x, y, 0)
    assert adv.dtype == torch.float32 and adv.shape == x.shape
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > eps * 0.9  # it actually moved to the budget's edge somewhere


def test_l2_budget_and_range(batch):
    x, y = batch
    eps = 0.5
    adv = _run(PenalizedPGD(_model(), eps=eps, alpha=eps / 4, steps=6, norm="L2"), x, y, 0)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-4).all()
    assert norms.max() > eps * 0.5
    assert adv.min() >= 0 and adv.max() <= 1
    # L2 steps are not sign steps: the perturbation is not a +-alpha pattern.
    assert (adv - x).abs().unique().numel() > 10


def test_l2_matches_torchattacks_pgdl2_without_random_start(batch):
    x, y = batch
    model = _model()
    ours = PenalizedPGD(model, eps=0.5, alpha=0.1, steps=4, random_start=False, norm="L2")
    reference = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=4, random_start=False)
    assert torch.allclose(_run(ours, x, y, 0), _run(reference, x, y, 0), atol=1e-6)


def test_bad_norm():
    with pytest.raises(ValueError, match="norm"):
        PenalizedPGD(_model(), norm="L1")


def test_penalty_changes_the_result(batch):
    x, y = batch
    model = _model()
    attack = PenalizedPGD(model, eps=8 / 255, alpha=2 / 255, steps=3)
    plain = _run(attack, x, y, 0)
    zero = _run(attack, x, y, 0, penalty=lambda logits: 0.0 * logits.sum())
    assert torch.equal(plain, zero)
    pushed = _run(attack, x, y, 0, penalty=lambda logits: 1000.0 * logits[:, 0].mean())
    assert not torch.equal(plain, pushed)
    with torch.no_grad():  # the penalty pulls the attack towards class 0
        assert model.eval()(pushed)[:, 0].mean() > model(plain)[:, 0].mean()


def test_cw_loss_is_the_margin():
    attack = CWLinf(_model(), kappa=50.0)
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 5.0], [100.0, 0.0, -1.0]])
    labels = torch.tensor([0, 1, 0])
    # min(max other - correct, kappa) as TRADES' -relu(correct - other + kappa): -2, 3, -100
    assert attack.loss_fn(logits, labels).item() == pytest.approx((-2 + 3 - 100) / 3)
    assert CWLinf(_model(), kappa=1.0).loss_fn(logits, labels).item() == pytest.approx((-2 + 1 - 100) / 3)
    # A confidently correct point still gets a gradient (the attack keeps pushing it) ...
    confident = torch.tensor([[60.0, 0.0, -1.0]], requires_grad=True)
    attack.loss_fn(confident, torch.tensor([0])).backward()
    assert confident.grad.tolist() == [[-1.0, 1.0, 0.0]]
    # ... while one already misclassified by more than kappa does not.
    beaten = torch.tensor([[0.0, 60.0, -1.0]], requires_grad=True)
    attack.loss_fn(beaten, torch.tensor([0])).backward()
    assert torch.count_nonzero(beaten.grad) == 0


def test_cw_attack_lowers_the_margin_and_respects_budget(batch):
    x, y = batch
    model = _model().eval()
    attack = cw30(model)
    assert attack.steps == 30 and attack.eps == pytest.approx(8 / 255) and attack.alpha == pytest.approx(2 / 255)
    adv = _run(attack, x, y, 0)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert attack.loss_fn(model(adv), y) > attack.loss_fn(model(x), y)


def test_evaluation_factories():
    model = _model()
    attack = pgd20(model)
    assert (attack.steps, attack.norm) == (20, "Linf") and attack.alpha == pytest.approx(2 / 255)
    l2 = pgd20(model, eps=0.5, norm="L2")
    assert l2.norm == "L2" and l2.alpha == pytest.approx(0.125)
    train = selection_pgd(model, 0.1, 0.02, 3)
    assert (train.eps, train.alpha, train.steps, train.random_start) == (0.1, 0.02, 3, True)


def test_penalized_tpgd_without_penalty_is_torchattacks_tpgd(batch):
    x, y = batch
    model = _model()
    ours = PenalizedTPGD(model, eps=8 / 255, alpha=2 / 255, steps=4)
    reference = torchattacks.TPGD(model, eps=8 / 255, alpha=2 / 255, steps=4)
    a, b = _run(ours, x, y, 5), _run(reference, x, y, 5)
    assert torch.equal(a, b)
    assert (a - x).abs().max() <= 8 / 255 + 1e-6 and a.min() >= 0 and a.max() <= 1


def test_penalized_tpgd_penalty_and_beta(batch):
    x, y = batch
    model = _model()
    attack = PenalizedTPGD(model, eps=8 / 255, alpha=2 / 255, steps=3, beta=6.0)
    plain = _run(attack, x, y, 0)
    # beta only rescales the KL term when there is a penalty: sign steps are unchanged without one.
    assert torch.equal(plain, _run(PenalizedTPGD(model, eps=8 / 255, alpha=2 / 255, steps=3, beta=1.0), x, y, 0))
    pushed = _run(attack, x, y, 0, penalty=lambda logits: 1e4 * logits[:, 0].mean())
    assert not torch.equal(plain, pushed)


def test_one_pgd_loop_the_variants_override_its_hooks():
    """PGD, CW, TRADES' attack, MART's and TE's run PenalizedPGD's loop (TEPGD wraps it for restarts)."""
    from at_memorization.plugins.mart import MARTPGD
    from at_memorization.plugins.temporal_ensembling import TEPGD

    for variant in (CWLinf, PenalizedTPGD, MARTPGD):
        assert variant.forward is PenalizedPGD.forward, variant
    assert "forward" in vars(TEPGD) and "_step" not in vars(TEPGD) and "_random_start" not in vars(TEPGD)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_an_attack_without_steps_returns_its_start_in_the_image_range(norm):
    """The unclamped starts (TRADES' L2 and MART's references) are clamped after the loop, as there."""
    from at_memorization.plugins.mart import MARTPGD

    x, y = torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)  # half of any noise lies below 0
    attacks = [PenalizedPGD(_model(), eps=0.1, steps=0, norm=norm),
               PenalizedTPGD(_model(), eps=0.1, steps=0, norm=norm)]
    attacks += [MARTPGD(_model(), eps=0.1, steps=0)] if norm == "Linf" else []
    for attack in attacks:
        torch.manual_seed(0)
        start = attack._random_start(x)
        torch.manual_seed(0)
        adv = attack(x, y)
        assert torch.equal(adv, torch.clamp(start, 0, 1)) and adv.max() > 0, type(attack).__name__
        clamped_start = not isinstance(attack, MARTPGD) and (norm == "Linf" or type(attack) is PenalizedPGD)
        assert (start.min() >= 0) == clamped_start, type(attack).__name__


def test_pgd_under_bf16_autocast_returns_float32_within_eps(batch):
    x, y = batch
    model = _model()
    attack = PenalizedPGD(model, eps=8 / 255, alpha=2 / 255, steps=3)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = attack(x, y)
    assert adv.dtype == torch.float32
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pgd_on_cuda_under_bf16(batch):
    x, y = batch
    model = _model().cuda()
    attack = PenalizedPGD(model, eps=8 / 255, alpha=2 / 255, steps=3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        adv = attack(x.cuda(), y.cuda())
    assert adv.dtype == torch.float32 and adv.is_cuda
    assert (adv.cpu() - x).abs().max() <= 8 / 255 + 1e-6
