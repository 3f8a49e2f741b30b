"""Helpers shared by the test modules (importable because pyproject.toml puts tests/ on pytest's path)."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from at_memorization.cli import main
from at_memorization.settings import SETTINGS_BY_NAME

# The tiny MNIST run the CLI tests train (seconds on a CPU), by setting name; a test names what it changes.
TINY_MNIST = {"dataset": "mnist", "model": "smallcnn", "epochs": 1, "train_size": 64, "test_size": 16,
              "batch_size": 32, "steps": 1, "eval_steps": 1}


def invoke(*args):
    """Run `at-mem ARGS...` in-process; every argument is turned into a string."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def tiny_train_args(data_dir, out, *extra, device="cpu", quiet=True, **settings) -> list[str]:
    """The arguments of ``at-mem train`` (after ``train``) for the tiny MNIST run from ``data_dir`` into
    ``out``: ``TINY_MNIST`` updated with ``settings`` (run settings by name, e.g. ``train_size=128``,
    ``track_samples=True``; None leaves one out), then ``--device`` and ``--quiet`` (None/False: not
    given), ``--out`` (None: not given) and ``extra`` (a method's settings, other options) as written."""
    args: list[str] = []
    for name, value in {**TINY_MNIST, "data_dir": data_dir, **settings}.items():
        setting = SETTINGS_BY_NAME[name]
        if value is None or (value is False and not setting.switch):
            continue  # not given, or a plain flag left off
        if setting.type is bool:
            args.append(setting.flag if value else f"--no-{setting.flag[2:]}")
        else:
            args += [setting.flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    args += ["--device", device] if device is not None else []
    args += ["--quiet"] if quiet else []
    args += ["--out", str(out)] if out is not None else []
    return args + [str(a) for a in extra]


def tiny_mnist_plan_settings(data_dir, **settings) -> str:
    """``TINY_MNIST`` updated with ``settings``, from ``data_dir``, as a plan's ``[settings]`` table (TOML)."""
    values = {**TINY_MNIST, "data_dir": str(data_dir), **settings}
    return "[settings]\n" + "".join(f"{name} = {json.dumps(value)}\n" for name, value in values.items())


def subprocess_env(**variables) -> dict[str, str]:
    """The environment of a process a test starts: one thread (small models run fastest on one, and
    the cores are shared), no warnings; ``variables`` set more (a None value unsets one)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for name, value in variables.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def assert_one_line_error(result, *words, exit_code=None):
    """Non-zero exit (or ``exit_code``), one `Error: ...` line holding every word, no traceback and no
    "Aborted!". ``result``: a CliRunner result, or a ``subprocess.CompletedProcess`` of the CLI."""
    if hasattr(result, "returncode"):
        output, code, exception = result.stdout + result.stderr, result.returncode, None
    else:
        output, code, exception = result.output, result.exit_code, result.exception
    assert code != 0 if exit_code is None else code == exit_code, output
    assert exception is None or isinstance(exception, SystemExit), repr(exception)
    assert "Traceback" not in output and "Aborted!" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    for word in words:
        assert str(word) in errors[0], (word, errors[0])
    return errors[0]


def one_line(call, error_type, *words) -> str:
    """``call()`` raises ``error_type`` with a one-line message holding every word; the message."""
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert str(word) in message, (word, message)
    return message
