"""Gradient stability on smooth models where the answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from at_memorization.analysis.gradient_stability import (checkpoint_losses, flat_gradient, gradient_stability,
                                                         random_direction)


class Quadratic(nn.Module):
    """L(theta) = theta^T A theta / 2 (+ b^T theta): gradient A theta + b, Hessian A."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None = None):
        super().__init__()
        n = a.shape[0]
        self.first = nn.Parameter(torch.randn(n // 2, dtype=torch.float64))
        self.second = nn.Parameter(torch.randn(n - n // 2, dtype=torch.float64))
        self.register_buffer("a", a)
        self.register_buffer("b", torch.zeros(n, dtype=torch.float64) if b is None else b)

    def loss(self) -> torch.Tensor:
        theta = torch.cat([self.first, self.second])
        return 0.5 * theta @ self.a @ theta + self.b @ theta


def test_isotropic_quadratic_ratio_is_the_curvature_at_every_radius():
    torch.manual_seed(0)
    model = Quadratic(3.0 * torch.eye(7, dtype=torch.float64))
    result = gradient_stability(model, {"q": lambda m: m.loss()}, [1e-4, 1e-2, 1.0, 10.0], draws=4)
    q = result["losses"]["q"]
    assert q["ratio_mean"] == pytest.approx([3.0] * 4, rel=1e-9)
    assert q["ratio_std"] == pytest.approx([0.0] * 4, abs=1e-9)
    assert len(q["ratios"]) == 4 and all(len(row) == 4 for row in q["ratios"])
    theta = torch.cat([model.first, model.second]).detach()
    radii = torch.tensor([1e-4, 1e-2, 1.0, 10.0], dtype=torch.float64)
    # ||A delta|| / ||A theta|| = r / ||theta||
    assert q["relative_change_mean"] == pytest.approx((radii / theta.norm()).tolist(), rel=1e-9)


def test_general_quadratic_ratio_equals_norm_of_hessian_times_direction():
    torch.manual_seed(1)
    m = torch.randn(6, 6, dtype=torch.float64)
    a = m @ m.T + torch.eye(6, dtype=torch.float64)
    model = Quadratic(a, b=torch.randn(6, dtype=torch.float64))
    before = [p.detach().clone() for p in model.parameters()]
    radii = [1e-3, 0.5]
    result = gradient_stability(model, {"q": lambda mod: mod.loss()}, radii, draws=3, seed=5)
    # the same directions, drawn again from the same seed: ratio = ||A delta|| / ||delta||
    generator = torch.Generator().manual_seed(5)
    for radius, ratios in zip(radii, result["losses"]["q"]["ratios"]):
        for ratio in ratios:
            delta = torch.cat(random_direction(model, radius, generator))
            assert delta.norm().item() == pytest.approx(radius)
            assert ratio == pytest.approx(((a @ delta).norm() / delta.norm()).item(), rel=1e-8)
    # the weights are restored exactly, and the loss/gradient at theta are reported
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    theta = torch.cat(before)
    assert result["losses"]["q"]["grad_norm"] == pytest.approx((a @ theta + model.b).norm().item())
    assert torch.allclose(flat_gradient(model, lambda mod: mod.loss()), a @ theta + model.b)


def test_small_radius_ratio_of_a_smooth_network_approaches_the_hessian_vector_product():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = lambda m: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    result = gradient_stability(net, {"ce": loss_fn}, [1e-6], draws=1, seed=3)
    generator = torch.Generator().manual_seed(3)
    delta = random_direction(net, 1e-6, generator)
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_fn(net), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, delta)), params)
    expected = torch.cat([h.reshape(-1) for h in hvp]).norm().item() / 1e-6
    assert result["losses"]["ce"]["ratio_mean"][0] == pytest.approx(expected, rel=1e-4)


def test_checkpoint_losses_hold_adversarial_examples_fixed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x, y = torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,))
    losses = checkpoint_losses(net, x, y, eps=0.1, step_size=0.05, steps=2, beta=6.0, batch_size=8)
    assert set(losses) == {"pgd-at", "trades", "clean"}
    clean = nn.functional.cross_entropy(net(x), y)
    with torch.no_grad():
        assert losses["clean"](net).item() == pytest.approx(clean.item(), rel=1e-5)  # batch-weighted mean
        assert losses["pgd-at"](net).item() >= clean.item()
        assert losses["trades"](net).item() >= clean.item() - 1e-6
        # calling twice gives the same value: nothing is re-attacked
        assert losses["pgd-at"](net).item() == losses["pgd-at"](net).item()
    with pytest.raises(ValueError):
        gradient_stability(net, losses, [0.0])
