"""How much the training gradient changes under small weight perturbations.

For a loss ``L`` and weights ``theta`` we measure, for random directions ``delta`` of several norms
``r``::

    ratio(r) = E_delta || grad L(theta + delta) - grad L(theta) ||_2 / || delta ||_2,   ||delta||_2 = r

(``delta`` is Gaussian over all trainable parameters jointly, rescaled to norm ``r``; the expectation
is the mean over a few draws). For a quadratic loss ``L = theta^T A theta / 2`` the ratio is exactly
``||A delta|| / ||delta||``; in general, as ``r -> 0`` it tends to ``||H delta|| / ||delta||`` (H the
Hessian), and large values at a given ``r`` mean the gradient is unstable (a rough, non-smooth
loss), which is the paper's explanation of why PGD-AT fails to converge on random labels while
TRADES does (Dong et al., ICLR 2022, Sec. 3.2, Fig. 3; smoothness notion after Liu et al. 2020,
"On the loss landscape of adversarial training").

For a checkpoint the three losses are, on a fixed set of training points with the run's labels:

* ``pgd-at``: ``CE(f(x_pgd), y)``;
* ``trades``: ``CE(f(x), y) + beta * KL(f(x) || f(x_trades))``;
* ``clean``: ``CE(f(x), y)``.

The adversarial examples ``x_pgd`` / ``x_trades`` are generated once at ``theta`` (with the run's
eps, step size and steps) and **held fixed** while the weights are perturbed, so each loss is a
smooth function of the weights (apart from ReLU kinks) and the ratio measures the curvature of the
loss the optimizer actually differentiates. The model is in eval mode.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .common import analysis_method, load_for_analysis, method_examples, method_loss, take, training_split

LossFn = Callable[[torch.nn.Module], torch.Tensor]


def _parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat_gradient(model: torch.nn.Module, loss_fn: LossFn) -> torch.Tensor:
    """The gradient of ``loss_fn(model)`` with respect to all trainable parameters, flattened."""
    params = _parameters(model)
    loss = loss_fn(model)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def random_direction(model: torch.nn.Module, radius: float, generator: torch.Generator) -> list[torch.Tensor]:
    """A Gaussian direction over all trainable parameters, scaled to global L2 norm ``radius``."""
    params = _parameters(model)
    noise = [torch.randn(p.shape, generator=generator).to(p.device, p.dtype) for p in params]
    norm = torch.sqrt(sum((n.double() ** 2).sum() for n in noise)).item()
    return [n * (radius / max(norm, 1e-30)) for n in noise]


@torch.no_grad()
def _shift(model: torch.nn.Module, direction: list[torch.Tensor], sign: float) -> None:
    for p, d in zip(_parameters(model), direction):
        p.add_(d, alpha=sign)


def gradient_stability(model: torch.nn.Module, losses: dict[str, LossFn], radii, *, draws: int = 3,
                       seed: int = 0) -> dict:
    """``||grad L(theta+delta) - grad L(theta)|| / ||delta||`` per loss and radius (mean/std over draws).

    The model's weights are restored exactly after every perturbation. Returns::

        {"radii": [...], "draws": k, "losses": {name: {"loss": L(theta), "grad_norm": ||grad L(theta)||,
                                                       "ratio_mean": [...], "ratio_std": [...],
                                                       "ratios": [[per draw] per radius],
                                                       "relative_change_mean": [...]}}}

    ``relative_change_mean`` is ``||grad L(theta+delta) - grad L(theta)|| / ||grad L(theta)||``,
    which does not depend on how the loss is scaled (TRADES' beta multiplies its KL term).
    """
    radii = [float(r) for r in radii]
    if not radii or any(r <= 0 for r in radii):
        raise ValueError("radii must be positive numbers")
    if draws < 1:
        raise ValueError("draws must be >= 1")
    saved = [p.detach().clone() for p in _parameters(model)]
    out = {"radii": radii, "draws": draws, "losses": {}}
    for name, loss_fn in losses.items():
        with torch.no_grad():
            value = float(loss_fn(model))
        g0 = flat_gradient(model, loss_fn)
        generator = torch.Generator().manual_seed(seed)  # the same directions for every loss
        g0_norm = float(torch.linalg.vector_norm(g0.double()))
        ratios, relative = [], []
        for radius in radii:
            row, rel_row = [], []
            for _ in range(draws):
                direction = random_direction(model, radius, generator)
                _shift(model, direction, +1.0)
                try:
                    g = flat_gradient(model, loss_fn)
                finally:
                    with torch.no_grad():
                        for p, s in zip(_parameters(model), saved):
                            p.copy_(s)
                change = float(torch.linalg.vector_norm((g - g0).double()))
                row.append(change / radius)
                rel_row.append(change / g0_norm if g0_norm > 0 else float("nan"))
            ratios.append(row)
            relative.append(rel_row)
        tensor = torch.tensor(ratios, dtype=torch.float64)
        out["losses"][name] = {
            "loss": value, "grad_norm": g0_norm,
            "ratio_mean": tensor.mean(1).tolist(),
            "ratio_std": (tensor.std(1, unbiased=False)).tolist(),
            "ratios": ratios,
            # scale-free: ||grad L(theta+delta) - grad L(theta)|| / ||grad L(theta)||
            "relative_change_mean": torch.tensor(relative, dtype=torch.float64).mean(1).tolist(),
        }
    return out


def checkpoint_losses(model, x, y, *, eps, step_size, steps, norm="Linf", beta=6.0, seed=0,
                      batch_size=128) -> dict[str, LossFn]:
    """The PGD-AT, TRADES and clean losses on (x, y), adversarial examples made now and held fixed.

    Each loss is the mean over batches of ``batch_size`` (so the gradient is that of the mean
    training loss over all the points), computed batch by batch to bound memory.
    """
    attack = dict(eps=eps, step_size=step_size, steps=steps)
    pgd_at = analysis_method("pgd-at", norm=norm, **attack)
    trades = analysis_method("trades", norm=norm, beta=beta, **attack)
    x_pgd = method_examples(pgd_at, model, x, y, seed=seed)
    x_trades = method_examples(trades, model, x, y, seed=seed + 1)
    chunks = [slice(start, start + batch_size) for start in range(0, len(y), batch_size)]
    weights = [(c.stop - c.start if c.stop <= len(y) else len(y) - c.start) / len(y) for c in chunks]

    def mean_over_batches(term):
        def loss_fn(m):
            return sum(w * term(m, c) for w, c in zip(weights, chunks))
        return loss_fn

    return {
        "pgd-at": mean_over_batches(lambda m, c: method_loss(pgd_at, m, x[c], x_pgd[c], y[c])),
        "trades": mean_over_batches(lambda m, c: method_loss(trades, m, x[c], x_trades[c], y[c])),
        "clean": mean_over_batches(lambda m, c: torch.nn.functional.cross_entropy(m(x[c]), y[c])),
    }


def gradient_stability_for_checkpoint(path, *, radii=(1e-3, 1e-2, 1e-1, 1.0), n_batches: int = 2,
                                      batch_size: int = 128, draws: int = 3, data_dir=None, device="cpu",
                                      seed: int = 0, beta: float | None = None) -> dict:
    """Gradient stability of a checkpoint's PGD-AT, TRADES and clean losses on its training data.

    Uses ``n_batches * batch_size`` training points drawn with ``seed`` (the run's own labels) and
    the run's eps / step size / steps. ``beta`` defaults to the run's TRADES beta (6 for other runs).
    """
    start = time.perf_counter()
    loaded = load_for_analysis(path, device)
    train = training_split(loaded, data_dir)
    x, y = take(train, n_batches * batch_size, device, seed=seed)
    beta = loaded.beta if beta is None else beta
    losses = checkpoint_losses(loaded.model, x, y, eps=loaded.eps, step_size=loaded.step_size,
                               steps=loaded.steps, norm=loaded.norm, beta=beta, seed=seed, batch_size=batch_size)
    result = gradient_stability(loaded.model, losses, radii, draws=draws, seed=seed)
    result.update({
        "checkpoint": str(loaded.path), "epoch": loaded.state.get("epoch"),
        "method": loaded.state.get("method", {}).get("name"), "label_noise": loaded.config.get("label_noise", 0.0),
        "dataset": loaded.state["dataset"], "model": loaded.state["model_name"], "n_points": int(len(y)),
        "batch_size": batch_size, "eps": loaded.eps, "step_size": loaded.step_size, "steps": loaded.steps,
        "beta": beta, "seed": seed, "adversarial_examples": "generated at theta and held fixed",
        "model_mode": "eval", "seconds": time.perf_counter() - start,
    })
    return result
