"""The user-facing errors of the library, and the decorator that turns them into one CLI line.

Shared by ``cli.py`` and ``analysis/commands.py`` (which therefore need not import each other).
"""

from __future__ import annotations

import functools

import click

from ._compat import RobustBenchUnavailable
from .checkpoint import CheckpointError
from .data import DataError
from .methods import MethodError, UnknownMethodError
from .models import UnknownModelError
from .run_evaluation import RunEvaluationError
from .runfolder import RunFolderError
from .runlock import RunLockError
from .settings import SettingError
from .training import TrainingError

class AnalysisError(ValueError):
    """The input cannot be analysed (missing file, wrong kind of run); the message says why in one line."""


USER_ERRORS = (DataError, CheckpointError, MethodError, UnknownMethodError, UnknownModelError,
               RobustBenchUnavailable, FileNotFoundError, RunLockError, TrainingError, AnalysisError,
               SettingError, RunFolderError, RunEvaluationError)


def one_line_errors(func):
    """Turn the library's user-facing errors into ``Error: <one line>`` and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as error:
            raise click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)

    return wrapper
