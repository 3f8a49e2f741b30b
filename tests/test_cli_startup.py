"""`at-mem` starts without torch: `--help`, `methods`, `models`, `train --help` and argument errors
import no torch, timm or torchattacks, and answer as before (issue 19).

These tests look at which modules a fresh CLI process imports (``python -X importtime``), never at
the clock: how fast it answers is benchmarks/bench_startup.py's business. Every CLI process gets
its own cache folder (``XDG_CACHE_HOME`` in a temporary folder): nothing is written to the user's.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import sys
from pathlib import Path

import click
import pytest

from at_memorization import method_catalog
from at_memorization.cli import LAZY_COMMANDS, main
from at_memorization.methods.registry import GROUP, discover
from at_memorization.settings import RUN_SETTINGS, SETTINGS_BY_NAME
from cli_testing import assert_one_line_error, invoke
from subprocess_guard import run_with_hang_guard

HEAVY = ("torch", "timm", "torchattacks", "torchvision", "robustbench", "matplotlib")
SCRIPT = Path(sys.executable).parent / "at-mem"
BUILT_IN = ("mart", "pgd-at", "pgd-at-awp", "pgd-at-te", "pgd-at-te-awp", "trades", "trades-awp", "trades-te")


def all_hyperparameters() -> dict:
    """Every installed method's settings by name, with the methods declaring each, from the classes
    themselves: what the catalog must give without loading a class (a derivation, a function, runs in
    the method only)."""
    found = {}
    for entry in discover().values():
        for h in entry.load().hyperparameters:
            found.setdefault(h.name, (dataclasses.replace(h, derived=None), []))[1].append(entry.name)
    return found


def at_mem(cache_home: Path, *args: str, how: str = "-m", **extra_env):
    """Run the CLI in a fresh process as users do (``python -m at_memorization`` or the console
    script) under ``-X importtime``: (the process, its output without the import lines, the set of
    modules it imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("AT_MEM_CACHE_DIR", "AT_MEM_NO_CACHE", "PYTHONWARNINGS")}
    env.update({"XDG_CACHE_HOME": str(cache_home), "COLUMNS": "100", **extra_env})
    if how == "script":
        if not SCRIPT.is_file():
            pytest.skip(f"no at-mem console script next to {sys.executable}")
        command = [sys.executable, "-X", "importtime", str(SCRIPT), *args]
    else:
        command = [sys.executable, "-X", "importtime", "-m", "at_memorization", *args]
    done = run_with_hang_guard(command, env=env)
    modules, stderr = set(), []
    for line in done.stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[-1].strip())
        else:
            stderr.append(line)
    done.stderr = "\n".join(stderr) + ("\n" if stderr else "")
    return done, done.stdout + done.stderr, modules


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def cache_files(cache_home: Path) -> list[Path]:
    return sorted((cache_home / "at-memorization").glob("methods-*.json"))


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """A cache folder whose method catalog was written by one `at-mem methods` (which imported the
    classes, and torch, to write it)."""
    home = tmp_path_factory.mktemp("cache-home")
    done, output, modules = at_mem(home, "methods")
    assert done.returncode == 0, output
    assert "torch" in modules  # the first call loads the classes (and shows the check sees torch)
    assert len(cache_files(home)) == 1
    return home


# --------------------------------------------------------------------------- no torch
@pytest.mark.parametrize("args", [["--help"], ["models"], ["--version"]])
def test_help_and_models_import_no_torch_even_without_a_cache(tmp_path, args):
    done, output, modules = at_mem(tmp_path, *args)
    assert done.returncode == 0, output
    assert heavy(modules) == []
    assert cache_files(tmp_path) == []  # they never need the method catalog


@pytest.mark.parametrize("how", ["-m", "script"])
def test_methods_reads_the_cache_without_importing_torch(warm_cache, how):
    done, output, modules = at_mem(warm_cache, "methods", how=how)
    assert done.returncode == 0, output
    assert heavy(modules) == []
    assert "at_memorization.methods" not in modules and "at_memorization.models" not in modules


