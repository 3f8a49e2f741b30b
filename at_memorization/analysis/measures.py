"""Norm- and sharpness-based complexity measures, adapted to adversarial training.

Notation: the network's weight layers are ``W_1 .. W_d`` (every ``Conv2d`` and ``Linear`` in
module order; a conv kernel of shape ``(out, in, k, k)`` is read as the matrix ``(out, in*k*k)``).
Biases and BatchNorm parameters are not weight layers (they enter only distance from
initialization, path norm and the perturbation measures). ``theta`` are all parameters. The
margin of ``(x, y)`` is ``f(x)_y - max_{j != y} f(x)_j``; the *adversarial* margin is the margin at
the PGD example of ``x`` (the run's eps/step size/steps, eval mode). All data are the run's own
training points with the labels it was trained on (random labels for a random-label run).

Products over layers are reported as logarithms (``log_prod_*``): ranks are unchanged and deep
networks do not overflow.

| name | formula | source |
|---|---|---|
| ``log_prod_frobenius`` | ``sum_i log ||W_i||_F`` | Neyshabur et al. 2015; Jiang et al. 2020 ("prod.of.fro") |
| ``sum_frobenius`` | ``sum_i ||W_i||_F`` | Jiang et al. 2020 ("sum.of.fro", which uses squares; same ranks for a fixed architecture up to scale) |
| ``log_prod_spectral`` | ``sum_i log ||W_i||_2`` (largest singular value of the reshaped kernel; for a conv this is not the operator norm of the convolution) | Bartlett et al. 2017; Jiang et al. 2020 ("prod.of.spec") |
| ``distance_from_init`` | ``||theta - theta_0||_2`` (needs the run's ``init.pt``) | Nagarajan & Kolter 2019; Jiang et al. 2020 ("dist.init") |
| ``path_norm`` | ``sum_k f_{theta^2}(1)_k``: the network with every parameter squared, applied to an all-ones input, summed (= sum over input-output paths of the product of squared weights for a bias-free ReLU net) | Neyshabur et al. 2015; Jiang et al. 2020 ("path.norm") |
| ``spectral_complexity_clean`` / ``_adv`` | ``R / gamma`` with ``R = prod_i ||W_i||_2 * (sum_i ||W_i^T||_{2,1}^{2/3} / ||W_i||_2^{2/3})^{3/2}`` (reference matrices 0; ``||A||_{2,1}`` = sum of the L2 norms of A's columns) and ``gamma`` the ``margin_percentile``-th percentile of the clean / adversarial training margins; ``null`` (ranked as most complex) when ``gamma <= 0`` | Bartlett, Foster & Telgarsky 2017, Thm 1.1; percentile margin as Jiang et al. 2020 |
| ``pacbayes_sharpness_clean`` / ``_adv`` | ``E_{u ~ N(0, sigma^2 I)} L(theta + u) - L(theta)`` for the clean CE and the PGD (adversarial) CE, the mean over ``draws`` noise draws; adversarial examples are recomputed for each noisy model | Neyshabur et al. 2017; Jiang et al. 2020 ("pacbayes.sharpness", here at a fixed sigma) |
| ``awp_flatness`` | ``max_{||v_l|| <= gamma ||w_l||} L_adv(w + v) - L_adv(w)`` over multi-dimensional weights ``w_l``, by ``awp_steps`` steps of layer-wise normalized gradient ascent with projection; the PGD examples are made at ``w`` and held fixed | Wu, Xia & Wang 2020 (AWP), Sec. 3 |
| ``input_grad_norm`` | ``E_x ||grad_x CE(f(x), y)||_2`` on clean training points | Ross & Doshi-Velez 2018; input-gradient regularity |
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from ..checkpoint import load_initial_weights
from .common import finite_or_none, load_for_analysis, pgd_examples, take, test_split, training_split
from ..evaluation import correct_flags
from ..attacks import margins, selection_pgd
from ..user_errors import AnalysisError
from ..runfolder import RunFolder

# Higher value = more complex = the measure predicts a larger generalization gap.
MEASURES = ("log_prod_frobenius", "sum_frobenius", "log_prod_spectral", "distance_from_init", "path_norm",
            "spectral_complexity_clean", "spectral_complexity_adv", "pacbayes_sharpness_clean",
            "pacbayes_sharpness_adv", "awp_flatness", "input_grad_norm")


# --------------------------------------------------------------------------- weight-only measures
def weight_matrices(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, W)`` for every Conv (kernel reshaped to ``(out, in*k*k)``) and Linear layer, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            found.append((name, module.weight.detach().reshape(module.weight.shape[0], -1).double()))
    return found


def norm_measures(model: torch.nn.Module) -> dict:
    mats = weight_matrices(model)
    if not mats:
        raise AnalysisError("the model has no Conv or Linear layers to measure")
    fro = [torch.linalg.matrix_norm(w, "fro").item() for _, w in mats]
    spec = [torch.linalg.matrix_norm(w, 2).item() for _, w in mats]
    return {
        "log_prod_frobenius": sum(math.log(v) for v in fro),
        "sum_frobenius": sum(fro),
        "log_prod_spectral": sum(math.log(v) for v in spec),
        "layers": [{"name": n, "shape": list(w.shape), "frobenius": f, "spectral": s}
                   for (n, w), f, s in zip(mats, fro, spec)],
    }


def spectral_complexity(model: torch.nn.Module) -> float:
    """Bartlett et al. (2017)'s ``R = prod ||W_i||_2 * (sum ||W_i^T||_{2,1}^{2/3} / ||W_i||_2^{2/3})^{3/2}``.

    Reference matrices are zero; ``||W^T||_{2,1}`` is the sum over output units of the L2 norm of
    their incoming weights (the rows of ``W``).
    """
    prod, total = 1.0, 0.0
    for _, w in weight_matrices(model):
        s = torch.linalg.matrix_norm(w, 2).item()
        l21 = w.norm(dim=1).sum().item()
        prod *= s
        total += (l21 / s) ** (2.0 / 3.0)
    return prod * total ** 1.5


@torch.no_grad()
def path_norm(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """``sum_k f_{theta^2}(1)_k``: every parameter squared, all-ones input, outputs summed (eval mode)."""
    squared = copy.deepcopy(model).double().eval()
    for p in squared.parameters():
        p.pow_(2)
    device = next(squared.parameters()).device
    return squared(torch.ones((1, *input_shape), dtype=torch.float64, device=device)).sum().item()


def distance_from_init(model: torch.nn.Module, init_state: dict, source: str = "the initial weights") -> float:
    """``||theta - theta_0||_2`` over all trainable parameters; ``source`` names ``init_state`` (its file)."""
    total = 0.0
    for name, p in model.named_parameters():
        if name not in init_state:
            raise AnalysisError(f"{source}: no parameter {name!r}: it belongs to another model")
        initial = init_state[name]
        if not isinstance(initial, torch.Tensor) or initial.shape != p.shape:
            found = f"has shape {list(initial.shape)}" if isinstance(initial, torch.Tensor) else \
                f"is a {type(initial).__name__}"
            raise AnalysisError(f"{source}: parameter {name!r} {found}, the model's has shape {list(p.shape)}: "
                                "it belongs to another model")
        total += (p.detach().double().cpu() - initial.double()).pow(2).sum().item()
    return math.sqrt(total)


# --------------------------------------------------------------------------- data-dependent measures
def percentile_margin(model, x, y, percentile: float, batch_size: int = 256) -> float:
    with torch.no_grad():
        m = torch.cat([margins(model(x[s:s + batch_size]), y[s:s + batch_size])
                       for s in range(0, len(y), batch_size)])
    return torch.quantile(m.double().cpu(), percentile / 100.0).item()


def _mean_ce(model, x, y, batch_size=256) -> float:
    with torch.no_grad():
        total = sum(F.cross_entropy(model(x[s:s + batch_size]), y[s:s + batch_size], reduction="sum").item()
                    for s in range(0, len(y), batch_size))
    return total / max(len(y), 1)


def pacbayes_sharpness(model, x, y, *, sigma: float, draws: int, attack_kwargs: dict, seed: int = 0) -> dict:
    """Mean increase of the clean and adversarial CE when N(0, sigma^2) noise is added to every parameter.

    The PGD examples are recomputed for each noisy model, from the same random start (``seed``), so
    that only the weights differ.
    """
    clean0 = _mean_ce(model, x, y)
    adv0 = _mean_ce(model, pgd_examples(model, x, y, seed=seed, **attack_kwargs), y)
    generator = torch.Generator().manual_seed(seed)
    clean, adv = [], []
    for _ in range(draws):
        noisy = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * sigma)
        clean.append(_mean_ce(noisy, x, y))
        adv.append(_mean_ce(noisy, pgd_examples(noisy, x, y, seed=seed, **attack_kwargs), y))
    return {"clean": sum(clean) / draws - clean0, "adv": sum(adv) / draws - adv0,
            "clean_loss": clean0, "adv_loss": adv0}


def awp_flatness(model, x_adv, y, *, gamma: float, steps: int, batch_size: int = 256) -> float:
    """AWP-style worst-case increase of the adversarial loss under layer-wise relative weight perturbation.

    ``v_l`` is constrained to ``||v_l|| <= gamma ||w_l||`` for every weight with more than one
    dimension (as AWP's code perturbs conv/linear weights); ascent steps of size ``gamma/steps``
    (relative) along the layer-wise normalized gradient, then projection. ``x_adv`` stays fixed.
    """
    perturbed = copy.deepcopy(model).eval()
    named = [(n, p) for n, p in perturbed.named_parameters() if p.dim() > 1]
    original = {n: p.detach().clone() for n, p in named}
    base = _mean_ce(perturbed, x_adv, y, batch_size)
    for _ in range(max(steps, 1)):
        perturbed.zero_grad(set_to_none=True)
        for s in range(0, len(y), batch_size):
            loss = F.cross_entropy(perturbed(x_adv[s:s + batch_size]), y[s:s + batch_size], reduction="sum") / len(y)
            loss.backward()
        with torch.no_grad():
            for n, p in named:
                if p.grad is None:
                    continue
                w_norm = original[n].norm()
                p.add_(p.grad / (p.grad.norm() + 1e-20) * w_norm * gamma / max(steps, 1))
                v = p - original[n]
                limit = gamma * w_norm
                if v.norm() > limit:
                    p.copy_(original[n] + v * (limit / v.norm()))
    return _mean_ce(perturbed, x_adv, y, batch_size) - base


def input_grad_norm(model, x, y, batch_size: int = 256) -> float:
    """Mean over points of ``||grad_x CE(f(x), y)||_2`` (per-example loss, eval mode)."""
    total = 0.0
    for s in range(0, len(y), batch_size):
        xb = x[s:s + batch_size].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xb), y[s:s + batch_size], reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        total += grad.flatten(1).norm(dim=1).sum().item()
    return total / max(len(y), 1)


def robust_gap(loaded, train, test, *, n: int, device, seed: int) -> dict:
    """Train (run's labels) and test clean/PGD accuracy on the first ``n`` points, and their gaps."""
    eval_steps = int(loaded.config.get("eval_steps", loaded.steps) or loaded.steps)
    attack = selection_pgd(loaded.model, loaded.eps, loaded.step_size, eval_steps, loaded.norm)
    out = {}
    for prefix, split in (("train", train), ("test", test)):
        k = min(n, len(split))
        images, labels, _ = split.batch(torch.arange(k))
        for kind, atk in (("clean", None), ("robust", attack)):
            flags = correct_flags(loaded.model, images, labels, device=device, attack=atk, seed=seed)
            out[f"{prefix}_{kind}_acc"] = flags.float().mean().item()
    out["robust_gap"] = out["train_robust_acc"] - out["test_robust_acc"]
    out["clean_gap"] = out["train_clean_acc"] - out["test_clean_acc"]
    out["eval_pgd_steps"] = eval_steps
    return out


def measure_checkpoint(path, *, n_points: int = 512, gap_points: int = 512, margin_percentile: float = 10.0,
                       sigma: float = 0.01, draws: int = 3, awp_gamma: float = 5e-3, awp_steps: int = 3,
                       data_dir=None, device="cpu", seed: int = 0) -> dict:
    """Every measure of one checkpoint, plus its measured generalization gaps."""
    start = time.perf_counter()
    loaded = load_for_analysis(path, device)
    model = loaded.model
    train = training_split(loaded, data_dir)
    test = test_split(loaded, data_dir, size=gap_points)
    x, y = take(train, n_points, device)
    attack_kwargs = {"eps": loaded.eps, "step_size": loaded.step_size, "steps": loaded.steps, "norm": loaded.norm}

    norms = norm_measures(model)
    values = {k: norms[k] for k in ("log_prod_frobenius", "sum_frobenius", "log_prod_spectral")}
    init_file = RunFolder(loaded.run_dir).init
    if init_file.is_file():
        values["distance_from_init"] = distance_from_init(model, load_initial_weights(init_file), str(init_file))
    else:
        values["distance_from_init"] = None
    values["path_norm"] = path_norm(model, tuple(train.shape))
    x_adv = pgd_examples(model, x, y, seed=seed, **attack_kwargs)
    complexity = spectral_complexity(model)
    gamma_clean = percentile_margin(model, x, y, margin_percentile)
    gamma_adv = percentile_margin(model, x_adv, y, margin_percentile)
    values["spectral_complexity_clean"] = complexity / gamma_clean if gamma_clean > 0 else None
    values["spectral_complexity_adv"] = complexity / gamma_adv if gamma_adv > 0 else None
    sharp = pacbayes_sharpness(model, x, y, sigma=sigma, draws=draws, attack_kwargs=attack_kwargs, seed=seed)
    values["pacbayes_sharpness_clean"] = sharp["clean"]
    values["pacbayes_sharpness_adv"] = sharp["adv"]
    values["awp_flatness"] = awp_flatness(model, x_adv, y, gamma=awp_gamma, steps=awp_steps)
    values["input_grad_norm"] = input_grad_norm(model, x, y)
    gaps = robust_gap(loaded, train, test, n=gap_points, device=device, seed=seed)
    return {
        "checkpoint": str(loaded.path), "run": loaded.run_dir.name, "epoch": loaded.state.get("epoch"),
        "method": loaded.state.get("method", {}).get("name"), "label_noise": loaded.config.get("label_noise", 0.0),
        "dataset": loaded.state["dataset"], "model": loaded.state["model_name"],
        "measures": {k: finite_or_none(v) for k, v in values.items()},
        "details": {"spectral_complexity_R": complexity, "margin_clean": gamma_clean, "margin_adv": gamma_adv,
                    "train_clean_loss": sharp["clean_loss"], "train_adv_loss": sharp["adv_loss"],
                    "layers": norms["layers"]},
        "gaps": gaps,
        "settings": {"n_points": int(len(y)), "gap_points": gap_points, "margin_percentile": margin_percentile,
                     "sigma": sigma, "draws": draws, "awp_gamma": awp_gamma, "awp_steps": awp_steps, "seed": seed,
                     **attack_kwargs},
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- ranking
def _rank_key(value):
    """None (an undefined measure, e.g. a non-positive margin) counts as the most complex."""
    return math.inf if value is None else value


def kendall_tau(a, b) -> float | None:
    """Kendall's tau-b of two equally long sequences (ties handled; None if undefined).

    ``None`` entries count as +inf. ``tau_b = (C - D) / sqrt((P - T_a)(P - T_b))`` over pairs.
    """
    if len(a) != len(b):
        raise ValueError("sequences must have the same length")
    a, b = [_rank_key(v) for v in a], [_rank_key(v) for v in b]
    concordant = discordant = ties_a = ties_b = pairs = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            pairs += 1
            da, db = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            if da == 0:
                ties_a += 1
            if db == 0:
                ties_b += 1
            if da and db:
                if da == db:
                    concordant += 1
                else:
                    discordant += 1
    denominator = math.sqrt((pairs - ties_a) * (pairs - ties_b))
    return (concordant - discordant) / denominator if denominator else None


def _ranks(values) -> list[int]:
    """1 = largest (None counts as largest); equal values share the smallest rank."""
    keys = [_rank_key(v) for v in values]
    return [1 + sum(other > k for other in keys) for k in keys]


def compare_checkpoints(results: list[dict], target: str = "robust_gap") -> dict:
    """Rank the checkpoints by every measure and by the measured gap; Kendall tau of each with the gap."""
    gap = [r["gaps"][target] for r in results]
    names = [r["checkpoint"] for r in results]
    out = {"target": target, "checkpoints": names, "target_values": gap, "target_ranks": _ranks(gap), "measures": {}}
    for measure in MEASURES:
        values = [r["measures"].get(measure) for r in results]
        if all(v is None for v in values) and measure == "distance_from_init":
            continue
        out["measures"][measure] = {"values": values, "ranks": _ranks(values), "kendall_tau": kendall_tau(values, gap)}
    return out

