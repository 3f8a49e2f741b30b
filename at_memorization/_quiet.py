"""Keep other packages' deprecation warnings out of the ``at-mem`` CLI's output.

Importing this module installs, process-wide, ``ignore`` filters for the deprecation warnings that
other packages' code raises: ``DeprecationWarning``, ``PendingDeprecationWarning`` and
``FutureWarning`` attributed to any module outside ``at_memorization`` (e.g. torch's
"`torch.jit.interface` is deprecated", emitted while timm is imported), and the
"pkg_resources is deprecated" ``UserWarning`` of setuptools (robustbench imports pkg_resources).
Nothing else is touched: warnings attributed to our own code, every other category, and errors stay
as they are.

It is imported by the CLI only, first (``at_memorization.cli`` and ``__main__``): the package's
``__init__`` imports neither timm nor torch, so the filters are in place before they are imported.
Importing ``at_memorization`` as a library leaves the warning filters alone.

When the user asked for warnings explicitly (``python -W ...``, ``PYTHONWARNINGS``, ``-X dev``),
nothing is installed, so ``python -W default -m at_memorization ...`` shows them all again.
"""

from __future__ import annotations

import os
import sys
import warnings

# Matches every module name except ours (``at_memorization`` and its submodules).
OTHER_PACKAGES = r"(?!at_memorization(\.|$))"
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
PKG_RESOURCES_MESSAGE = r"pkg_resources is deprecated"


def warnings_requested() -> bool:
    """Whether the user chose the warning filters (``-W``, ``PYTHONWARNINGS`` or ``-X dev``)."""
    from_environment = bool(os.environ.get("PYTHONWARNINGS")) and not sys.flags.ignore_environment
    return bool(sys.warnoptions) or from_environment or bool(sys.flags.dev_mode)


def install() -> bool:
    """Add the filters (again is harmless: the warnings module keeps one copy); False when the user
    asked for warnings explicitly."""
    if warnings_requested():
        return False
    for category in DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=OTHER_PACKAGES)
    warnings.filterwarnings("ignore", message=PKG_RESOURCES_MESSAGE, category=UserWarning)
    return True


install()
