"""at-memorization: adversarial training that memorizes (Dong et al., ICLR 2022).

Importing the package registers our CIFAR/MNIST backbones in timm's registry (the ``at-mem`` CLI
starts without timm and torch and imports them where a command needs them). The drop-in
temporal-ensembling API (``TELoss``, ``TEPGD``, ``WithIndex``, ``without_index``, ``te_penalty``;
docs/drop_in.md) comes from the bundled plugin and is imported on first use.
"""

__version__ = "0.1.0"


def _launched_as_cli() -> bool:
    """Whether this process is the ``at-mem`` CLI: its console script, or ``python -m at_memorization``.

    Python imports this package before the CLI's own modules (``at_memorization.cli``,
    ``__main__``), and importing timm here makes torch raise a deprecation warning, so the CLI's
    warning filters (``_quiet``) must be installed from here. Library imports are left alone.
    """
    import os
    import re
    import sys

    argv0 = sys.argv[0] if sys.argv else ""
    # pip's console scripts strip these suffixes from argv[0] only after importing the entry point.
    if re.sub(r"(-script\.pyw?|\.exe)$", "", os.path.basename(argv0)) == "at-mem":
        return True
    if argv0 != "-m":  # while runpy imports the package of `python -m X`, argv[0] is "-m"
        return False
    orig = list(getattr(sys, "orig_argv", ()))
    for arg, value in zip(orig[1:], orig[2:] + [""]):
        option = re.fullmatch(r"-[bBdEiIOPqsSuv]*m(.*)", arg)  # -m X, -mX, -um X, ...
        if option:
            return (option.group(1) or value) == "at_memorization"
    return False


_AS_CLI = _launched_as_cli()
if _AS_CLI:
    from . import _quiet  # noqa: F401  (before timm and torch are imported, by us or anyone)

from ._compat import install_import_hooks

install_import_hooks()  # a plain `import robustbench` works from here on (docs/robustbench.md)
del install_import_hooks

if not _AS_CLI:  # the CLI starts without timm and torch: its commands import models when they need it
    from . import models  # noqa: F401  (registers the backbones in timm)
    from .models import build_model

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
    if name == "build_model":  # only under the CLI, which did not import models above
        from .models import build_model

        return build_model
    if name in _TE_EXPORTS:
        from .plugins import temporal_ensembling

        return getattr(temporal_ensembling, name)
    if name == "robustbench_protocol":
        from .evaluation import robustbench_protocol

        return robustbench_protocol
    raise AttributeError(f"module 'at_memorization' has no attribute {name!r}")
