"""docs/architecture.md stays true (issue 28): its module map has one row per module of the package and
of plugins/, each module imports only the package modules its row allows, and the modules it calls
torch-free import no torch when imported.

Imports are read from the source with ``ast``, never by importing: function-level imports count for
"may import" (a reader follows them as much as the interpreter does), only import-time ones for
"torch-free" (a lazy ``import torch`` inside a function is how a module stays torch-free).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = "at_memorization"
SOURCES = ((ROOT / "at_memorization", PACKAGE), (ROOT / "plugins", f"{PACKAGE}.plugins"))
# Importing any of these imports torch (robustbench and AutoAttack import it at once).
TORCH = ("torch", "torchvision", "timm", "torchattacks", "robustbench", "autoattack", "pyautoattack")
TORCH_FREE_MARKER = "Torch-free modules:"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package and of plugins/ (installed as ``at_memorization.plugins``) by its
    dotted name: (its file, whether it is a package's ``__init__``)."""
    found = {}
    for base, prefix in SOURCES:
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join([prefix, *(parts[:-1] if is_package else parts)])] = (path, is_package)
    return found


MODULES = _modules()


def _package_module(dotted: str) -> str | None:
    """The package module that importing ``dotted`` names: itself, or its longest prefix that is one
    (``at_memorization.records.improves`` -> ``at_memorization.records``); None outside the package."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, import_time_only: bool):
    """The import statements of a module: all of them, or only those that run when it is imported
    (not in a function body, not under ``if TYPE_CHECKING:``)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if import_time_only:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and _is_type_checking(node):
                pending.extend(node.orelse)
                continue
        pending.extend(ast.iter_child_nodes(node))


def _imports(name: str, import_time_only: bool = False) -> dict[str, str]:
    """What module ``name`` imports, as {imported name: the statement, for messages}: package modules
    by their dotted name (relative imports resolved), other packages by their top-level name."""
    path, is_package = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = {}
    for node in _import_nodes(tree, import_time_only):
        statement = ast.unparse(node)
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                origin = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                origin = node.module
            # ``from X import a`` imports the module X.a when there is one, else the name a from X.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES else origin
                       for alias in node.names]
        for target in targets:
            module = _package_module(target)
            if module is None:
                found.setdefault(target.split(".")[0], statement)
            elif module != name:
                found.setdefault(module, statement)
    return found


def _short(name: str) -> str:
    return name.removeprefix(f"{PACKAGE}.") if name != PACKAGE else PACKAGE


def _long(short: str) -> str:
    return short if short == PACKAGE or short.startswith(f"{PACKAGE}.") else f"{PACKAGE}.{short}"


def _doc_table() -> dict[str, set[str]]:
    """The module map: {module: the package modules its row says it may import}."""
    rows, in_table = {}, False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:3] == ["module", "owns", "may import"]:
            in_table = True
        elif in_table and not cells:
            break
        elif in_table and not set(cells[0]) <= set("-: "):
            module = _long(cells[0].strip("`"))
            assert module not in rows, f"docs/architecture.md: two rows for {module}"
            rows[module] = {_long(n) for n in re.findall(r"`([^`]+)`", cells[2])}
    assert rows, "docs/architecture.md has no table headed | module | owns | may import |"
    return rows


def _doc_torch_free() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    assert TORCH_FREE_MARKER in text, f"docs/architecture.md has no paragraph starting {TORCH_FREE_MARKER!r}"
    paragraph = text.split(TORCH_FREE_MARKER, 1)[1].split("\n\n", 1)[0]
    return [_long(n) for n in re.findall(r"`([^`]+)`", paragraph)]


