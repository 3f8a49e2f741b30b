"""Training methods: the interface, the registry and the built-ins (pgd-at, trades)."""

from .base import Hyperparameter, Method, MethodError, TrainingSetup
from .registry import GROUP, MethodEntry, UnknownMethodError, discover, get_method

__all__ = ["GROUP", "Hyperparameter", "Method", "MethodEntry", "MethodError", "TrainingSetup",
           "UnknownMethodError", "discover", "get_method"]
