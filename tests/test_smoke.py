"""The package imports, registers its models in timm and lists its methods."""

import timm
import torch

import at_memorization
from at_memorization.methods import discover


def test_models_registered_in_timm():
    model = timm.create_model("preactresnet18", num_classes=10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    small = timm.create_model("smallcnn", num_classes=10, in_chans=1)
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_builtin_and_plugin_methods_are_discovered():
    methods = discover()
    assert {"pgd-at", "trades", "pgd-at-te", "trades-te"} <= set(methods)
    assert methods["pgd-at-te"].module.startswith("at_memorization.plugins.temporal_ensembling")
    assert at_memorization.TELoss.__name__ == "TELoss"
