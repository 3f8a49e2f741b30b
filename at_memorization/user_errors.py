"""The base class of every error a user can cause, and the decorator that turns them into one CLI line.

Every module that raises a user-facing error derives its class from :class:`UserError` (besides the
builtin it also is, e.g. ``class DataError(UserError, ValueError)``, so that ``except ValueError``
still catches it); ``one_line_errors`` (shared by ``cli.py`` and ``analysis/commands.py``, which
therefore need not import each other) prints any of them as ``Error: <one line>``. This module
imports nothing, not even click until a command fails, so that every module may import it and
``at-mem --help`` stays fast; tests/test_user_errors.py checks that no user error is left out.
"""

from __future__ import annotations

import functools


class UserError(Exception):
    """A mistake of the user (a bad value, a missing or foreign file, a busy folder, a broken
    installation), not a bug: the message says what is wrong in its first line."""


class AnalysisError(UserError, ValueError):
    """The input cannot be analysed (missing file, wrong kind of run); the message says why in one line."""


def one_line_errors(func):
    """Turn the library's user-facing errors (and a missing file) into ``Error: <one line>`` and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserError, FileNotFoundError) as error:
            import click

            raise click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__) from error

    return wrapper
