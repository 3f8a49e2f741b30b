"""``python -m at_memorization`` is the ``at-mem`` CLI (also under torchrun)."""

from .cli import main

main(prog_name="at-mem")
