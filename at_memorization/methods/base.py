"""The interface every training method implements (built-ins and plugins alike), and the
extensions (regularizers such as temporal ensembling, update hooks such as AWP) that compose with it.

A method is its attack (inner maximization), its training loss (outer minimization) and its own
per-run state. The trainer calls, for every batch::

    x_adv = method.attack(model, x, y, index, epoch)              # model: the bare module, any mode;
                                                                   # its parameters frozen meanwhile
    method.before_loss(model, x, x_adv, y, index, epoch)           # hooks (e.g. AWP perturbs weights)
    loss, logs = method.loss(model, x, x_adv, y, index, epoch)     # model: as trained (DDP), train mode
    loss.backward()
    method.before_step(model, optimizer, epoch)                    # hooks (e.g. AWP restores weights)
    optimizer.step()

``index`` holds the samples' positions in the training set, ``epoch`` counts from 1. ``logs`` maps
names to scalar tensors (batch means); the trainer averages them over the epoch without any
host-device synchronization. Before the first step it calls ``method.set_attack_mode(model, mode)``
(``--attack-bn``); at each epoch's start it logs ``method.on_epoch_start(epoch)``, whose values worth
showing a method or extension declares in ``logged`` (``LoggedValue``: the epoch line and ``at-mem
plot`` show them). Everything a method needs to resume goes into ``state_dict()`` as
tensors and plain Python values.

A method is written in three small parts, which is what lets extensions compose with it::

    run_attack(model, x, y, penalty, clean_logits)  # the attack, with an extension's penalty added
    training_logits(model, x, x_adv) -> {"adv": ..., "clean": ...}   # the forward passes of the loss
    base_loss(logits, y) -> (loss, logs)            # the method's own objective on those logits

``attack`` and ``loss`` (below) assemble them with the method's ``extensions``: a TE variant of a
method is the method's class with ``extensions = (TemporalEnsembling,)``. A method may still
override ``attack`` and ``loss`` directly (then it takes no extensions).

Names, one meaning each: a method class's ``hyperparameters`` declare its settings (each is an
``at-mem train`` flag); ``method_args`` are the values a user gave (``None``: not given), as
``RunConfig.method_args`` and config files hold them; ``method.settings`` are the resolved values,
defaults and derived values filled in, which checkpoints save (under ``method.config``) and
``at-mem train --print-config`` shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

# Penalty: penalty(logits) -> scalar, added to an attack's inner loss
from ..attacks import Penalty, input_gradients_only
from ..logged import LoggedValue
from ..settings import SETTINGS_BY_NAME, Hyperparameter, SettingError
from ..user_errors import UserError


@dataclass(frozen=True)
class TrainingSetup:
    """What a method may know about the run."""

    num_samples: int
    num_classes: int
    epochs: int
    # the attack's defaults are the run settings' (at_memorization.settings), stated once
    eps: float = SETTINGS_BY_NAME["eps"].default
    step_size: float = SETTINGS_BY_NAME["step_size"].default
    steps: int = SETTINGS_BY_NAME["steps"].default
    norm: str = SETTINGS_BY_NAME["norm"].default


class MethodError(UserError, ValueError):
    """A method cannot be built with the given settings."""


class Extension:
    """Something added to a base method: a regularizer (a penalty in the attack's inner loss and in
    the training loss, e.g. temporal ensembling) and/or hooks around the update (e.g. AWP).

    An extension is built by its method (``Extension(method)``) after the method's settings are
    resolved; it reads them from ``method.settings`` (its ``hyperparameters`` are added to every
    method that lists it) and ``method.setup``, and may add log notes to ``method.notes``. Every
    hook is optional. ``key`` names it: ``method.extension(key)`` returns it, and its state is saved
    under ``key`` in the method's state.
    """

    key: ClassVar[str] = ""
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    # The values of on_epoch_start to show (the train command's epoch line, `at-mem plot`), added to
    # every method that lists the extension.
    logged: ClassVar[tuple[LoggedValue, ...]] = ()
    has_state: ClassVar[bool] = False  # True: state_dict() is saved in checkpoints under ``key``

    def __init__(self, method: "Method"):
        self.method = method

    # -- the attack
    def before_attack(self, model: torch.nn.Module, x, index, epoch: int) -> torch.Tensor | None:
        """Before the attack. May return eval-mode clean logits of ``x`` that it computed anyway; the
        method's attack reuses them where it needs the same (TRADES' KL target)."""
        return None

    def attack_penalty(self, index, epoch: int) -> Penalty | None:
        """``penalty(logits) -> scalar`` added to the attack's inner loss, or None."""
        return None

    # -- the loss
    def loss_term(self, logits: torch.Tensor, index, epoch: int) -> tuple[torch.Tensor | None, dict]:
        """A term added to the training loss, on the logits the method names in ``regularized_logits``
        (PGD-AT: adversarial, TRADES: clean); None for nothing. Returns (term, logs)."""
        return None, {}

    # -- around the update
    def before_loss(self, model: torch.nn.Module, x, x_adv, y, index, epoch: int) -> None:
        pass

    def before_step(self, model: torch.nn.Module, optimizer, epoch: int) -> None:
        pass

    # -- bookkeeping
    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        return {}

    def to(self, device) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _sum_penalties(penalties: list[Penalty]) -> Penalty | None:
    if not penalties:
        return None
    if len(penalties) == 1:
        return penalties[0]
    return lambda logits: sum(penalty(logits) for penalty in penalties)


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # The method's settings, its extensions' included (added by __init_subclass__).
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    # The values of on_epoch_start to show, its extensions' included (added by __init_subclass__).
    logged: ClassVar[tuple[LoggedValue, ...]] = ()
    extensions: ClassVar[tuple[type[Extension], ...]] = ()
    # Which of training_logits' entries an extension's loss term applies to.
    regularized_logits: ClassVar[str] = "adv"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        keys = [extension.key for extension in cls.extensions]
        if cls.extensions and (not all(keys) or len(set(keys)) != len(keys)):
            raise TypeError(f"{cls.__name__}: each extension needs its own non-empty key, got {keys}")
        if cls.extensions and (cls.attack is not Method.attack or cls.loss is not Method.loss):
            # an overridden attack or loss would apply the extensions by halves, silently
            raise TypeError(f"{cls.__name__}: a method with extensions writes run_attack, training_logits and "
                            f"base_loss, not attack or loss")
        names = {h.name for h in cls.hyperparameters}
        added = tuple(h for extension in cls.extensions for h in extension.hyperparameters if h.name not in names)
        if added:
            cls.hyperparameters = cls.hyperparameters + added
        logged_keys = {value.key for value in cls.logged}
        cls.logged = cls.logged + tuple(value for extension in cls.extensions for value in extension.logged
                                        if value.key not in logged_keys)

    def __init__(self, setup: TrainingSetup, **method_args):
        self.setup = setup
        known = {h.name: h for h in self.hyperparameters}
        unknown = sorted(set(method_args) - set(known))
        if unknown:
            raise MethodError(f"method {self.name!r} takes no setting {', '.join(unknown)}")
        # None: not given, so the default, or the declaration's derivation (``derived``, as for run
        # settings); given values are checked against their declarations (type, bounds) here
        try:
            self.settings = {name: h.default if method_args.get(name) is None else h.coerce(method_args[name])
                             for name, h in known.items()}
        except SettingError as error:
            raise MethodError(f"{self.name}: {error}") from None
        # the settings left to their derivation (extensions' notes say so when it matters)
        self.derived = tuple(name for name, h in known.items() if h.derived is not None and self.settings[name] is None)
        values = {**dataclasses.asdict(setup), **self.settings, "method": type(self)}
        for name in self.derived:
            self.settings[name] = known[name].derived(values)
        self.notes: list[str] = []  # messages for the run's log (e.g. derived defaults)
        self._extensions = {extension.key: extension(self) for extension in self.extensions}

    def extension(self, key: str) -> Extension:
        """The method's extension of that ``key`` (e.g. ``"te"``)."""
        try:
            return self._extensions[key]
        except KeyError:
            raise KeyError(f"method {self.name!r} has no extension {key!r} "
                           f"(it has: {', '.join(self._extensions) or 'none'})") from None

    # -- the attack object: built once per model by build_attack, reused at every step
    def build_attack(self, model: torch.nn.Module):
        raise NotImplementedError

    def make_attack(self, model: torch.nn.Module):
        """One attack object per model, built on first use (not once per step)."""
        if getattr(self, "_attack", None) is None or self._attack.model is not model:
            self._attack = self.build_attack(model)
        return self._attack

    def set_attack_mode(self, model: torch.nn.Module, mode: str) -> None:
        """The model's mode during the training attack on ``model`` (``--attack-bn``), set once on the
        attack object ``make_attack(model)`` returns at every step (``model``: the bare module or the
        compiled one, never a DDP wrapper). torchattacks' ``Attack.__call__`` switches the model to that
        mode and back after the call.

        "eval" (torchattacks' default) sets nothing. "train" is the whole model in train mode, as Rice
        et al.'s and AWP's ``attack_pgd`` (called with the model in ``model.train()``): BatchNorm
        normalizes with each attack batch's statistics and updates its running statistics, dropout
        draws masks. What runs outside the attack object keeps its own mode (TE's ensemble forward,
        the per-epoch evaluation, ``--track-samples``: eval)."""
        if mode == "eval":
            return
        if mode != "train":
            raise MethodError(f"--attack-bn must be one of eval, train, got {mode!r}")
        try:
            attack = self.make_attack(model)
        except NotImplementedError:
            attack = None
        if not callable(getattr(attack, "set_model_training_mode", None)):
            raise MethodError(f"--attack-bn {mode}: method {self.name} does not build a torchattacks attack "
                              f"(build_attack), so its attack mode cannot be set; use --attack-bn eval")
        attack.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)

    # -- the three parts a method writes
    def run_attack(self, model: torch.nn.Module, x, y, penalty: Penalty | None = None,
                   clean_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The method's inner maximization with ``penalty`` added to its inner loss. ``clean_logits``:
        eval-mode logits of ``x`` an extension already computed (use them or ignore them)."""
        return self.make_attack(model)(x, y, penalty=penalty)

    def training_logits(self, model: torch.nn.Module, x, x_adv) -> dict[str, torch.Tensor]:
        """The forward passes of the training loss: ``{"adv": model(x_adv), ...}``."""
        raise NotImplementedError

    def base_loss(self, logits: dict[str, torch.Tensor], y) -> tuple[torch.Tensor, dict]:
        """The method's own objective on ``training_logits``' output: (loss, logs)."""
        raise NotImplementedError

    # -- the two halves of a training step, assembled with the extensions
    def attack(self, model: torch.nn.Module, x, y, index, epoch: int) -> torch.Tensor:
        # Input gradients only, whatever attack run_attack uses: with the parameters frozen, a
        # compiled model's attack graph computes no weight gradients (eager autograd skips them
        # anyway). The flags are restored on the way out, also on error.
        with input_gradients_only(model):
            penalties, clean_logits = [], None
            for extension in self._extensions.values():
                computed = extension.before_attack(model, x, index, epoch)
                clean_logits = computed if computed is not None else clean_logits
                penalty = extension.attack_penalty(index, epoch)
                if penalty is not None:
                    penalties.append(penalty)
            return self.run_attack(model, x, y, penalty=_sum_penalties(penalties), clean_logits=clean_logits)

    def loss(self, model: torch.nn.Module, x, x_adv, y, index, epoch: int) -> tuple[torch.Tensor, dict]:
        logits = self.training_logits(model, x, x_adv)
        loss, logs = self.base_loss(logits, y)
        logs = {"train_adv_acc": (logits["adv"].argmax(1) == y).float().mean(), **logs}
        for extension in self._extensions.values():
            term, extension_logs = extension.loss_term(logits[self.regularized_logits], index, epoch)
            if term is not None:
                loss = loss + term
            logs.update(extension_logs)
        return loss, logs

    # -- optional hooks around the update (the trainer calls them for every method, never by name)
    def before_loss(self, model: torch.nn.Module, x, x_adv, y, index, epoch: int) -> None:
        """After the attack, before ``loss``: e.g. AWP perturbs the weights here. ``model`` is the
        bare model (not a DDP wrapper), in train mode."""
        for extension in self._extensions.values():
            extension.before_loss(model, x, x_adv, y, index, epoch)

    def before_step(self, model: torch.nn.Module, optimizer, epoch: int) -> None:
        """After ``loss.backward()``, before ``optimizer.step()``: e.g. AWP restores the weights here,
        so the update applies the perturbed point's gradients to the unperturbed weights."""
        for extension in reversed(self._extensions.values()):  # undo in the reverse order
            extension.before_step(model, optimizer, epoch)

    # -- bookkeeping
    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        """Plain per-epoch values to log (e.g. a schedule's weight)."""
        values = {}
        for extension in self._extensions.values():
            values.update(extension.on_epoch_start(epoch))
        return values

    def to(self, device) -> "Method":
        for extension in self._extensions.values():
            extension.to(device)
        return self

    def state_dict(self) -> dict:
        state = {}
        for key, extension in self._extensions.items():
            extension_state = extension.state_dict()
            if extension.has_state:
                state[key] = extension_state
            elif extension_state:  # it would be lost on resume, silently
                raise TypeError(f"extension {key!r} returns state but does not declare has_state = True")
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, extension in self._extensions.items():
            if extension.has_state:
                if key not in state:
                    raise MethodError(f"the checkpoint holds no {key!r} state for method {self.name!r}")
                extension.load_state_dict(state[key])

