"""Every run setting, declared once.

A :class:`Setting` states a setting's name, type, default (or how it is derived), help text, bounds,
whether ``at-mem train --resume --override`` may change it, whether it may differ on resume without
one, and whether ``at-mem report`` groups runs by it. Everything else is generated from
``RUN_SETTINGS``: the ``RunConfig`` dataclass, the ``at-mem train`` options, reading TOML files and
``config.json``, ``--override`` values, validation and ``--print-config``. A method's own settings
(``Hyperparameter``) are Settings too, checked by the same code.

Types are strict: ``epochs = 1.7`` or ``epochs = true`` in a file is an error, never a silent
``1``. Text (command line, ``--override``) is read with the setting's type; numbers may be written as
fractions where the declaration says so (``eps = "8/255"``).

Derived settings (``derived=...``) are filled in by :meth:`RunConfig.resolve` when not given, and a
run records which ones were derived. The rule for continuing a run: a resumed run keeps the values
it was saved with, derived ones included; only ``--override KEY=VALUE`` changes one. So
``--override epochs=13`` on a 12-epoch run keeps its milestones ``[6, 9]`` (and TE's schedule);
re-derive them by overriding them too.

This module imports nothing of the package: training, the CLI, checkpoints and the report read it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable


class SettingError(ValueError):
    """A setting's value is of the wrong type or out of bounds; the message says which, in one line."""


# Named bundles of defaults (a setting given explicitly wins over its preset's value).
PRESETS = {
    # The paper's random-label runs (official train.py): no weight decay, no data augmentation.
    "random-labels": {"label_noise": 1.0, "weight_decay": 0.0, "augment": False},
}


