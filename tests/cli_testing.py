"""Helpers shared by the test modules (importable because pyproject.toml puts tests/ on pytest's path)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from at_memorization.cli import main


def invoke(*args):
    """Run `at-mem ARGS...` in-process; every argument is turned into a string."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


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
