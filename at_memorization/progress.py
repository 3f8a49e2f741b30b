"""Progress of long work (training steps, evaluation batches, AutoAttack): done/total, rate, ETA.

On a terminal the line is redrawn in place; when the output is a file or a pipe (a cluster log,
``nohup``), a full line is written every ``interval`` seconds and at the end, so a log shows signs
of life without one line per step. Torch-free and tiny: the CLI and the library both use it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``Progress("epoch 3", total=390, unit="steps")``; ``advance(n)``, ``note(text)``, ``close()``."""

    def __init__(self, label: str, total: int | None, *, unit: str = "steps", out: TextIO | None = None,
                 interval: float = 30.0, clock=time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.out = out if out is not None else sys.stderr
        self.interactive = bool(getattr(self.out, "isatty", lambda: False)())
        self.interval = interval if not self.interactive else 0.2
        self.clock = clock
        self.start = self.last_shown = clock()
        self.done = 0
        self.extra = ""
        self.closed = False

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"{self.label}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            eta = (self.total - self.done) / rate if rate > 0 else None
        else:
            text, eta = f"{self.label}: {self.done} {self.unit}", None
        text += f", {rate:.3g} {self.unit}/s, {_duration(elapsed)} elapsed"
        if eta is not None and self.done < (self.total or 0) and not self.closed:
            text += f", ETA {_duration(eta)}"
        return text + (f"; {self.extra}" if self.extra else "")

    def _show(self, final: bool = False) -> None:
        text = self.line()
        if self.interactive:
            self.out.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.last_shown = self.clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.clock() - self.last_shown >= self.interval:
            self._show()

    __call__ = advance  # usable wherever a plain ``callback(n)`` is expected

    def note(self, extra: str) -> None:
        """A short status shown after the counts (e.g. "27 of 32 still robust")."""
        self.extra = extra
        if self.clock() - self.last_shown >= self.interval:
            self._show()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._show(final=True)
