"""``python -m at_memorization`` is the ``at-mem`` CLI (also under torchrun)."""

from . import _quiet  # noqa: F401  (first: keeps third-party deprecation warnings out of CLI output)
from .cli import main

main(prog_name="at-mem")
