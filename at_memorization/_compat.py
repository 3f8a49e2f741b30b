"""Make RobustBench 1.1.1 from PyPI importable and usable, and timm hold our backbones once imported.

Three things are broken in a plain ``pip install robustbench`` (see the project's ECOSYSTEM notes):

1. robustbench imports a module named ``autoattack``; PyPI's AutoAttack (``pyautoattack``) installs
   as ``pyautoattack``. We register an ``autoattack`` module that forwards to ``pyautoattack``.
2. pyautoattack 0.2 changed the API that ``robustbench.eval.benchmark`` still calls (``log_path=``,
   ``bs=``, a single returned tensor). The ``autoattack.AutoAttack`` we register is a thin adapter
   that accepts the old keywords and returns only ``x_adv``.
3. torchattacks ships a stripped copy of ``robustbench/`` that overwrites robustbench's own files
   when torchattacks is installed after it. We cannot repair files at run time, so we detect it
   (file hashes against robustbench's own RECORD) and raise one clear error that names the fix.

Inside the package, call :func:`import_robustbench` instead of ``import robustbench``. For users,
``import at_memorization`` calls :func:`install_import_hooks`, after which a plain ``import robustbench``
works too: two ``sys.meta_path`` finders, cheap to install (nothing is imported until robustbench or
``autoattack`` is):

* at the end of ``sys.meta_path``, the ``autoattack`` alias above. Being last, it is used only when
  no real ``autoattack`` is installed (e.g. fra31's, from GitHub);
* at the front, a check that runs when ``robustbench`` is first imported: files overwritten by
  torchattacks, or ``pkg_resources`` missing, raise :class:`RobustBenchUnavailable` (one line,
  naming the fix) instead of a confusing ImportError from inside robustbench. It never imports
  robustbench itself, and does nothing when robustbench is not installed.

A third finder, also at the front, registers our backbones in timm's registry as soon as ``timm`` is
imported, by anyone (at once, if it already was): ``import at_memorization`` itself imports neither
timm nor torch. See :class:`_TimmRegistration`.

A plain ``import robustbench`` *without* importing at_memorization first still fails with
``No module named 'autoattack'`` (RobustBench issue #211): making it work would need code run at every
interpreter start (a ``.pth`` hook) or a top-level ``autoattack`` package of ours, which would
clash with fra31's ``autoattack`` distribution. See docs/robustbench.md.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from pathlib import Path

from .user_errors import UserError

ROBUSTBENCH_FIX = "pip install --force-reinstall --no-deps robustbench==1.1.1"
# Files whose torchattacks copy differs from robustbench's own (eval.py is commented out there).
_CHECKED_FILES = ("robustbench/eval.py", "robustbench/utils.py")


class RobustBenchUnavailable(UserError, RuntimeError, ImportError):
    """RobustBench cannot be used as installed; the message says how to fix it (one line).

    Also an ImportError, because ``import robustbench`` raises it (after ``import at_memorization``).
    """


class LegacyAutoAttack:
    """pyautoattack 0.2 behind the pre-0.2 interface that robustbench 1.1.1 calls."""

    def __init__(self, model, norm="Linf", eps=0.3, version="standard", device="cpu",
                 log_path=None, verbose=False, attacks_to_run=(), seed=None, **_ignored):
        import pyautoattack

        attacks = list(attacks_to_run) if version == "custom" else None
        self._attack = pyautoattack.AutoAttack(
            model, attacks=attacks, device=device, eps=eps, norm=norm, seed=seed, version=version
        )

    def __getattr__(self, name):
        # Everything else (apgd, attacks_to_run, ...) comes from the real attack.
        return getattr(self._attack, name)

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, state_path=None, return_labels=False):
        x_adv, y_adv = self._attack.run_standard_evaluation(
            x_orig, y_orig, batch_size=bs, state_path=state_path
        )
        return (x_adv, y_adv) if return_labels else x_adv


def _build_autoattack_alias() -> types.ModuleType:
    """The ``autoattack`` module: pyautoattack's names, with ``AutoAttack`` the old-API adapter."""
    try:
        import pyautoattack
        import pyautoattack.state
    except ImportError as error:  # pragma: no cover - install problem
        raise RobustBenchUnavailable(
            f"pyautoattack is not installed ({error}); run: pip install 'pyautoattack>=0.2.0'"
        ) from error
    alias = types.ModuleType("autoattack", "pyautoattack under the name robustbench imports (at_memorization).")
    alias.__dict__.update({k: v for k, v in vars(pyautoattack).items() if not k.startswith("__")})
    alias.AutoAttack = LegacyAutoAttack
    alias.state = pyautoattack.state
    alias._at_mem_alias = True
    alias.__path__ = []  # a package, so that ``import autoattack.state`` resolves via sys.modules
    # pyautoattack's submodules under both names (robustbench imports ``autoattack.state``).
    for name, module in list(sys.modules.items()):
        if name.startswith("pyautoattack.") and module is not None:
            sys.modules.setdefault("autoattack" + name[len("pyautoattack"):], module)
    return alias


