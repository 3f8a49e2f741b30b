"""The user-facing errors of the library, and the decorator that turns them into one CLI line.

Shared by ``cli.py`` and ``analysis/commands.py`` (which therefore need not import each other).
Importing this module imports nothing else of the package: the error classes live in the modules
that raise them (most import torch), so they are gathered when an error has to be matched, and
``at-mem --help`` stays fast.
"""

from __future__ import annotations

import functools

import click


class AnalysisError(ValueError):
    """The input cannot be analysed (missing file, wrong kind of run); the message says why in one line."""


# Where each user-facing error class lives (module, class), for matching without importing.
_USER_ERROR_CLASSES = (("._compat", "RobustBenchUnavailable"), (".checkpoint", "CheckpointError"),
                       (".checkpoint", "WriteError"),
                       (".data", "DataError"), (".methods.base", "MethodError"),
                       (".methods.registry", "UnknownMethodError"), (".models", "UnknownModelError"),
                       (".run_evaluation", "RunEvaluationError"), (".runfolder", "RunFolderError"),
                       (".runlock", "RunLockError"), (".settings", "SettingError"), (".runtime", "TrainingError"))


def _is_user_error(error: Exception) -> bool:
    """Whether ``error`` is one of the user errors. Only classes of modules already imported are
    looked at: an error cannot be an instance of a class whose module was never imported, so a
    refusal raised before torch is imported (a busy run folder) does not import it."""
    import sys

    if isinstance(error, (FileNotFoundError, AnalysisError)):
        return True
    package = __name__.rsplit(".", 1)[0]
    for module, name in _USER_ERROR_CLASSES:
        loaded = sys.modules.get(package + module)
        if loaded is not None and isinstance(error, getattr(loaded, name)):
            return True
    return False


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions the CLI prints as one ``Error: ...`` line (imports the modules raising them)."""
    import importlib

    return tuple(getattr(importlib.import_module(module, __package__), name) for module, name in _USER_ERROR_CLASSES) + (
        FileNotFoundError, AnalysisError)


def __getattr__(name):
    if name == "USER_ERRORS":  # API: the tuple, built on first use
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def one_line_errors(func):
    """Turn the library's user-facing errors into ``Error: <one line>`` and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            if isinstance(error, click.ClickException) or not _is_user_error(error):
                raise
            raise click.ClickException(str(error).splitlines()[0] if str(error) else type(error).__name__)

    return wrapper
