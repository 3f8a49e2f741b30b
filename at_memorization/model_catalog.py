"""Our backbones in words, for ``at-mem models``: name, one-line description, parameter count.

This module imports nothing (no torch, no timm), so ``at-mem models`` answers at once. Each model is
built by the entry point of its name in :mod:`at_memorization.models`; ``tests/test_models.py`` checks
that the backbones registered there are exactly these and that each count equals
``sum(p.numel() for p in model.parameters())`` of the built model.
"""

from __future__ import annotations

from typing import NamedTuple

# The input the parameter counts are for (only the first and last layers depend on it).
COUNTED_FOR = {"num_classes": 10, "in_chans": 3, "img_size": 32}
COUNTED_FOR_TEXT = "10 classes, 3x32x32 inputs"


class ModelInfo(NamedTuple):
    name: str
    description: str
    parameters: int  # for COUNTED_FOR


MODELS: dict[str, ModelInfo] = {info.name: info for info in (
    ModelInfo("preactresnet18", "PreAct ResNet-18 (He et al. 2016), CIFAR stem: the paper's main backbone",
              11_172_170),
    ModelInfo("preactresnet18_w16", "PreAct ResNet-18 at a quarter of the width (16 base channels), for CPU-scale "
              "studies", 701_018),
    ModelInfo("resnet18_cifar", "ResNet-18 with a 3x3 stride-1 stem and no max-pool (the paper's and TRADES' code)",
              11_173_962),
    ModelInfo("wrn34_10", "WideResNet-34-10 (Zagoruyko & Komodakis 2016), as in Madry et al. and TRADES",
              46_160_474),
    ModelInfo("wrn28_10", "WideResNet-28-10 (Zagoruyko & Komodakis 2016): 28 layers, widen factor 10", 36_479_194),
    ModelInfo("smallcnn", "TRADES' small CNN (4 conv + 3 fc, dropout 0.5) for MNIST-sized inputs", 312_778),
)}


def model_names() -> list[str]:
    """Our backbones, sorted (any other timm model name is accepted too)."""
    return sorted(MODELS)
