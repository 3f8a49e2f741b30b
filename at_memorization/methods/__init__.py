"""Training methods: the interface (methods and the extensions that compose with them), the registry
and the built-ins (pgd-at, trades)."""

from ..logged import LoggedValue
from ..settings import Hyperparameter
from .base import Extension, Method, MethodError, Penalty, TrainingSetup
from .registry import GROUP, MethodEntry, UnknownMethodError, discover, get_method

__all__ = ["GROUP", "Extension", "Hyperparameter", "LoggedValue", "Penalty", "Method", "MethodEntry", "MethodError",
           "TrainingSetup", "UnknownMethodError", "discover", "get_method"]