@dataclass(frozen=True)
class Setting:
    """One setting: its declaration is the only place its type, default and bounds are stated."""

    name: str  # a Python name; the option is --name-with-dashes
    type: type  # int, float, str, bool or list (a list of epochs)
    default: Any = None  # None with ``derived``: derived; None without: optional (e.g. all points)
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False  # > minimum instead of >=
    exclusive_maximum: bool = False  # < maximum instead of <=
    choices: tuple | None = None
    fraction: bool = False  # a float that may be written as a fraction, e.g. 8/255
    derived: Callable[[dict], Any] | None = None  # value from the other (resolved) values when not given
    default_help: str = ""  # the default (or its derivation) in words, for --help
    overridable: bool = False  # --resume --override may change it
    free_on_resume: bool = False  # may differ on resume without an override (does not change results)
    groups_report: bool = True  # at-mem report: runs differing in it are different rows
    switch: bool = False  # a bool shown as --name/--no-name (None: derived) instead of a plain flag

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        return self.flag

    def default_text(self) -> str:
        if self.default_help:
            return self.default_help
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return ",".join(map(str, self.default)) if isinstance(self.default, list) else str(self.default)

    # ------------------------------------------------------------------ reading values
    def parse_text(self, text: str, check_bounds: bool = True):
        """A value written as text (command line, --override): read with this setting's type (and,
        unless ``check_bounds`` is false, checked against its bounds)."""
        raw = str(text).strip()
        try:
            if self.type is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = raw.lower() in ("true", "1", "yes")
            elif self.type is int:
                value = int(raw)
            elif self.type is float:
                value = float(Fraction(raw)) if self.fraction else float(raw)
            elif self.type is list:
                value = [int(v) for v in raw.split(",") if v.strip()]
            else:
                value = raw
        except (ValueError, ZeroDivisionError, OverflowError):
            raise SettingError(f"{self.label}: {raw!r} is not {self._kind()}") from None
        return self.check(value) if check_bounds else value

    def coerce(self, value):
        """A value from a file (TOML, JSON) or Python: strict, no silent conversion (1.7 is not an int,
        true is not a number); text is accepted where the command line would take it (``"8/255"``)."""
        if value is None:
            if self.default is None:  # optional or derived: None means "not given"
                return None
            raise SettingError(f"{self.label}: a value is required, got none")
        if isinstance(value, str) and self.type is not str:
            if self.type in (float, list):
                return self.parse_text(value)
            raise SettingError(f"{self.label}: {value!r} is not {self._kind()}")
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
            list: isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value),
        }[self.type]
        if not ok:
            raise SettingError(f"{self.label}: {value!r} ({type(value).__name__}) is not {self._kind()}")
        if self.type is float:
            try:
                value = float(value)
            except OverflowError:
                raise SettingError(f"{self.label} must be a finite number, got {value}") from None
        elif self.type is list:
            value = list(value)
        return self.check(value)

    def check(self, value):
        """The bounds and choices; returns the value."""
        if value is None:
            return value
        if self.choices is not None and value not in self.choices:
            raise SettingError(f"{self.label} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        numbers = value if isinstance(value, list) else [value] if self.type in (int, float) else []
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                raise SettingError(f"{self.label} must be a finite number, got {number}")
            low, high = self.minimum, self.maximum
            too_low = low is not None and (number <= low if self.exclusive_minimum else number < low)
            too_high = high is not None and (number >= high if self.exclusive_maximum else number > high)
            if too_low or too_high:
                raise SettingError(f"{self.label} must be {self.bounds_text()}, got {value}")
        return value

    def bounds_text(self) -> str:
        """``>= 0``, ``> 0``, ``in [0, 1)``: the declared bounds in words."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return (f"in {'(' if self.exclusive_minimum else '['}{low:g}, {high:g}"
                    f"{')' if self.exclusive_maximum else ']'}")
        if low is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {low:g}"
        return f"{'<' if self.exclusive_maximum else '<='} {high:g}" if high is not None else "any value"

    def _kind(self) -> str:
        return {bool: "true or false", int: "an integer", str: "text",
                float: "a number" + (" or a fraction like 8/255" if self.fraction else ""),
                list: "a list of epochs like 100,150"}[self.type]


@dataclass(frozen=True)
class Hyperparameter(Setting):
    """A method's own setting, exposed as ``--<name with dashes>`` by the CLI: a run Setting (type,
    default, help, bounds such as ``minimum=0``), which a resume may change by default.

    Declared here, beside Setting and free of torch, so that ``at-mem`` can rebuild the declarations
    from its method catalog (method_catalog.py); methods import it from ``at_memorization.methods``."""

    overridable: bool = True


# --------------------------------------------------------------------------- derivations
def _from_preset(name: str, otherwise):
    def derive(values: dict):
        preset = PRESETS.get(values.get("preset") or "", {})
        return preset.get(name, otherwise)
    return derive


def _milestones(values: dict) -> list[int]:
    # Distinct epochs: a repeated milestone would multiply the lr by gamma twice at once.
    return sorted({max(1, round(f * values["epochs"])) for f in (0.5, 0.75)})


# --------------------------------------------------------------------------- the declaration
def _s(name, type_, default=None, help="", **kwargs) -> Setting:
    return Setting(name, type_, default, help, **kwargs)


RUN_SETTINGS: tuple[Setting, ...] = (
    _s("method", str, "pgd-at", "Training method (see `at-mem methods`)."),
    _s("dataset", str, "cifar10", "Data set (imagefolder: DIR/train/<class>/*, DIR/test/<class>/*).",
       choices=("cifar10", "cifar10-exact", "cifar100", "svhn", "mnist", "fashion-mnist", "imagefolder")),
    _s("data_dir", str, "./data", "Where the data is, or is downloaded to.", free_on_resume=True,
       groups_report=False),
    _s("model", str, "preactresnet18", "A backbone (see `at-mem models`) or any timm model."),
    _s("drop_rate", float, None, "Dropout rate of models that have dropout (timm's drop_rate).",
       minimum=0.0, maximum=1.0, exclusive_maximum=True, default_help="the model's own, e.g. 0.5 for smallcnn"),
    _s("epochs", int, 200, "Number of epochs.", minimum=1, overridable=True),
    _s("batch_size", int, 128, "Global batch size (split over processes).", minimum=1),
    _s("lr", float, 0.1, "Learning rate.", minimum=0.0, exclusive_minimum=True, overridable=True),
    _s("momentum", float, 0.9, "SGD momentum.", minimum=0.0, maximum=1.0, exclusive_maximum=True,
       overridable=True),
    _s("weight_decay", float, None, "Weight decay.", minimum=0.0, overridable=True,
       derived=_from_preset("weight_decay", 5e-4), default_help="5e-4; 0 with --preset random-labels"),
    _s("schedule", str, "step", "Learning-rate schedule.", choices=("step", "cosine"), overridable=True),
    _s("milestones", list, None, "Epochs after which the step schedule multiplies the lr by --lr-gamma.",
       minimum=1, overridable=True, derived=_milestones,
       default_help="50% and 75% of --epochs, i.e. 100,150 of 200: epochs 101 and 151 start at the lower lr"),
    _s("lr_gamma", float, 0.1, "Factor of the step schedule at each milestone.", minimum=0.0,
       exclusive_minimum=True, overridable=True),
    _s("eps", float, 8 / 255, "Perturbation budget, e.g. 8/255.", minimum=0.0, fraction=True, overridable=True,
       default_help="8/255"),
    _s("step_size", float, 2 / 255, "Attack step size.", minimum=0.0, fraction=True, overridable=True,
       default_help="2/255"),
    _s("steps", int, 10, "Attack steps during training.", minimum=0, overridable=True),
    _s("norm", str, "Linf", "Threat model.", choices=("Linf", "L2")),
    # A config.json without this key (a run saved before it existed) means "eval", the mode those runs
    # trained with: resume_settings and the report fill a missing key with the default.
    _s("attack_bn", str, "eval", "The model's mode during the training attack. eval: BatchNorm uses its running "
       "statistics and leaves them unchanged, dropout is off (the official TE, TRADES and MART code). train: "
       "BatchNorm normalizes with each attack batch's statistics and updates its running statistics at every "
       "attack step, dropout draws masks (Rice et al.'s and AWP's code). The per-epoch evaluation is in eval "
       "mode either way. Measured on CIFAR-10: train makes PGD-AT overfit less, AWP is unchanged "
       "(docs/differences.md).", choices=("eval", "train"), overridable=True),
    _s("augment", bool, None, "Standard augmentation (CIFAR: crop+flip; none for SVHN/MNIST).", switch=True,
       derived=_from_preset("augment", True), default_help="on; off with --preset random-labels"),
    _s("label_noise", float, None, "Symmetric label noise rate R in [0,1]; 1 = random labels.",
       minimum=0.0, maximum=1.0, derived=_from_preset("label_noise", 0.0),
       default_help="0; 1 with --preset random-labels"),
    _s("input_noise", str, None, "Randomize the training images.",
       choices=("shuffled-pixels", "random-pixels", "gaussian")),
    _s("input_noise_fraction", float, 1.0, "Fraction of training images randomized by --input-noise.",
       minimum=0.0, maximum=1.0),
    _s("train_size", int, None, "Use the first N training points.", minimum=1, default_help="all"),
    _s("test_size", int, None, "Use the first N test points.", minimum=1, overridable=True, default_help="all"),
    _s("eval_steps", int, 10, "PGD steps (of --step-size) for the per-epoch test robust accuracy that selects "
       "best.pt; 10 as the official TE code and Rice et al. (at-mem evaluate uses PGD-20).", minimum=0,
       overridable=True),
    _s("eval_train_size", int, 0, "Also report clean/PGD accuracy on the first N training points (on their "
       "training labels) at each evaluated epoch.", minimum=0, overridable=True),
    _s("eval_every", int, 1, "Evaluate (test clean/PGD accuracy, best.pt selection) every N epochs and at the "
       "last; on a CPU the per-epoch evaluation can take longer than training.", minimum=1, overridable=True),
    _s("track_samples", bool, False, "Record each training sample's adversarial correctness and loss per epoch "
       "(tracking.pt).", groups_report=False),
    _s("seed", int, 0, "Random seed (data order, initialization, attacks, noise).", groups_report=False),
    _s("bf16", bool, False, "bfloat16 autocast for attack and update (fp32 weights).", overridable=True),
    _s("channels_last", bool, False, "channels_last memory format.", overridable=True, groups_report=False),
    _s("compile", bool, False, "torch.compile the model for attack and update, with CUDA graphs on a GPU "
       "(slow first steps).", free_on_resume=True, groups_report=False),
    _s("preset", str, None, "random-labels: label noise 1, weight decay 0, no augmentation (the paper's "
       "setting).", choices=tuple(sorted(PRESETS))),
)
SETTINGS_BY_NAME = {s.name: s for s in RUN_SETTINGS}
# Written into a run's config.json beside its settings; not settings (the report ignores them too).
RECORD_ONLY = ("device", "world_size")


def _namespace():
    def resolve(self) -> "RunConfig":
        """A copy with every derived setting filled in (presets, weight decay, augmentation, label
        noise, milestones). The one place defaults are derived: the CLI only parses, so ``at-mem
        train --epochs 10`` and ``Trainer(RunConfig(epochs=10), ...)`` train alike. Idempotent."""
        values = dataclasses.asdict(self)
        if values["preset"] is not None and values["preset"] not in PRESETS:
            raise SettingError(f"--preset must be one of {', '.join(PRESETS)}, got {values['preset']!r}")
        for setting in RUN_SETTINGS:
            if setting.derived is not None and values[setting.name] is None:
                values[setting.name] = setting.derived(values)
        return type(self)(**values)

    def derived_names(self) -> list[str]:
        """The settings this (unresolved) config leaves to their derivation."""
        return [s.name for s in RUN_SETTINGS if s.derived is not None and getattr(self, s.name) is None]

    def validate(self) -> None:
        """Every value's type and bounds, as declared; SettingError (one line) for the first wrong one."""
        config = self.resolve()
        for setting in RUN_SETTINGS:
            setting.coerce(getattr(config, setting.name))
        if not isinstance(config.method_args, dict):
            raise SettingError(f"method_args must be a table of a method's settings, got {config.method_args!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    return {"resolve": resolve, "derived_names": derived_names, "validate": validate, "to_dict": to_dict,
            "__doc__": "Every setting of a run (see RUN_SETTINGS): plain values only, saved in each checkpoint "
                       "and in config.json. ``method_args``: the method's own settings as given."}


