"""at-memorization: adversarial training that memorizes (Dong et al., ICLR 2022).

Importing the package registers our CIFAR/MNIST backbones in timm's registry. ``TELoss`` (the
temporal-ensembling drop-in loss) comes from the bundled plugin and is imported on first use.
"""

__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the backbones in timm)
from .models import build_model

__all__ = ["TELoss", "TEPGD", "build_model", "__version__"]


def __getattr__(name):
    if name in ("TELoss", "TEPGD"):
        from .plugins import temporal_ensembling

        return getattr(temporal_ensembling, name)
    raise AttributeError(f"module 'at_memorization' has no attribute {name!r}")
