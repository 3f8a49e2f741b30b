"""at-memorization: adversarial training that memorizes (Dong et al., ICLR 2022).

Importing the package imports neither torch nor timm: our CIFAR/MNIST backbones are registered in
timm's registry when timm is imported (at once if it already was; ``_compat.install_import_hooks``),
so ``import at_memorization; import timm; timm.create_model("preactresnet18")`` works, and the
``at-mem`` CLI starts fast. ``build_model``, ``load_model``, ``robustbench_protocol`` and the drop-in
temporal-ensembling API (``TELoss``, ``TEPGD``, ``WithIndex``, ``without_index``, ``te_penalty``;
docs/drop_in.md, from the bundled plugin) are imported on first use.
"""

__version__ = "0.1.0"

from ._compat import install_import_hooks

# From here on a plain `import robustbench` works (docs/robustbench.md), and timm, imported before or
# after, holds our backbones. Nothing is imported for it now, and no warning filter is set.
install_import_hooks()
del install_import_hooks

# The drop-in temporal-ensembling API (docs/drop_in.md), from the bundled plugin on first use.
_TE_EXPORTS = ("TELoss", "TEPGD", "WithIndex", "te_penalty", "without_index")

__all__ = [*_TE_EXPORTS, "build_model", "load_model", "robustbench_protocol", "__version__"]


def load_model(checkpoint_path):
    """The trained model of one of our checkpoints, in eval mode on the CPU.

    Loads with ``torch.load(weights_only=True)`` and checks that the file is ours.
    """
    from .checkpoint import build_model_from_checkpoint, load_checkpoint

    return build_model_from_checkpoint(load_checkpoint(checkpoint_path), path=checkpoint_path)


def __getattr__(name):
    if name == "build_model":
        from .models import build_model

        return build_model
    if name in _TE_EXPORTS:
        from .plugins import temporal_ensembling

        return getattr(temporal_ensembling, name)
    if name == "robustbench_protocol":
        from .evaluation import robustbench_protocol

        return robustbench_protocol
    raise AttributeError(f"module 'at_memorization' has no attribute {name!r}")