RunConfig = dataclasses.make_dataclass(
    "RunConfig",
    [(s.name, Any, field(default=s.default if not isinstance(s.default, list) else None)) for s in RUN_SETTINGS]
    + [("method_args", dict, field(default_factory=dict))],
    namespace=_namespace())
RunConfig.__module__ = __name__


# --------------------------------------------------------------------------- reading settings
def read_settings(raw: dict, hyperparameters: dict[str, Setting], source: str) -> tuple[dict, dict]:
    """A table of settings (a TOML file, a config.json's "config", ``--override`` pairs already read)
    as (run settings, method settings), each value checked strictly against its declaration.

    Keys may use dashes or underscores; a ``method_args`` table holds a method's settings.
    ``hyperparameters``: the method settings that may appear (name -> declaration).
    """
    raw = dict(raw)
    method_table = raw.pop("method_args", None) or {}
    if not isinstance(method_table, dict):
        raise SettingError(f"{source}: method_args must be a table of a method's settings")
    run_values, method_values = {}, {}
    for key, value in [*raw.items(), *method_table.items()]:
        name = str(key).replace("-", "_")
        setting = SETTINGS_BY_NAME.get(name) or hyperparameters.get(name)
        if setting is None:
            raise SettingError(f"{source}: unknown setting {key!r} (see at-mem train --help)")
        try:
            checked = setting.coerce(value)
        except SettingError as error:
            raise SettingError(f"{source}: {error}") from None
        (run_values if name in SETTINGS_BY_NAME else method_values)[name] = checked
    return run_values, method_values


