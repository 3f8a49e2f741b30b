"""TRADES and TRADES+TE under the L2 threat model, against the paper's official code.

The reference is ``TRADES_TE.__call__`` of dongyp13/memorization-AT, ``loss.py`` at commit
5edda6cc135ebfe0785a05a4d08ebfce17e38116 (its ``norm == 'l2'`` branch), transcribed below with
``.cuda()`` dropped and ``nn.KLDivLoss(size_average=False)`` written ``reduction="sum"`` (the same).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from at_memorization.attacks import PenalizedTPGD
from at_memorization.methods import TrainingSetup, get_method
from at_memorization.methods.base import MethodError

from cli_testing import invoke, tiny_train_args

EPS, STEP, STEPS, BETA = 0.5, 0.2, 5, 6.0


def reference_trades_te_attack(model, x_natural, epsilon, step_size, perturb_steps, beta, norm="l2",
                               epoch=0, es=1, soft_labels=None, index=None, momentum=0.9, weight=0.0):
    """memorization-AT loss.py (5edda6c) TRADES_TE.__call__, up to the adversarial example it trains on."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x_natural)
    logits = model(x_natural)

    if epoch >= es:
        prob = F.softmax(logits.detach(), dim=1)
        soft_labels[index] = momentum * soft_labels[index] + (1 - momentum) * prob
        soft_labels_batch = soft_labels[index] / soft_labels[index].sum(1, keepdim=True)

    # generate adversarial example
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            logits_adv = model(x_adv)
            loss_kl = criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
            if epoch >= es:
                loss = (beta / batch_size) * loss_kl + weight * ((F.softmax(logits_adv, dim=1) - soft_labels_batch) ** 2).mean()
            else:
                loss = loss_kl
        grad = torch.autograd.grad(loss, [x_adv])[0]
        if norm == 'linf':
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        elif norm == 'l2':
            g_norm = torch.norm(grad.view(grad.shape[0], -1), dim=1).view(-1, 1, 1, 1)
            scaled_grad = grad.detach() / (g_norm.detach() + 1e-10)
            x_adv = x_natural + (x_adv.detach() + step_size * scaled_grad - x_natural).view(x_natural.size(0), -1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(x_natural)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return torch.clamp(x_adv, 0.0, 1.0)  # "x_adv = Variable(torch.clamp(x_adv, 0.0, 1.0), ...)"


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    )


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g)
    x[0] = 0.0  # images at the borders of [0, 1] exercise the clamping
    x[1] = 1.0
    y = torch.randint(0, 4, (8,), generator=g)
    return x, y


def _l2(delta):
    return delta.flatten(1).norm(dim=1)


def _setup(n, norm="L2"):
    return TrainingSetup(num_samples=n, num_classes=4, epochs=10, eps=EPS, step_size=STEP, steps=STEPS, norm=norm)


# --------------------------------------------------------------------------- (a) TRADES, L2
def test_l2_tpgd_matches_the_papers_code(batch):
    x, y = batch
    model = _model()
    ours = PenalizedTPGD(model, eps=EPS, alpha=STEP, steps=STEPS, beta=BETA, norm="L2")
    torch.manual_seed(5)
    a = ours(x, y)
    torch.manual_seed(5)
    b = reference_trades_te_attack(model, x, EPS, STEP, STEPS, BETA, norm="l2")
    assert torch.equal(a, b), (a - b).abs().max()
    # The projection and the clamping were both exercised.
    assert _l2(a - x).max() > 0.99 * EPS
    assert (a[0] == 0).any() and (a[1] == 1).any()


def test_trades_method_builds_the_l2_attack_and_matches_the_papers_code(batch):
    x, y = batch
    model = _model()
    method = get_method("trades")(_setup(len(y)), beta=BETA)
    attack = method.make_attack(model)
    assert (attack.norm, attack.eps, attack.alpha, attack.steps, attack.beta) == ("L2", EPS, STEP, STEPS, BETA)
    model.train()  # as the trainer hands it over; the attack runs in eval mode and restores it
    torch.manual_seed(11)
    a = method.attack(model, x, y, torch.arange(len(y)), epoch=1)
    assert model.training
    torch.manual_seed(11)
    b = reference_trades_te_attack(model, x, EPS, STEP, STEPS, BETA, norm="l2")
    assert torch.equal(a, b), (a - b).abs().max()


