"""Every module imports on its own, whichever is imported first: no import cycle can break a user's
``import at_memorization.<module>`` (issue 11; the cli <-> analysis cycle was one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    names = []
    for base, package in ((ROOT / "at_memorization", "at_memorization"), (ROOT / "plugins", "at_memorization.plugins")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and parts[-1] == "__main__":
                continue  # runs the CLI
            names.append(".".join([package, *parts]))
    return names


def test_each_module_imports_first_in_a_fresh_package_state():
    modules = _modules()
    assert "at_memorization.plugins.awp.awp" in modules and "at_memorization.analysis.commands" in modules
    # One process (torch is imported once), our package's modules dropped before each import, so
    # each module is the first of the package to be imported, as in `python -c "import <module>"`.
    script = (
        "import sys, importlib, traceback\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'at_memorization' or m.startswith('at_memorization.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as error:\n"
        "        failed.append(f'{name}: {type(error).__name__}: {error}')\n"
        "print('\\n'.join(failed) or 'ok')\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ok", done.stdout