def parse_overrides(items, hyperparameters: dict[str, Setting]) -> dict:
    """``KEY=VALUE`` texts as {name: value}: each read with its setting's type and bounds, and each
    setting one that a resume may change. Errors name the item."""
    values = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or not name or not raw.strip():
            raise SettingError(f"--override {item!r}: expected KEY=VALUE, e.g. lr=0.01")
        setting = SETTINGS_BY_NAME.get(name) or hyperparameters.get(name)
        if setting is None:
            raise SettingError(f"--override {name}: no such setting (see at-mem train --help)")
        if not setting.overridable:
            raise SettingError(f"--override {name}: cannot change on resume (it changes what the saved state "
                               f"means); these can: {', '.join(overridable_names(hyperparameters))}")
        try:
            values[name] = setting.parse_text(raw)
        except SettingError as error:
            raise SettingError(f"--override {item!r}: {error}") from None
    return values


def overridable_names(hyperparameters: dict[str, Setting]) -> list[str]:
    return [s.name for s in RUN_SETTINGS if s.overridable] + sorted(
        name for name, h in hyperparameters.items() if h.overridable)


def report_ignored() -> tuple[str, ...]:
    """The names ``at-mem report`` does not group by (the seed defines the repetitions)."""
    return tuple(s.name for s in RUN_SETTINGS if not s.groups_report) + RECORD_ONLY


