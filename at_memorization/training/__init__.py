"""Training: one run of a method on a model and data set, into a run folder.

``Trainer(config, out_dir, ...).fit()`` runs it; ``resume_config`` gives the settings to continue a
run with. The modules, each one job (docs/architecture.md): ``start`` (new or resumed, decided
once), ``build`` (the parts), ``state`` (checkpoint dump and restore, a mirror pair), ``epoch_eval``
(per-epoch evaluation, the best epoch), ``tracking`` (per-sample records), ``guard`` (stop
agreement, finiteness, divergence advice), ``runfiles`` (the run folder's files), ``schedule``
(the learning rate) and ``loop`` (the Trainer: epochs and steps). None imports the loop.
"""

from ..runtime import TrainingError
from ..settings import RunConfig
from .guard import STOP_CHECK_EVERY, TrainingInterrupted
from .loop import Callbacks, Trainer
from .schedule import learning_rate
from .start import (Resumable, open_resumable, resolved_method_settings, resume_config, settings_to_resume,
                    with_threads)

__all__ = ["Callbacks", "Resumable", "RunConfig", "STOP_CHECK_EVERY", "Trainer", "TrainingError",
           "TrainingInterrupted", "learning_rate", "open_resumable", "resolved_method_settings", "resume_config",
           "settings_to_resume", "with_threads"]
