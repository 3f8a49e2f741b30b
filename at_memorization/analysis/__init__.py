"""Memorization analysis: gradient stability, complexity measures, tracked-sample reports, plots.

Everything here is plain functions on models, checkpoints and run directories; nothing prints.
The ``at-mem`` commands that wrap them live in :mod:`at_memorization.analysis.commands`.
See ``docs/memorization.md`` for the formulas and their sources.
"""

from ..user_errors import AnalysisError
from .gradient_stability import gradient_stability, gradient_stability_for_checkpoint
from .measures import (compare_checkpoints, kendall_tau, measure_checkpoint, path_norm, spectral_complexity,
                       weight_matrices)
from .memorization import compare_runs, memorization_report
from .plots import plot_gradient_stability, plot_memorization, plot_runs

__all__ = [
    "AnalysisError", "gradient_stability", "gradient_stability_for_checkpoint", "compare_checkpoints", "kendall_tau",
    "measure_checkpoint", "path_norm", "spectral_complexity", "weight_matrices", "compare_runs",
    "memorization_report", "plot_gradient_stability", "plot_memorization", "plot_runs",
]
