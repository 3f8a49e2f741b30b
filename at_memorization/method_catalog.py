"""What ``at-mem`` needs to know about every installed training method, without importing one.

``at-mem methods`` prints each method's description and settings, ``at-mem train`` has one option
per setting of every installed method and prints the values they declare in ``logged`` on its epoch
lines, and ``at-mem plot`` plots those. All need the method classes' declarations, but loading a
class imports torch (seconds). So the first call loads the classes and writes what they declare
(description, ``Hyperparameter`` and ``LoggedValue`` declarations as plain values, the defaults for
the paper's 200 epochs) to a small JSON file in the user's cache folder; later calls read that file instead.

The file is ``$XDG_CACHE_HOME/at-memorization/methods-<key>.json`` (``~/.cache/...`` without
``XDG_CACHE_HOME``; ``AT_MEM_CACHE_DIR`` names another folder). ``<key>`` hashes this package's
version, the Python environment and every ``at_memorization.methods`` entry point (name, value,
distribution and its version), as ``importlib.metadata`` reports them without importing any plugin
code. The file also records the size and modification time of the source files the classes came
from (the modules of the entry points' top-level packages), so editing a method in an editable
install is noticed too. A file that is stale, unreadable or not what this module writes is rebuilt
silently. Nothing is written while a plugin fails to load (it is reported as before and tried again
at the next call), nor when no cache folder is writable: then every call loads the classes, slower
but the same. ``AT_MEM_NO_CACHE=1`` bypasses the file altogether.

This module imports neither torch nor the methods package until it has to load the classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from .logged import LoggedValue
from .settings import Hyperparameter

GROUP = "at_memorization.methods"  # = methods.registry.GROUP (tests/test_cli_startup.py checks)
FORMAT = 2  # of the cache file; a file of another format is rebuilt
PAPER_EPOCHS = 200  # the defaults `at-mem methods` shows are for the paper's 200 epochs

_TYPES = {t.__name__: t for t in (int, float, str, bool, list)}
# Every declared field of a Hyperparameter except ``derived``: a function, run by the method when it is
# built (never by the CLI, which only parses and shows); the cache records that it is derived.
_FIELDS = tuple(f.name for f in dataclasses.fields(Hyperparameter) if f.name != "derived")


@dataclass(frozen=True)
class MethodInfo:
    """One installed method as ``at-mem`` shows it."""

    name: str
    value: str  # the entry point's "module:attribute"
    distribution: str  # the installed distribution that declares it
    description: str = ""
    options: str = ""  # its settings and their defaults for 200 epochs: "--beta 6.0 --te-start 90"
    hyperparameters: tuple[Hyperparameter, ...] = ()
    logged: tuple[LoggedValue, ...] = ()  # the per-epoch values it logs for people to watch
    error: str | None = None  # "TypeError: ...": the class fails to load (nothing else is known)

    @property
    def module(self) -> str:
        return self.value.split(":")[0]


def method_catalog() -> list[MethodInfo]:
    """Every installed method, sorted by name: from the cache file when it is current, else from the
    classes themselves (then the file is written for the next call)."""
    declared = _declared()
    path = cache_path(declared)
    if path is not None:
        cached = _read(path, _key(declared))
        if cached is not None:
            return cached
    methods = _load_classes()
    if path is not None:
        _write(path, declared, methods)
    return methods


def hyperparameter_owners(methods: list[MethodInfo] | None = None) -> dict[str, tuple[Hyperparameter, list[str]]]:
    """Every installed method's settings by name, with the methods declaring each (for the CLI's
    options), without loading a class. Methods that fail to load contribute nothing."""
    found: dict[str, tuple[Hyperparameter, list[str]]] = {}
    for method in method_catalog() if methods is None else methods:
        for h in method.hyperparameters:
            found.setdefault(h.name, (h, []))[1].append(method.name)
    return found


def logged_values(methods: list[MethodInfo] | None = None) -> list[LoggedValue]:
    """The per-epoch values every installed method declares (``Method.logged``), each key once (the
    first declaration wins), without loading a class."""
    found: dict[str, LoggedValue] = {}
    for method in method_catalog() if methods is None else methods:
        for value in method.logged:
            found.setdefault(value.key, value)
    return list(found.values())


def cache_folder() -> Path | None:
    """Where the catalog file goes; None with ``AT_MEM_NO_CACHE`` set (to anything but 0)."""
    if os.environ.get("AT_MEM_NO_CACHE", "0") not in ("", "0"):
        return None
    if os.environ.get("AT_MEM_CACHE_DIR"):
        return Path(os.environ["AT_MEM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, or relative (which the XDG specification says to ignore)
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home folder
            return None
    return Path(base) / "at-memorization"


def cache_path(declared: list[tuple[str, str, str, str]] | None = None) -> Path | None:
    """The catalog file of this environment and its installed methods (None: no caching)."""
    folder = cache_folder()
    return None if folder is None else folder / f"methods-{_key(_declared() if declared is None else declared)}.json"


# --------------------------------------------------------------------------- internals
def _declared() -> list[tuple[str, str, str, str]]:
    """(name, value, distribution, its version) of every method entry point, as the registry's
    ``discover`` reads them (the first of a name wins), without importing any of them."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        found.setdefault(ep.name, (ep.name, ep.value, getattr(dist, "name", None) or "?",
                                   getattr(dist, "version", None) or "?"))
    return [found[name] for name in sorted(found)]


