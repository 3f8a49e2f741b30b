"""Complexity measures on hand-built networks whose answers are known."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from at_memorization.attacks import margins
from at_memorization.analysis.measures import (MEASURES, awp_flatness, compare_checkpoints, distance_from_init,
                                               input_grad_norm, kendall_tau, norm_measures, pacbayes_sharpness,
                                               path_norm, spectral_complexity, weight_matrices)


def two_layer(w1, w2):
    net = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0], bias=False), nn.ReLU(),
                        nn.Linear(w2.shape[1], w2.shape[0], bias=False))
    with torch.no_grad():
        net[0].weight.copy_(w1)
        net[2].weight.copy_(w2)
    return net.double()


W1 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)  # 3 inputs -> 2 hidden
W2 = torch.tensor([[2.0, -1.0], [0.5, 4.0]], dtype=torch.float64)  # 2 hidden -> 2 outputs


def test_linear_layer_with_known_spectral_and_frobenius_norms():
    layer = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([3.0, -2.0, 1.0])))
    norms = norm_measures(layer)
    assert norms["log_prod_spectral"] == pytest.approx(math.log(3.0))
    assert norms["sum_frobenius"] == pytest.approx(math.sqrt(14.0))
    assert norms["log_prod_frobenius"] == pytest.approx(math.log(math.sqrt(14.0)))


def test_two_layer_products_and_sums():
    net = two_layer(W1, W2)
    norms = norm_measures(net)
    fro1, fro2 = math.sqrt((W1 ** 2).sum().item()), math.sqrt((W2 ** 2).sum().item())
    spec1, spec2 = torch.linalg.svdvals(W1)[0].item(), torch.linalg.svdvals(W2)[0].item()
    assert norms["log_prod_frobenius"] == pytest.approx(math.log(fro1 * fro2))
    assert norms["sum_frobenius"] == pytest.approx(fro1 + fro2)
    assert norms["log_prod_spectral"] == pytest.approx(math.log(spec1 * spec2))
    assert [layer["shape"] for layer in norms["layers"]] == [[2, 3], [2, 2]]


def test_path_norm_equals_the_sum_over_paths_computed_by_hand():
    net = two_layer(W1, W2)
    by_hand = sum(W1[h, i].item() ** 2 * W2[o, h].item() ** 2
                  for i, h, o in itertools.product(range(3), range(2), range(2)))
    assert path_norm(net, (3,)) == pytest.approx(by_hand)
    # the model itself is untouched
    assert torch.equal(net[0].weight, W1)


def test_spectral_complexity_by_hand():
    net = two_layer(W1, W2)
    s = [torch.linalg.svdvals(w)[0].item() for w in (W1, W2)]
    l21 = [w.norm(dim=1).sum().item() for w in (W1, W2)]  # ||W^T||_{2,1}: row norms of W
    expected = s[0] * s[1] * ((l21[0] / s[0]) ** (2 / 3) + (l21[1] / s[1]) ** (2 / 3)) ** 1.5
    assert spectral_complexity(net) == pytest.approx(expected)


def test_conv_kernels_are_reshaped_and_a_1x1_conv_matches_a_linear_layer():
    conv = nn.Conv2d(3, 2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(W1.view(2, 3, 1, 1))
    (name, matrix), = weight_matrices(conv)
    assert torch.equal(matrix, W1)
    big = nn.Conv2d(4, 5, 3)
    (_, matrix), = weight_matrices(big)
    assert matrix.shape == (5, 36)
    assert norm_measures(big)["log_prod_spectral"] == pytest.approx(
        math.log(torch.linalg.matrix_norm(big.weight.detach().reshape(5, -1).double(), 2).item()))


def test_distance_from_init():
    net = two_layer(W1, W2)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight[0, 0] += 3.0
        net[2].weight[1, 1] -= 4.0
    assert distance_from_init(net, init) == pytest.approx(5.0)


def test_margins_and_input_gradient_norm_of_a_linear_model():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert margins(logits, torch.tensor([0, 2])).tolist() == [1.0, -4.0]
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W1)
    x = torch.tensor([[0.2, -0.1, 0.4], [1.0, 0.5, -0.3]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    # grad_x CE(Wx, y) = W^T (softmax(Wx) - onehot(y))
    p = torch.softmax(x @ W1.T, dim=1) - torch.nn.functional.one_hot(y, 2)
    expected = (p @ W1).norm(dim=1).mean().item()
    assert input_grad_norm(model, x, y) == pytest.approx(expected)


def test_sharpness_and_flatness_are_zero_without_perturbation_and_grow_with_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.rand(32, 1, 3, 4), torch.randint(0, 3, (32,))
    attack = {"eps": 0.05, "step_size": 0.02, "steps": 2, "norm": "Linf"}
    tiny = pacbayes_sharpness(model, x, y, sigma=1e-12, draws=2, attack_kwargs=attack)
    assert abs(tiny["clean"]) < 1e-6 and abs(tiny["adv"]) < 1e-6
    assert tiny["adv_loss"] >= tiny["clean_loss"]  # the attack raises the loss
    big = pacbayes_sharpness(model, x, y, sigma=0.5, draws=3, attack_kwargs=attack)
    assert big["clean"] > 0.01
    small, large = (awp_flatness(model, x, y, gamma=g, steps=2) for g in (1e-3, 1e-1))
    assert 0 <= small < large


def test_kendall_tau_matches_hand_counts_and_scipy():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # pairs (i<j): (1,2) C, (1,3) C, (1,4) D, (2,3) D, (2,4) D, (3,4) D -> (2 - 4) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 0.5]) == pytest.approx(-1 / 3)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [3.0, 1.0, 1.0, 5.0, 2.0], [0.2, 0.1, 0.3, 0.9, 0.9]
    assert kendall_tau(a, b) == pytest.approx(scipy_stats.kendalltau(a, b).statistic)
    # None (an undefined, vacuous measure) ranks as the largest value
    assert kendall_tau([None, 1.0, 2.0], [3.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_compare_checkpoints_ranks_every_measure_against_the_gap():
    def fake(name, gap, value):
        return {"checkpoint": name, "gaps": {"robust_gap": gap},
                "measures": {m: value if m != "awp_flatness" else -value for m in MEASURES}}

    ranking = compare_checkpoints([fake("a", 0.1, 1.0), fake("b", 0.3, 3.0), fake("c", 0.2, 2.0)])
    assert ranking["target_ranks"] == [3, 1, 2]
    assert ranking["measures"]["path_norm"]["ranks"] == [3, 1, 2]
    assert ranking["measures"]["path_norm"]["kendall_tau"] == pytest.approx(1.0)
    assert ranking["measures"]["awp_flatness"]["kendall_tau"] == pytest.approx(-1.0)