@pytest.mark.parametrize("args, words", [
    (["train", "--epochs", "abc"], ["--epochs", "'abc' is not an integer"]),
    (["train", "--bogus"], ["No such option '--bogus'"]),
    (["train", "--te-start", "x"], ["--te-start", "'x' is not an integer"]),  # a plugin method's setting
    (["train", "--norm", "L3"], ["--norm", "L3"]),
    (["evaluate", "x.pt", "--dataset", "imagenet"], ["--dataset", "imagenet"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
])
def test_argument_errors_import_no_torch(warm_cache, args, words):
    done, output, modules = at_mem(warm_cache, *args)
    assert_one_line_error(done, *words, exit_code=2)
    assert heavy(modules) == []


def test_a_busy_run_folder_is_reported_without_importing_torch(warm_cache, tmp_path):
    # Before: a lock error took 16 s (torch and timm were imported first).
    import json
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "earlier"}))
    done, output, modules = at_mem(warm_cache, "train", "--out", str(run), "--epochs", "1")
    assert_one_line_error(done, "is in use by PID 1", exit_code=1)
    assert heavy(modules) == []


def test_train_help_lists_every_option_without_torch(warm_cache):
    done, output, modules = at_mem(warm_cache, "train", "--help")
    assert done.returncode == 0, output
    assert heavy(modules) == []
    flags = [s.flag for s in RUN_SETTINGS] + [hp.flag for hp, _ in all_hyperparameters().values()]
    flags += ["--device", "--out", "--config", "--print-config", "--resume", "--override", "--allow-data-change",
              "--checkpoint-every-steps", "--quiet", "--help", "--no-augment"]
    for flag in flags:
        assert f"{flag} " in output or f"{flag}/" in output or f"{flag}," in output, flag
    # each method setting names the methods that take it, as the option's help did before
    assert "TE: momentum of the per-sample prediction average [pgd-at-te, pgd-at-te-awp, trades-te;" in " ".join(
        output.split())


def test_train_options_equal_those_of_the_classes():
    """The catalog gives `at-mem train` the options the method classes declare, in the same order."""
    command = main.get_command(click.Context(main), "train")
    names = [p.name for p in command.params]
    hyperparameters = sorted(all_hyperparameters())
    assert names[:len(RUN_SETTINGS) + len(hyperparameters)] == [s.name for s in RUN_SETTINGS] + hyperparameters
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- the outputs stay as they were
def test_methods_lists_the_built_in_methods_with_their_settings(warm_cache):
    done, output, _ = at_mem(warm_cache, "methods")
    assert done.returncode == 0, output
    listed = {line.split()[0] for line in output.splitlines() if line.strip() and not line.startswith(" ")}
    assert set(BUILT_IN) <= listed
    for entry in discover().values():
        assert entry.load().description in output
    assert "[--beta 6.0 --awp-gamma 0.005 --awp-warmup 9]" in output  # trades-awp: TRADES' own AWP defaults
    assert "[--te-momentum 0.9 --te-weight 300.0 --te-start 90 --te-end 150]" in output
    assert "[--mart-beta 6.0]" in output
    # from the cache exactly as from the classes (the first, cache-writing call, loaded them)
    cold_home = warm_cache.parent / "cold-for-methods"
    cold, cold_output, _ = at_mem(cold_home, "methods", AT_MEM_NO_CACHE="1")
    assert cold.returncode == 0 and cold_output == output
    assert cache_files(cold_home) == []  # AT_MEM_NO_CACHE: nothing written


def test_models_lists_names_parameter_counts_and_descriptions(tmp_path):
    from at_memorization.model_catalog import MODELS
    from at_memorization.models import OUR_MODELS

    done, output, _ = at_mem(tmp_path, "models")
    assert done.returncode == 0, output
    for name in OUR_MODELS:
        line = next(line for line in output.splitlines() if line.split() and line.split()[0] == name)
        assert f"{MODELS[name].parameters:,d}" in line and MODELS[name].description in line
    assert "10 classes, 3x32x32 inputs" in output