def resume_settings(saved: dict, saved_method: dict, given: dict, given_method: dict, overrides: dict,
                    hyperparameters: dict[str, Setting]) -> tuple["RunConfig", dict]:
    """The settings a resumed run continues with, and its changes {name: [old, new]}.

    ``saved``/``saved_method``: the run's recorded (resolved) settings; ``given``/``given_method``:
    what the command line or a file gave explicitly (each must equal the saved value, unless it may
    differ on resume); ``overrides``: deliberate changes (``parse_overrides``). Derived values stay as
    they were saved unless overridden (module docstring).
    """
    config = {s.name: saved.get(s.name, s.default) for s in RUN_SETTINGS}
    method_settings = dict(saved_method)
    for values, target, declarations in ((given, config, SETTINGS_BY_NAME),
                                         (given_method, method_settings, hyperparameters)):
        for name, value in values.items():
            if name in overrides or value is None:
                continue
            setting = declarations.get(name)
            if setting is not None and setting.free_on_resume:
                target[name] = value
            elif target.get(name) != value:
                hint = (f"to change it deliberately add --override {name}=VALUE" if setting is not None and
                        setting.overridable else "it cannot change on resume; start a new run (another --out)")
                raise SettingError(f"--resume: the configuration differs from the saved run in {name!r} (saved "
                                   f"{target.get(name)!r}, given {value!r}); {hint}")
    changes = {}
    for name, value in overrides.items():
        setting = SETTINGS_BY_NAME.get(name) or hyperparameters.get(name)
        if setting is None or not setting.overridable:
            raise SettingError(f"--override {name}: " + ("no such setting" if setting is None else
                               "cannot change on resume (it changes what the saved state means)")
                               + f"; these can: {', '.join(overridable_names(hyperparameters))}")
        value = setting.coerce(value)
        target = config if name in SETTINGS_BY_NAME else method_settings
        if target.get(name) != value:
            changes[name] = [target.get(name), value]
        target[name] = value
    run = RunConfig(**config, method_args=method_settings)
    run.validate()
    return run, changes
