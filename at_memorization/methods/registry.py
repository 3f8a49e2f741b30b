"""One registry of training methods, fed by the entry-point group ``at_memorization.methods``.

Built-in methods register through the same entry points as plugins (see setup.cfg), so there is
no list of names in the code: a third-party package adds a method by declaring::

    [options.entry_points]
    at_memorization.methods =
        my-method = my_package.module:MyMethod
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from .base import Method
from ..user_errors import UserError

GROUP = "at_memorization.methods"


class UnknownMethodError(UserError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class MethodEntry:
    name: str
    value: str  # "module:attribute"
    distribution: str  # the installed distribution that declares it

    @property
    def module(self) -> str:
        return self.value.split(":")[0]

    def load(self) -> type[Method]:
        cls = EntryPoint(self.name, self.value, GROUP).load()
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"entry point {self.name} = {self.value} is not a Method subclass")
        return cls


def discover(eps=None) -> dict[str, MethodEntry]:
    """All declared methods; ``eps`` (entry points) can be given for tests."""
    found = {}
    for ep in entry_points(group=GROUP) if eps is None else eps:
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        found.setdefault(ep.name, MethodEntry(ep.name, ep.value, dist))
    return dict(sorted(found.items()))


def get_method(name: str) -> type[Method]:
    methods = discover()
    if name not in methods:
        raise UnknownMethodError(f"unknown method {name!r}; installed methods: {', '.join(methods) or 'none'}")
    return methods[name].load()