def test_the_group_help_lists_every_command_with_its_help(tmp_path):
    done, output, modules = at_mem(tmp_path, "--help")
    assert "at_memorization.analysis" not in modules
    for name in ("evaluate", "gradient-stability", "measures", "memorization", "methods", "models", "plot",
                 "report", "train"):
        assert f"\n  {name} " in output, name
    assert "Training curves of one or more runs side by side" in output


def test_lazy_commands_are_stated_as_they_are():
    """LAZY_COMMANDS names the analysis commands by import path with their help's first paragraph."""
    from at_memorization.analysis.commands import COMMANDS

    assert set(LAZY_COMMANDS) == {command.name for command in COMMANDS}
    for name, (path, first_paragraph) in LAZY_COMMANDS.items():
        module, _, attribute = path.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        assert command.name == name
        assert " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split()) == first_paragraph
        assert main.get_command(click.Context(main), name) is command


def test_lazy_analysis_commands_keep_one_line_errors(tmp_path):
    result = invoke("memorization", tmp_path / "nowhere", "--output", tmp_path / "m.json")
    assert_one_line_error(result, "nowhere")


def test_evaluate_offers_every_data_set():
    from at_memorization.data import DATASETS

    assert SETTINGS_BY_NAME["dataset"].choices == tuple(DATASETS)


IMPORT_FIRST = """\
import sys, warnings
filters = list(warnings.filters)
import at_memorization
assert not {"torch", "timm"} & set(sys.modules), "imported eagerly"
assert warnings.filters == filters, "a library import must leave the warning filters alone"
assert any(getattr(f, "_at_mem_hook", None) == "timm-registration" for f in sys.meta_path)
"""
TIMM_FIRST = """\
import sys, timm
assert not timm.is_model("preactresnet18")
import at_memorization
assert "at_memorization.models" in sys.modules  # registered at once: timm was there already
"""
CHECK_BACKBONES = """\
import at_memorization, timm
assert timm.create_model("preactresnet18", num_classes=10).__class__.__name__ == "PreActResNet"
assert timm.is_model("smallcnn_cifar10_linf")  # RobustBench's names too
assert at_memorization.build_model("smallcnn", 10, 1) is not None
import importlib.resources
assert timm.__loader__ is timm.__spec__.loader and type(timm.__loader__).__module__ != "at_memorization._compat"
assert importlib.resources.files("timm").is_dir()
print("ok")
"""


@pytest.mark.parametrize("first", [IMPORT_FIRST, TIMM_FIRST], ids=["at_memorization-then-timm", "timm-then-at_memorization"])
def test_the_package_registers_the_backbones_when_timm_is_imported(first):
    done = run_with_hang_guard([sys.executable, "-c", first + CHECK_BACKBONES])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_importing_the_models_module_first_registers_the_backbones():
    """at_memorization.models imports timm, whose import hook would import at_memorization.models: it
    must see that module is being imported already, neither recurse nor run it twice."""
    code = ("import sys, at_memorization.models as m, timm; assert sys.modules['at_memorization.models'] is m; "
            "assert all(timm.is_model(name) for name in m.OUR_MODELS); print('ok')")
    done = run_with_hang_guard([sys.executable, "-c", code])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_lazy_exports_are_the_modules_own():
    import at_memorization
    from at_memorization import models
    from at_memorization.plugins import temporal_ensembling

    assert at_memorization.build_model is models.build_model
    assert at_memorization.TELoss is temporal_ensembling.TELoss
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        at_memorization.nonexistent


# --------------------------------------------------------------------------- the cache
def test_the_registry_and_the_catalog_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("AT_MEM_CACHE_DIR", str(tmp_path))
    assert method_catalog.GROUP == GROUP
    built = method_catalog.method_catalog()  # from the classes; writes the file
    assert len(list(tmp_path.glob("methods-*.json"))) == 1
    assert method_catalog.method_catalog() == built  # read back: the same declarations
    owners = method_catalog.hyperparameter_owners()
    expected = all_hyperparameters()
    assert list(owners) == list(expected)
    for name, (hp, methods) in expected.items():
        assert owners[name] == (hp, methods)


