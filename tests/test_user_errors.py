"""Every error a user can cause derives from ``UserError``, and the CLI prints each as one line.

The classes are found by importing every module of the package and its bundled plugins, so a new
exception class that forgets the base fails here (or is listed below with the reason it is not a
user's mistake).
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import at_memorization
import at_memorization.plugins
from at_memorization.user_errors import AnalysisError, UserError, one_line_errors

# Exceptions of the package that are not a user's mistake, and why.
NOT_USER_ERRORS = {
    "TrainingInterrupted": "a requested stop (a signal); the CLI reports it with exit status 128 + the signal",
    "TrainingInterruptedBeforeStart": "a click exception already: click prints it and sets its exit status",
    "StoppedBeforeStart": "a requested stop while a run starts (a BaseException, as KeyboardInterrupt, that no "
                          "loader catches); `at-mem train` reports it as TrainingInterruptedBeforeStart",
    "NonFiniteCheckpoint": "never reaches the user: the trainer reports it as divergence (a TrainingError)",
    "TERepeatedUpdateError": "a bug in the calling training loop (TELoss.update_from twice in one step): a "
                             "traceback helps",
}


def _modules():
    for package in (at_memorization, at_memorization.plugins):
        yield package.__name__
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith("__main__"):  # `python -m at_memorization` runs the CLI
                yield info.name


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in the package and its plugins (not warnings), by qualified name."""
    found = {}
    for name in _modules():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, BaseException) and not issubclass(value, Warning)
                    and value.__module__ == name):
                found[f"{name}.{value.__qualname__}"] = value
    return found


EXCEPTIONS = _exception_classes()
USER_ERRORS = {name: cls for name, cls in EXCEPTIONS.items() if cls.__name__ not in NOT_USER_ERRORS}


def test_every_user_error_derives_from_user_error():
    # some of the former string table's, and some it left out (they gave tracebacks or were caught by hand)
    assert {"DataError", "WriteError", "UnknownMethodError", "ReportError", "PlanError", "ReproduceError",
            "TEStateError"} <= {cls.__name__ for cls in USER_ERRORS.values()}
    assert [name for name, cls in USER_ERRORS.items() if not issubclass(cls, UserError)] == []
    exempt = [cls for cls in EXCEPTIONS.values() if cls.__name__ in NOT_USER_ERRORS]
    assert {cls.__name__ for cls in exempt} == set(NOT_USER_ERRORS)  # no stale exemption
    assert not any(issubclass(cls, UserError) for cls in exempt)


def test_user_errors_keep_their_builtin_bases():
    """``except ValueError`` (or OSError, KeyError, ImportError) in callers still catches them."""
    from at_memorization._compat import RobustBenchUnavailable
    from at_memorization.atomic import WriteError
    from at_memorization.methods.registry import UnknownMethodError
    from at_memorization.runtime import TrainingError

    assert issubclass(WriteError, OSError) and issubclass(UnknownMethodError, KeyError)
    assert issubclass(TrainingError, RuntimeError) and issubclass(AnalysisError, ValueError)
    assert issubclass(RobustBenchUnavailable, ImportError)
    assert str(UnknownMethodError("unknown method 'x'")) == "unknown method 'x'"  # not KeyError's repr


@pytest.mark.parametrize("name", sorted(USER_ERRORS))
def test_the_cli_prints_each_user_error_as_one_line(name):
    cls, message = USER_ERRORS[name], "what went wrong\nmore detail for a traceback"
    error = cls.__new__(cls, message)
    BaseException.__init__(error, message)  # whatever arguments the class's own constructor takes

    @click.command()
    @one_line_errors
    def command():
        raise error

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1, result.output
    assert result.output == "Error: what went wrong\n"


def test_other_exceptions_keep_their_traceback():
    @click.command()
    @one_line_errors
    def command():
        raise ValueError("a bug")

    result = CliRunner().invoke(command, [])
    assert isinstance(result.exception, ValueError) and str(result.exception) == "a bug"


def test_a_missing_file_is_one_line_too():
    @click.command()
    @one_line_errors
    def command():
        open("/nonexistent/at-mem/file")

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1 and result.output.startswith("Error: [Errno 2] No such file or directory")


def test_the_base_class_module_imports_nothing():
    """Every module may import it: neither click nor torch comes with it."""
    code = ("import sys, at_memorization.user_errors; "
            "assert not {'click', 'torch'} & set(sys.modules), sorted({'click', 'torch'} & set(sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
