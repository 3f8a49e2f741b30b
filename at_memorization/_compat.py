"""Make RobustBench 1.1.1 from PyPI importable and usable.

Three things are broken in a plain ``pip install robustbench`` (see the project's ECOSYSTEM notes):

1. robustbench imports a module named ``autoattack``; PyPI's AutoAttack (``pyautoattack``) installs
   as ``pyautoattack``. We register an ``autoattack`` module that forwards to ``pyautoattack``.
2. pyautoattack 0.2 changed the API that ``robustbench.eval.benchmark`` still calls (``log_path=``,
   ``bs=``, a single returned tensor). The ``autoattack.AutoAttack`` we register is a thin adapter
   that accepts the old keywords and returns only ``x_adv``.
3. torchattacks ships a stripped copy of ``robustbench/`` that overwrites robustbench's own files
   when torchattacks is installed after it. We cannot repair files at run time, so we detect it
   (file hashes against robustbench's own RECORD) and raise one clear error that names the fix.

Call :func:`import_robustbench` instead of ``import robustbench`` anywhere in the package.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import sys
import types
import warnings
from pathlib import Path

ROBUSTBENCH_FIX = "pip install --force-reinstall --no-deps robustbench==1.1.1"
# Files whose torchattacks copy differs from robustbench's own (eval.py is commented out there).
_CHECKED_FILES = ("robustbench/eval.py", "robustbench/utils.py")


class RobustBenchUnavailable(RuntimeError):
    """RobustBench cannot be used as installed; the message says how to fix it."""


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


def _install_autoattack_alias() -> None:
    if "autoattack" in sys.modules and getattr(sys.modules["autoattack"], "_at_mem_alias", False):
        return
    try:
        import pyautoattack
        import pyautoattack.state
    except ImportError as error:  # pragma: no cover - install problem
        raise RobustBenchUnavailable(
            f"pyautoattack is not installed ({error}); run: pip install 'pyautoattack>=0.2.0'"
        ) from error
    alias = types.ModuleType("autoattack")
    alias.__dict__.update({k: v for k, v in vars(pyautoattack).items() if not k.startswith("__")})
    alias.AutoAttack = LegacyAutoAttack
    alias.state = pyautoattack.state
    alias._at_mem_alias = True
    alias.__path__ = []  # a package, so that ``import autoattack.state`` resolves via sys.modules
    sys.modules["autoattack"] = alias
    sys.modules["autoattack.state"] = pyautoattack.state


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


def import_robustbench(submodule: str = "") -> types.ModuleType:
    """Import ``robustbench`` (or ``robustbench.<submodule>``) after applying the fixes above."""
    _install_autoattack_alias()
    check_robustbench_files()
    try:
        with warnings.catch_warnings():  # its deprecation warning is robustbench's business
            warnings.simplefilter("ignore")
            import pkg_resources  # noqa: F401  (robustbench.loaders needs it)
    except ImportError as error:
        raise RobustBenchUnavailable(
            "robustbench needs pkg_resources, which setuptools>=82 removed; run: "
            "pip install 'setuptools<82'"
        ) from error
    name = f"robustbench.{submodule}" if submodule else "robustbench"
    return importlib.import_module(name)