def _parents(name: str) -> list[str]:
    """The packages Python imports before module ``name`` (``a.b.c`` needs ``a`` and ``a.b``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in MODULES]


def _torch_import_chain(name: str) -> list[str] | None:
    """The chain of import-time imports by which importing ``name`` imports torch (each step
    ``module: statement``), or None when it does not; package ``__init__`` files run on the way count."""
    chains = {name: []}
    pending = [name, *_parents(name)]
    for parent in _parents(name):
        chains[parent] = [f"{_short(name)} needs its package {_short(parent)}"]
    while pending:
        module = pending.pop(0)
        for target, statement in _imports(module, import_time_only=True).items():
            step = chains[module] + [f"{_short(module)}: {statement}"]
            if target in TORCH:
                return step
            if target in MODULES:
                for needed in [target, *_parents(target)]:
                    if needed not in chains:
                        chains[needed] = step
                        pending.append(needed)
    return None


def test_every_module_has_one_row_and_every_row_is_a_module():
    rows = _doc_table()
    missing = sorted(_short(m) for m in MODULES if m not in rows)
    assert not missing, f"docs/architecture.md: add a row to the module table for {missing}"
    stale = sorted(_short(m) for m in rows if m not in MODULES)
    assert not stale, f"docs/architecture.md: the module table names modules that do not exist: {stale}"
    for module, allowed in rows.items():
        unknown = sorted(_short(m) for m in allowed if m not in MODULES)
        assert not unknown, f"docs/architecture.md: the row of {_short(module)} allows modules that do not exist: {unknown}"


def test_each_module_imports_only_what_its_row_allows():
    rows = _doc_table()
    problems = []
    for module in MODULES:
        for target, statement in sorted(_imports(module).items()):
            if target in MODULES and target not in rows.get(module, set()):
                problems.append(f"{_short(module)} imports {_short(target)} ({statement!r})")
    assert not problems, ("imports that docs/architecture.md does not allow (add the module to the row's "
                          "'may import' if the dependency is right, else remove the import):\n  " + "\n  ".join(problems))


def test_no_training_module_imports_the_loop():
    """The loop's collaborators take arguments, never the trainer: only the package's ``__init__``
    (which re-exports ``Trainer``) imports ``training.loop``."""
    loop = f"{PACKAGE}.training.loop"
    offenders = [f"{_short(module)} ({_imports(module)[loop]!r})" for module in MODULES
                 if module.startswith(f"{PACKAGE}.training.") and loop in _imports(module)]
    assert not offenders, f"modules under training/ import the loop (pass what they need as arguments): {offenders}"


def test_the_torch_free_modules_import_no_torch_when_imported():
    listed = _doc_torch_free()
    assert f"{PACKAGE}.cli" in listed and f"{PACKAGE}.settings" in listed, listed
    unknown = sorted(_short(m) for m in listed if m not in MODULES)
    assert not unknown, f"docs/architecture.md lists as torch-free modules that do not exist: {unknown}"
    problems = []
    for module in listed:
        chain = _torch_import_chain(module)
        if chain:
            problems.append(f"{_short(module)} imports torch when imported: " + " -> ".join(chain))
    assert not problems, ("modules docs/architecture.md calls torch-free import torch at import time (import "
                          "it inside the function that needs it, or take the module off the list):\n  "
                          + "\n  ".join(problems))


def test_the_checks_see_lazy_imports_and_resolve_relative_ones():
    """The reading of imports itself: a function-level import counts for "may import" but not for
    torch-free, and ``from . import x`` in a plugin lands on the plugin's module."""
    every = _imports(f"{PACKAGE}.cli")
    import_time = _imports(f"{PACKAGE}.cli", import_time_only=True)
    lazy = set(every) - set(import_time)
    assert lazy & set(MODULES), "cli.py imports some package modules only inside its commands"
    plugin_imports = set()
    for module in MODULES:
        if module.startswith(f"{PACKAGE}.plugins."):
            plugin_imports |= {t for t in _imports(module) if t.startswith(f"{PACKAGE}.plugins.")}
    assert plugin_imports, "the plugins import each other's modules (e.g. temporal_ensembling.methods -> .loss)"
    assert _torch_import_chain(f"{PACKAGE}.training.loop"), "the trainer imports torch at import time"
