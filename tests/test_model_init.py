"""Models' initialization matches the reference codes' (per layer type: distribution and scale).

* WideResNet (wrn34_10, wrn28_10): the paper's official dongyp13/memorization-AT
  ``models/wideresnet.py``, TRADES' ``models/wideresnet.py`` and Rice et al.'s
  locuslab/robust_overfitting ``wideresnet.py``: Conv2d weight N(0, 2 / (k*k*out_channels))
  (He-normal, fan_out), BatchNorm weight 1 / bias 0, Linear bias 0, Linear weight PyTorch's default.
* PreActResNet-18 (robust_overfitting ``preactresnet.py``) and ResNet-18 (memorization-AT
  ``models/resnet.py``): no init loop, i.e. PyTorch's defaults: Conv2d/Linear weight
  kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in); Linear bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BatchNorm weight 1 / bias 0.

Models are only constructed (no forward pass), with a fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import at_memorization  # noqa: F401  (registers the models)
from at_memorization.models import OUR_MODELS, build_model

WRN_MODELS = sorted(name for name in OUR_MODELS if name.startswith("wrn"))
DEFAULT_INIT_MODELS = ("preactresnet18", "resnet18_cifar")

# A layer with at least this many weights gets the tight tolerance: the relative standard error of
# a sample std is about 1/sqrt(2n) (normal) or sqrt(0.8/(4n)) (uniform), i.e. <0.5% here.
LARGE = 20_000
STD_TOLERANCE = 0.03


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10, in_chans=3, img_size=32)


def _std_tolerance(n: int) -> float:
    # small layers (e.g. the 3->16 stem: 432 weights): six standard errors of a sample std
    return STD_TOLERANCE if n >= LARGE else max(STD_TOLERANCE, 6.0 / math.sqrt(2 * n))


def _fan_in(weight: torch.Tensor) -> int:
    return weight[0].numel()


@pytest.fixture(scope="module", params=WRN_MODELS)
def wrn(request):
    return request.param, _build(request.param)


@pytest.fixture(scope="module", params=DEFAULT_INIT_MODELS)
def default_init_model(request):
    return request.param, _build(request.param)


def test_wide_resnets_are_registered():
    assert "wrn34_10" in WRN_MODELS and "wrn28_10" in WRN_MODELS


def test_wrn_convs_are_he_normal_fan_out(wrn):
    name, model = wrn
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs
    large = 0
    for layer, conv in convs:
        w = conv.weight.detach().double().flatten()
        k = conv.kernel_size[0] * conv.kernel_size[1]
        expected = math.sqrt(2.0 / (k * conv.out_channels))
        n = w.numel()
        std = w.std().item()
        assert abs(std / expected - 1) < _std_tolerance(n), (name, layer, std, expected)
        assert abs(w.mean().item()) < 6 * expected / math.sqrt(n), (name, layer, w.mean().item())
        if n >= LARGE:
            large += 1
            # Normal, not uniform with that std: P(|z| > sqrt(3)) = 8.33% (a uniform never exceeds it).
            tail = (w.abs() > math.sqrt(3) * expected).double().mean().item()
            assert 0.075 < tail < 0.092, (name, layer, tail)
    assert large >= len(convs) - 2  # all but the 3->16 stem and the 16->160 1x1 shortcut


def test_wrn_320_and_640_convs_have_the_reference_std(wrn):
    """The issue's numbers: a 320->320 3x3 conv starts with std sqrt(2/2880) = 0.0263 (default: 0.0108)."""
    name, model = wrn
    for width in (320, 640):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)
                 and m.in_channels == m.out_channels == width and m.kernel_size == (3, 3)]
        assert len(convs) >= 3, (name, width)
        for conv in convs:
            expected = math.sqrt(2.0 / (9 * width))
            assert conv.weight.std().item() == pytest.approx(expected, rel=STD_TOLERANCE)
    assert math.sqrt(2.0 / (9 * 320)) == pytest.approx(0.02635, abs=1e-5)


def test_wrn_batchnorm_and_linear(wrn):
    name, model = wrn
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    fc = linears[0]
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))  # exactly zero
    # the weight stays at PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
    bound = 1.0 / math.sqrt(fc.in_features)
    assert fc.weight.abs().max().item() <= bound
    assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_default_init_models_keep_pytorch_defaults(default_init_model):
    """PreActResNet-18 / ResNet-18: the references have no init loop, so neither do we."""
    name, model = default_init_model
    checked = 0
    for layer, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach().double()
            bound = 1.0 / math.sqrt(_fan_in(w))
            n = w.numel()
            assert w.abs().max().item() <= bound, (name, layer)  # uniform, not He-normal
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=_std_tolerance(n)), (name, layer)
            if n >= LARGE:
                checked += 1
                # a He-normal fan_out init would put ~8% of the weights beyond sqrt(3) * std
                assert w.abs().max().item() > 0.99 * bound, (name, layer)
            if module.bias is not None:  # only the classifier has one
                b = module.bias.detach()
                assert b.abs().max().item() <= bound and b.abs().min().item() > 0, (name, layer)
        elif isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    assert checked >= 15, name
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 1 and linear[0].bias is not None
