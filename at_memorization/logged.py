"""The per-epoch values a method or extension logs for people to watch, declared next to the code that
logs them (``Method.logged``, ``Extension.logged``), so that core code shows them without naming any:
the train command's epoch line prints every declared value a record holds, and ``at-mem plot`` gives
each one marked ``plot`` a panel of its own.

Torch-free: the method catalog (method_catalog.py) caches the declarations for processes that have
not imported a method class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoggedValue:
    key: str  # the record's key (what on_epoch_start returns)
    label: str  # its name in words, the plot panel's axis label
    aliases: tuple[str, ...] = ()  # the keys earlier runs logged it under (plots read those too)
    plot: bool = True  # a panel of its own in ``at-mem plot``