def _install_autoattack_alias() -> None:
    """Make ``autoattack`` importable: a real installed one if there is one, else our alias."""
    if "autoattack" in sys.modules:
        return
    install_import_hooks()
    try:
        importlib.import_module("autoattack")  # a real one first; the alias finder is last in line
    except ModuleNotFoundError as error:
        if error.name not in ("autoattack", "pyautoattack"):
            raise
        raise RobustBenchUnavailable(
            "pyautoattack is not installed; run: pip install 'pyautoattack>=0.2.0'"
        ) from error


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _build_autoattack_alias()

    def exec_module(self, module):
        pass


class _AutoAttackAliasFinder(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: ``autoattack`` is our alias only when nothing else provides it."""

    _at_mem_hook = "autoattack-alias"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "autoattack" or importlib.util.find_spec("pyautoattack") is None:
            return None  # without pyautoattack: the usual ModuleNotFoundError
        return importlib.machinery.ModuleSpec("autoattack", _AliasLoader(), is_package=True)


class _RobustBenchPreflight(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: check the installation when ``robustbench`` is first imported."""

    _at_mem_hook = "robustbench-preflight"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "robustbench":
            try:
                importlib.metadata.distribution("robustbench")
            except importlib.metadata.PackageNotFoundError:
                return None  # not installed (or not as a distribution): Python's own error applies
            check_robustbench_files()
            _import_pkg_resources()
        return None  # the normal finders import it


def _register_backbones() -> None:
    """Import ``at_memorization.models``, whose import registers our backbones in timm's registry.

    Cannot recurse: timm is in ``sys.modules`` by now, so the models module's ``import timm`` does not
    reach the finder below again; and when the models module is what imported timm (in this thread:
    it is half run), the import returns it as it is and its own body registers them once timm is
    loaded. In another thread, the import waits for that module to finish (the import lock), so
    ``import timm`` never returns before the backbones are registered.
    """
    importlib.import_module(".models", __package__)


class _RegisterAfterTimm(importlib.abc.Loader):
    """timm's own loader, then ``_register_backbones``."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # timm keeps its own loader (importlib.resources and the like look it up there).
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            _register_backbones()
        except Exception as error:  # noqa: BLE001  (timm itself loaded: our failure must not undo its import)
            warnings.warn(f"at_memorization could not register its backbones in timm ({type(error).__name__}: "
                          f"{error}); timm.create_model will not know them", RuntimeWarning, stacklevel=2)


class _TimmRegistration(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: when ``timm`` is imported, the finders after this one find it, and
    our backbones are registered once its module has run."""

    _at_mem_hook = "timm-registration"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_at_mem_hook", None) == self._at_mem_hook:  # this one, or a copy
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterTimm(spec.loader)
                return spec
        return None  # not installed: Python's own error


def install_import_hooks() -> None:
    """Let a plain ``import robustbench`` work, and timm hold our backbones (idempotent; run by
    ``import at_memorization``).

    Adds the three ``sys.meta_path`` finders described in the module docstring; imports nothing
    unless timm was imported already (then our backbones are registered at once).
    """
    hooks = {getattr(finder, "_at_mem_hook", None) for finder in sys.meta_path}
    if _RobustBenchPreflight._at_mem_hook not in hooks:
        sys.meta_path.insert(0, _RobustBenchPreflight())
    if _AutoAttackAliasFinder._at_mem_hook not in hooks:
        sys.meta_path.append(_AutoAttackAliasFinder())
    if _TimmRegistration._at_mem_hook not in hooks:
        sys.meta_path.insert(0, _TimmRegistration())
    if sys.modules.get("timm") is not None:
        _register_backbones()


def _record_hashes(dist: importlib.metadata.Distribution) -> dict[str, str]:
    hashes = {}
    for line in (dist.read_text("RECORD") or "").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            hashes[parts[0]] = parts[1][len("sha256="):]
    return hashes


def check_robustbench_files() -> None:
    """Raise RobustBenchUnavailable if robustbench's files are not robustbench's own."""
    try:
        dist = importlib.metadata.distribution("robustbench")
    except importlib.metadata.PackageNotFoundError as error:
        raise RobustBenchUnavailable(f"robustbench is not installed; run: {ROBUSTBENCH_FIX}") from error
    expected = _record_hashes(dist)
    for relative in _CHECKED_FILES:
        path = Path(dist.locate_file(relative))
        if relative not in expected:
            continue
        if not path.is_file():
            raise RobustBenchUnavailable(f"{path} is missing; run: {ROBUSTBENCH_FIX}")
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=")
        if digest.decode() != expected[relative]:
            raise RobustBenchUnavailable(
                f"{path} is not robustbench's own file (torchattacks installs a stripped copy of "
                f"robustbench over it); run: {ROBUSTBENCH_FIX}"
            )


def _import_pkg_resources() -> None:
    try:
        with warnings.catch_warnings():  # its deprecation warning is robustbench's business
            warnings.simplefilter("ignore")
            import pkg_resources  # noqa: F401  (robustbench.loaders needs it)
    except ImportError as error:
        raise RobustBenchUnavailable(
            "robustbench needs pkg_resources, which setuptools>=82 removed; run: "
            "pip install 'setuptools<82'"
        ) from error


def import_robustbench(submodule: str = "") -> types.ModuleType:
    """Import ``robustbench`` (or ``robustbench.<submodule>``) after applying the fixes above."""
    _install_autoattack_alias()
    check_robustbench_files()
    _import_pkg_resources()
    name = f"robustbench.{submodule}" if submodule else "robustbench"
    return importlib.import_module(name)