def _only_cache_file(home: Path) -> Path:
    files = cache_files(home)
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other format", "other key", "edited source",
                                    "wrong types"])
def test_a_stale_or_unreadable_cache_is_rebuilt_silently(warm_cache, tmp_path, damage):
    home = tmp_path / "home"
    (home / "at-memorization").mkdir(parents=True)
    original = _only_cache_file(warm_cache)
    path = home / "at-memorization" / original.name
    text = original.read_text()
    data = json.loads(text)
    if damage == "garbage":
        text = "\x00 not json"
    elif damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "empty":
        text = ""
    elif damage == "other format":
        text = json.dumps({**data, "format": 0})
    elif damage == "other key":
        text = json.dumps({**data, "key": "0" * 16})
    elif damage == "edited source":  # a method's module changed since (an editable install)
        data["sources"][0][1] -= 1
        text = json.dumps(data)
    else:
        data["methods"][0]["hyperparameters"] = "nonsense"
        text = json.dumps(data)
    path.write_text(text)
    expected = at_mem(warm_cache, "methods")[1]
    done, output, modules = at_mem(home, "methods")
    assert done.returncode == 0 and output == expected
    assert "torch" in modules  # rebuilt from the classes
    assert json.loads(path.read_text()) == json.loads(original.read_text())  # and written again


def test_the_cache_is_what_later_calls_read(warm_cache, tmp_path):
    home = tmp_path / "home"
    (home / "at-memorization").mkdir(parents=True)
    original = _only_cache_file(warm_cache)
    data = json.loads(original.read_text())
    data["methods"][0]["description"] = "read from the cache"
    (home / "at-memorization" / original.name).write_text(json.dumps(data))
    done, output, modules = at_mem(home, "methods")
    assert done.returncode == 0 and "read from the cache" in output and heavy(modules) == []


def test_without_a_writable_cache_folder_the_classes_are_loaded(warm_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expected = at_mem(warm_cache, "methods")[1]
    for _ in range(2):  # every call: nothing can be cached
        done, output, modules = at_mem(blocker, "methods")
        assert done.returncode == 0 and output == expected and "torch" in modules
    done, output, _ = at_mem(blocker, "train", "--epochs", "abc")
    assert_one_line_error(done, "--epochs", exit_code=2)


def test_a_broken_plugin_is_reported_and_not_cached(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nbroken = broken_plugin:Missing\n")
    (site / "broken_plugin.py").write_text("raise RuntimeError('the plugin is broken')\n")
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for _ in range(2):
        done, output, _ = at_mem(tmp_path / "home", "methods", **env)
        assert done.returncode == 0, output
        assert "(fails to load: RuntimeError: the plugin is broken)" in output
        assert "[--beta 6.0]" in output  # the others are listed as usual
        assert cache_files(tmp_path / "home") == []  # tried again at the next call
    done, output, _ = at_mem(tmp_path / "home", "train", "--beta", "x", **env)
    assert_one_line_error(done, "--beta", exit_code=2)


def test_the_startup_benchmark_writes_its_report(tmp_path):
    """CI-sized run of benchmarks/bench_startup.py: every field is there (no timing is asserted)."""
    output = tmp_path / "startup.json"
    done = run_with_hang_guard([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                                    "bench_startup.py"), "--runs", "2", "--only", "python -c pass",
                                "at-mem models", "at-mem train --epochs abc", "--note", "CI", "--output", str(output)])
    assert done.returncode == 0, done.stderr
    report = json.loads(output.read_text())
    assert report["machine"]["cpu_count"] and report["python"]["version"] and report["note"] == "CI"
    assert set(report["commands"]) == {"python -c pass", "at-mem models", "at-mem train --epochs abc"}
    for label, result in report["commands"].items():
        assert len(result["seconds"]) == 2 and result["median_s"] > 0
    assert report["commands"]["at-mem train --epochs abc"]["exit_status"] == 2
