"""at-memorization: adversarial training that memorizes (Dong et al., ICLR 2022).

Importing the package registers our CIFAR/MNIST backbones in timm's registry. ``TELoss`` (the
temporal-ensembling drop-in loss) comes from the bundled plugin and is imported on first use.
"""

__version__ = "0.1.0"

from . import models  # noqa: F401  (registers the backbones in timm)
from .models import build_model

__all__ = ["TELoss", "TEPGD", "build_model", "load_model", "__version__"]


def load_model(checkpoint_path):
    """The trained model of one of our checkpoints, in eval mode on the CPU.

    Loads with ``torch.load(weights_only=True)`` and checks that the file is ours.
    """
    from .checkpoint import build_model_from_checkpoint, load_checkpoint

    return build_model_from_checkpoint(load_checkpoint(checkpoint_path), path=checkpoint_path)


def __getattr__(name):
    if name in ("TELoss", "TEPGD"):
        from .plugins import temporal_ensembling

        return getattr(temporal_ensembling, name)
    raise AttributeError(f"module 'at_memorization' has no attribute {name!r}")