# --------------------------------------------------------------------------- (b) TRADES+TE, L2
def test_trades_te_l2_attack_matches_the_papers_code_over_two_epochs(batch):
    x, y = batch
    n = len(y)
    index = torch.arange(n)
    model = _model()
    method = get_method("trades-te")(_setup(n), beta=BETA, te_start=1, te_end=2, te_weight=300.0, te_momentum=0.9)
    soft_labels = torch.zeros(n, 4)
    for epoch, seed in ((1, 21), (2, 22)):  # epoch 1: weight 300*exp(-5); epoch 2: 300
        weight = method.extension("te").te.weight(epoch)
        assert weight > 0
        model.train()
        torch.manual_seed(seed)
        ours = method.attack(model, x, y, index, epoch)
        torch.manual_seed(seed)
        ref = reference_trades_te_attack(model, x, EPS, STEP, STEPS, BETA, norm="l2", epoch=epoch, es=1,
                                         soft_labels=soft_labels, index=index, momentum=0.9, weight=weight)
        assert torch.equal(ours, ref), (epoch, (ours - ref).abs().max())
        assert torch.equal(method.extension("te").te.ensemble, soft_labels)
    # The penalty changed the attack: plain TRADES from the same noise lands elsewhere.
    torch.manual_seed(22)
    plain = PenalizedTPGD(model, eps=EPS, alpha=STEP, steps=STEPS, beta=BETA, norm="L2")(x, y)
    assert not torch.equal(plain, ours)


def test_linf_reference_transcription_matches_ours_on_interior_images():
    """The transcription's Linf branch is the official code: ours (torchattacks' TPGD, which clamps the
    random start) agrees with it wherever the start needs no clamping."""
    model = _model()
    x = 0.25 + 0.5 * torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    a = PenalizedTPGD(model, eps=8 / 255, alpha=2 / 255, steps=4)(x)
    torch.manual_seed(4)
    b = reference_trades_te_attack(model, x, 8 / 255, 2 / 255, 4, BETA, norm="linf")
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- (c) budget and range
@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("with_penalty", [False, True])
def test_l2_adversarial_examples_lie_in_the_ball_and_in_the_image_range(batch, eps, with_penalty):
    x, y = batch
    model = _model()
    attack = PenalizedTPGD(model, eps=eps, alpha=eps / 2, steps=6, beta=BETA, norm="L2")
    penalty = (lambda logits: 1e4 * logits[:, 0].mean()) if with_penalty else None
    torch.manual_seed(0)
    adv = attack(x, y, penalty=penalty)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert not adv.requires_grad and adv.grad_fn is None
    assert _l2(adv - x).max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_norms_are_checked():
    with pytest.raises(ValueError, match="norm"):
        PenalizedTPGD(_model(), norm="L1")
    for name in ("trades", "trades-te"):
        with pytest.raises(MethodError, match="L1"):
            get_method(name)(_setup(8, norm="L1"))
        assert get_method(name)(_setup(8, norm="L2")).make_attack(_model()).norm == "L2"
        assert get_method(name)(_setup(8, norm="Linf")).make_attack(_model()).norm == "Linf"


# --------------------------------------------------------------------------- (d) the command line
@pytest.mark.parametrize("method", ["trades", "trades-te"])
def test_one_epoch_l2_training_through_the_cli(method, mnist_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *tiny_train_args(mnist_dir, out, method=method, norm="L2", eps=0.5, step_size=0.1,
                                              steps=2))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    record = records[0]
    for key in ("train_loss", "test_clean_acc", "test_robust_acc"):
        assert math.isfinite(record[key]), (key, record)
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    if method == "trades-te":
        assert record["te_weight_now"] > 0 and math.isfinite(record["te_loss"])
