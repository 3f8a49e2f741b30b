"""CIFAR/MNIST backbones registered in timm's registry, as timm registers its own.

Importing this module registers them: one decorated entry point per backbone (timm's
``register_model``), the function named as the model (described, with its parameter count, in
model_catalog.py), and RobustBench's names for them, ``<name>_<dataset>_<threat>``, declared in
``ROBUSTBENCH_NAMES``. So after
``import at_memorization`` (which imports this module when timm is imported),
``timm.create_model('preactresnet18', num_classes=10)`` and
``timm.create_model('smallcnn', num_classes=10, in_chans=1)`` build our models, and
``robustbench.utils.load_model(name, dataset=..., threat_model=..., custom_checkpoint=path)`` loads one
of our checkpoints offline. Run again (our package imported anew in one process), the module
registers the same names again: timm replaces each entry point by the new one.

All models take inputs in [0, 1] and return logits of shape (N, num_classes); as in the paper's
code, none normalizes its input (the attacks' epsilon is in pixel units of [0, 1] images).
"""

from __future__ import annotations

import math
import warnings

import timm
import torch
from torch import nn
import torch.nn.functional as F
from timm.models import model_entrypoint, register_model

from . import model_catalog
from .user_errors import UserError


def _stage(model: nn.Module, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """One ResNet stage: ``num_blocks`` blocks, the first with ``stride``; tracks ``model.in_planes``."""
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
        layers.append(block(model.in_planes, planes, s))
        model.in_planes = planes
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- PreAct ResNet
class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """He et al. 2016, CIFAR variant (3x3 stride-1 stem), as in the paper's code.

    Initialization: PyTorch's defaults, as in the reference, Rice et al.'s
    locuslab/robust_overfitting ``preactresnet.py`` (commit 263b826; kuangliu's pytorch-cifar model),
    which has no init loop: Conv2d/Linear weights kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)),
    std 1/sqrt(3 fan_in); Linear bias U(+-1/sqrt(fan_in)); BatchNorm weight 1, bias 0.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3,
                 width: int = 64):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.layer1 = _stage(self, PreActBlock, width, num_blocks[0], 1)
        self.layer2 = _stage(self, PreActBlock, 2 * width, num_blocks[1], 2)
        self.layer3 = _stage(self, PreActBlock, 4 * width, num_blocks[2], 2)
        self.layer4 = _stage(self, PreActBlock, 8 * width, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(8 * width)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --------------------------------------------------------------------------- ResNet (CIFAR stem)
class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (timm's ResNets assume 224x224).

    Initialization: PyTorch's defaults, as in the references, the paper's official
    dongyp13/memorization-AT ``models/resnet.py`` (commit 5edda6c) and TRADES' ``models/resnet.py``
    (yaodongyu/TRADES commit 6e8e11b), both kuangliu's pytorch-cifar ResNet with no init loop.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(self, BasicBlock, 64, num_blocks[0], 1)
        self.layer2 = _stage(self, BasicBlock, 128, num_blocks[1], 2)
        self.layer3 = _stage(self, BasicBlock, 256, num_blocks[2], 2)
        self.layer4 = _stage(self, BasicBlock, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------- WideResNet
class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal_in_out else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis 2016, as used by Madry et al. / TRADES (WRN-depth-widen).

    Initialized as the references do: the paper's official dongyp13/memorization-AT
    ``models/wideresnet.py`` (commit 5edda6c), TRADES' ``models/wideresnet.py`` (yaodongyu/TRADES
    commit 6e8e11b) and Rice et al.'s ``wideresnet.py`` (locuslab/robust_overfitting commit 263b826):
    every Conv2d weight N(0, 2 / (k*k*out_channels)) (He-normal, fan_out), BatchNorm weight 1 and
    bias 0, Linear bias 0 and Linear weight left at PyTorch's default. The modules are visited in the
    same order as there, so a given seed gives the official code's weights.
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for i, stride in enumerate((1, 2, 2)):
            for j in range(n):
                blocks.append(WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1], stride if j == 0 else 1))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                with torch.no_grad():
                    module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --------------------------------------------------------------------------- SmallCNN
class SmallCNN(nn.Module):
    """The TRADES paper's small CNN (4 conv + 3 fc); works on 28x28 and 32x32 inputs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2),
            # 28x28 inputs reach 4x4 here already; 32x32 inputs reach 5x5 and are pooled to 4x4.
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(drop_rate),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        # After TRADES' small_cnn.py (yaodongyu/TRADES@6e8e11b), which He-initializes the convolutions
        # (zero bias) and zeroes the last layer; unlike it, fc1 and fc2 are He-initialized here too
        # (TRADES leaves them at PyTorch's default). Kept: the committed MNIST studies were run with
        # it (docs/differences.md). Without such an init this BN-free ReLU stack barely trains.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.classifier[-1].weight)

    def forward(self, x):
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- registration
def _register_model(entrypoint):
    """timm's ``register_model``, without its "Overwriting" warning where the entry point it replaces
    is one of this module's from an earlier run (a clash with another package's name still warns)."""
    name = entrypoint.__name__
    if not (timm.is_model(name) and model_entrypoint(name).__module__ == __name__):
        return register_model(entrypoint)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", f"Overwriting {name} in registry", UserWarning)
        return register_model(entrypoint)


# timm calls an entry point with pretrained, pretrained_cfg and pretrained_cfg_overlay, which ours
# ignore: they have no pretrained weights to fetch (RobustBench passes pretrained=True along with its
# checkpoint_path, which timm loads into the built model).
def _arguments(kwargs: dict) -> dict:
    """timm's model arguments as our classes take them: 10 classes and 3 input channels unless given,
    and no ``img_size`` (global pooling adapts every one of them to the input size)."""
    kwargs.pop("img_size", None)
    return {"num_classes": 10, "in_chans": 3, **kwargs}


@_register_model
def preactresnet18(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), **_arguments(kwargs))