def _key(declared) -> str:
    from . import __version__

    identity = {"format": FORMAT, "package": __version__, "python": sys.version, "prefix": sys.prefix,
                "methods": declared}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _load_classes() -> list[MethodInfo]:
    """The catalog from the classes themselves (imports them, and torch)."""
    from .methods.base import MethodError, TrainingSetup
    from .methods.registry import discover

    paper_setup = TrainingSetup(num_samples=1, num_classes=10, epochs=PAPER_EPOCHS)
    methods = []
    for entry in discover().values():
        try:
            cls = entry.load()
            description = cls.description
            try:
                defaults = cls(paper_setup).settings
            except MethodError:  # e.g. a method for another threat model: its declared defaults
                defaults = {h.name: "derived" if h.default is None else h.default for h in cls.hyperparameters}
            options = " ".join(f"{h.flag} {defaults.get(h.name)!s}" for h in cls.hyperparameters)
            # the declarations as plain data: a derivation runs in the method, never here
            declared = tuple(dataclasses.replace(h, derived=None) for h in cls.hyperparameters)
            methods.append(MethodInfo(entry.name, entry.value, entry.distribution, str(description), options,
                                      declared, tuple(cls.logged)))
        except Exception as error:  # a broken plugin is reported, not fatal
            methods.append(MethodInfo(entry.name, entry.value, entry.distribution,
                                      error=f"{type(error).__name__}: {error}"))
    return methods


def _hyperparameter_to_dict(h: Hyperparameter) -> dict:
    values = {name: getattr(h, name) for name in _FIELDS}
    values["type"] = h.type.__name__
    values["choices"] = None if h.choices is None else list(h.choices)
    return values


def _hyperparameter_from_dict(values: dict) -> Hyperparameter:
    values = {name: values[name] for name in _FIELDS}
    values["type"] = _TYPES[values["type"]]
    values["choices"] = None if values["choices"] is None else tuple(values["choices"])
    return Hyperparameter(**values)


def _method_to_dict(method: MethodInfo) -> dict:
    return {"name": method.name, "value": method.value, "distribution": method.distribution,
            "description": method.description, "options": method.options,
            "hyperparameters": [_hyperparameter_to_dict(h) for h in method.hyperparameters],
            "logged": [dataclasses.asdict(value) for value in method.logged]}


def _method_from_dict(values: dict) -> MethodInfo:
    texts = [values[name] for name in ("name", "value", "distribution", "description", "options")]
    if not all(isinstance(text, str) for text in texts):
        raise TypeError("not text")
    return MethodInfo(*texts, hyperparameters=tuple(_hyperparameter_from_dict(h) for h in values["hyperparameters"]),
                      logged=tuple(LoggedValue(v["key"], v["label"], tuple(v["aliases"]), v["plot"])
                                   for v in values["logged"]))


def _sources(methods: list[MethodInfo]) -> list[list]:
    """[path, mtime_ns, size] of every loaded module of the entry points' top-level packages."""
    packages = {method.module.split(".")[0] for method in methods}
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and name.split(".")[0] in packages:
            stat = os.stat(path)
            found.append([path, stat.st_mtime_ns, stat.st_size])
    return sorted(found)


def _read(path: Path, key: str) -> list[MethodInfo] | None:
    """The cached catalog, or None when the file is missing, stale or unreadable (then it is rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["format"] != FORMAT or data["key"] != key:
            return None
        for source, mtime_ns, size in data["sources"]:
            stat = os.stat(source)
            if (stat.st_mtime_ns, stat.st_size) != (mtime_ns, size):
                return None
        return [_method_from_dict(values) for values in data["methods"]]
    except Exception:  # noqa: BLE001  (missing, truncated, edited by hand, another format: rebuilt)
        return None


def _write(path: Path, declared, methods: list[MethodInfo]) -> None:
    """Write the catalog atomically (readers see the old file or the new one, never a part); skipped
    while a plugin fails to load, for declarations that are not plain data, and on any OSError."""
    if any(method.error for method in methods):
        return
    try:
        for method in methods:
            for h in method.hyperparameters:
                if type(h) is not Hyperparameter or _hyperparameter_from_dict(_hyperparameter_to_dict(h)) != h:
                    return  # e.g. a subclass with more fields: not plain data
        text = json.dumps({"format": FORMAT, "key": _key(declared), "sources": _sources(methods),
                           "methods": [_method_to_dict(method) for method in methods]}, indent=1)
    except (TypeError, ValueError, KeyError, OSError):
        return
    try:
        write_text_atomic(text + "\n", path)
    except OSError:  # a read-only or full disk: no cache, the classes are loaded at every call
        pass