@_register_model
def preactresnet18_w16(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> PreActResNet:
    """A quarter-width PreActResNet-18 (16 base channels) for CPU-scale studies."""
    return PreActResNet((2, 2, 2, 2), width=16, **_arguments(kwargs))


@_register_model
def resnet18_cifar(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), **_arguments(kwargs))


@_register_model
def wrn34_10(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> WideResNet:
    return WideResNet(34, 10, **_arguments(kwargs))


@_register_model
def wrn28_10(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> WideResNet:
    return WideResNet(28, 10, **_arguments(kwargs))


@_register_model
def smallcnn(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs) -> SmallCNN:
    return SmallCNN(**_arguments(kwargs))


# RobustBench looks a model up as f"{name}_{dataset}_{threat}" (lower case) in timm's registry; its
# BenchmarkDataset has cifar10, cifar100 and imagenet only, so other data sets get no such names.
ROBUSTBENCH_NAMES = {
    preactresnet18: ("preactresnet18_cifar10_linf", "preactresnet18_cifar10_l2", "preactresnet18_cifar100_linf",
                     "preactresnet18_cifar100_l2"),
    preactresnet18_w16: ("preactresnet18_w16_cifar10_linf", "preactresnet18_w16_cifar10_l2",
                         "preactresnet18_w16_cifar100_linf", "preactresnet18_w16_cifar100_l2"),
    resnet18_cifar: ("resnet18_cifar_cifar10_linf", "resnet18_cifar_cifar10_l2", "resnet18_cifar_cifar100_linf",
                     "resnet18_cifar_cifar100_l2"),
    wrn34_10: ("wrn34_10_cifar10_linf", "wrn34_10_cifar10_l2", "wrn34_10_cifar100_linf", "wrn34_10_cifar100_l2"),
    wrn28_10: ("wrn28_10_cifar10_linf", "wrn28_10_cifar10_l2", "wrn28_10_cifar100_linf", "wrn28_10_cifar100_l2"),
    smallcnn: ("smallcnn_cifar10_linf", "smallcnn_cifar10_l2", "smallcnn_cifar100_linf", "smallcnn_cifar100_l2"),
}


def _under_name(name: str, backbone):
    """``backbone``'s entry point under another name (timm registers a function under its ``__name__``)."""

    def entrypoint(**kwargs):
        return backbone(**kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{backbone.__name__} under RobustBench's name."
    return entrypoint


for _backbone, _names in ROBUSTBENCH_NAMES.items():
    for _name in _names:
        _register_model(_under_name(_name, _backbone))

# Our backbones' entry points by name: the catalog's names, each registered above.
OUR_MODELS = {name: model_entrypoint(name) for name in model_catalog.MODELS}

# The public names. (timm's register_model appends every name it registers to __all__, RobustBench's
# names too, which are no attributes of this module: ``from at_memorization.models import *`` would
# fail on them.)
__all__ = ["OUR_MODELS", "ROBUSTBENCH_NAMES", "build_model", "count_parameters", "model_names", *OUR_MODELS]


def model_names() -> list[str]:
    """Our backbones (any other timm model name is accepted too)."""
    return model_catalog.model_names()


class UnknownModelError(UserError, ValueError):
    pass


def build_model(name: str, num_classes: int, in_chans: int = 3, img_size: int = 32,
                drop_rate: float | None = None) -> nn.Module:
    """Build any timm-registered model for a data set's shape.

    Our models ignore ``img_size``; timm's own models (ViTs, ...) get it so that 32x32 inputs work.
    ``drop_rate`` is timm's dropout argument (None: the model's own default, e.g. 0.5 for smallcnn);
    a model without dropout refuses it.
    """
    if not timm.is_model(name):
        raise UnknownModelError(
            f"unknown model {name!r}: ours are {', '.join(model_names())}; any timm model name also works"
        )
    extra = {} if drop_rate is None else {"drop_rate": drop_rate}
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 img_size=img_size, **extra)
    except TypeError:
        # Most timm CNNs take no img_size; they adapt to any input size by global pooling.
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra)
        except TypeError:
            if not extra:
                raise
            raise UnknownModelError(f"model {name!r} has no dropout to set (--drop-rate)") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
