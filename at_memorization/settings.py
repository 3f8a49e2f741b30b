"""Every run setting, declared once.

A :class:`Setting` states a setting's name, type, default (or how it is derived), help text, bounds,
whether ``at-mem train --resume --override`` may change it, whether it may differ on resume without
one, and whether ``at-mem report`` groups runs by it. Each run setting is a field of the
``RunConfig`` class, typed for editors and type checkers, whose ``setting(...)`` declaration is its
Setting; ``RUN_SETTINGS`` is read from those fields. Everything else is generated from it: the
``at-mem train`` options, reading TOML files and ``config.json``, ``--override`` values, validation
and ``--print-config``. A method's own settings (``Hyperparameter``) are Settings too, checked by the
same code.

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
from typing import Any, Callable, TypeVar

from .user_errors import UserError


class SettingError(UserError, ValueError):
    """A setting's value is of the wrong type or out of bounds; the message says which, in one line."""


class SavedSettingDiffers(SettingError):
    """A setting given for a resumed run differs from the run's saved one: ``difference`` names the
    setting and both values (``at-mem reproduce`` words its own refusal around it)."""

    def __init__(self, name: str, saved, given, hint: str):
        self.name, self.saved, self.given = name, saved, given
        super().__init__(f"--resume: the configuration differs from the saved run in {self.difference}; {hint}")

    @property
    def difference(self) -> str:
        return f"{self.name!r} (saved {self.saved!r}, given {self.given!r})"


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
    # None: the process's value when the run starts (e.g. its thread count), recorded with the run; a
    # resume keeps the recorded value, and a plan that leaves it out agrees with any recorded one.
    from_environment: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

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
        value: Any
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
            raise SettingError(f"{self.flag}: {raw!r} is not {self._kind()}") from None
        return self.check(value) if check_bounds else value

    def coerce(self, value):
        """A value from a file (TOML, JSON) or Python: strict, no silent conversion (1.7 is not an int,
        true is not a number); text is accepted where the command line would take it (``"8/255"``)."""
        if value is None:
            if self.default is None:  # optional or derived: None means "not given"
                return None
            raise SettingError(f"{self.flag}: a value is required, got none")
        if isinstance(value, str) and self.type is not str:
            if self.type in (float, list):
                return self.parse_text(value)
            raise SettingError(f"{self.flag}: {value!r} is not {self._kind()}")
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
            list: isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value),
        }[self.type]
        if not ok:
            raise SettingError(f"{self.flag}: {value!r} ({type(value).__name__}) is not {self._kind()}")
        if self.type is float:
            try:
                value = float(value)
            except OverflowError:
                raise SettingError(f"{self.flag} must be a finite number, got {value}") from None
        elif self.type is list:
            value = list(value)
        return self.check(value)

    def check(self, value):
        """The bounds and choices; returns the value."""
        if value is None:
            return value
        if self.choices is not None and value not in self.choices:
            raise SettingError(f"{self.flag} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        numbers = value if isinstance(value, list) else [value] if self.type in (int, float) else []
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                raise SettingError(f"{self.flag} must be a finite number, got {number}")
            low, high = self.minimum, self.maximum
            too_low = low is not None and (number <= low if self.exclusive_minimum else number < low)
            too_high = high is not None and (number >= high if self.exclusive_maximum else number > high)
            if too_low or too_high:
                raise SettingError(f"{self.flag} must be {self.bounds_text()}, got {value}")
        return value

    def bounds_text(self) -> str:
        """``>= 0``, ``> 0``, ``in [0, 1)``: the declared bounds in words."""
        # an integer bound in full (a seed's 4294967295, not 4.29497e+09)
        low, high = (bound if isinstance(bound, int) else f"{bound:g}" if bound is not None else None
                     for bound in (self.minimum, self.maximum))
        if low is not None and high is not None:
            return (f"in {'(' if self.exclusive_minimum else '['}{low}, {high}"
                    f"{')' if self.exclusive_maximum else ']'}")
        if low is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {low}"
        return f"{'<' if self.exclusive_maximum else '<='} {high}" if high is not None else "any value"

    def _kind(self) -> str:
        return {bool: "true or false", int: "an integer", str: "text",
                float: "a number" + (" or a fraction like 8/255" if self.fraction else ""),
                list: "a list of epochs like 100,150"}[self.type]


@dataclass(frozen=True)
class Hyperparameter(Setting):
    """A method's own setting, exposed as ``--<name with dashes>`` by the CLI: a run Setting (type,
    default, help, bounds such as ``minimum=0``), which a resume may change by default. A default that
    depends on the run is ``derived`` as a run setting's is: a function of a dict holding the run's
    ``TrainingSetup`` fields (``epochs``, ``eps``, ...), the method's other settings and ``method`` (its
    class), called when the method is built if the setting was not given (e.g. TE's start epoch).

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
_Value = TypeVar("_Value")


def setting(type_: type[_Value], default: _Value | None = None, help: str = "", **declaration: Any) -> _Value:
    """One field of :class:`RunConfig` and its :class:`Setting` (in the field's metadata), declared in
    one statement; the setting's name is the field's (filled in below the class). Typed as the value so
    that a type checker reads ``eps: float = setting(float, ...)`` as it reads ``eps: float = 0.03``."""
    declared = Setting("", type_, default, help, **declaration)
    metadata = {"setting": declared}
    if isinstance(default, list):  # a fresh list per config, never one shared by all
        return field(default_factory=lambda: list(default), metadata=metadata)  # type: ignore[return-value]
    return field(default=default, metadata=metadata)  # type: ignore[return-value]


@dataclass
class RunConfig:
    """Every setting of a run, each field declared with its :class:`Setting`: plain values only, saved in
    each checkpoint and in config.json. ``method_args``: the method's own settings as given.

    A field whose default is None is optional or derived (:meth:`resolve`); its type says ``| None``."""

    method: str = setting(str, "pgd-at", "Training method (see `at-mem methods`).")
    dataset: str = setting(
        str, "cifar10", "Data set (imagefolder: DIR/train/<class>/*, DIR/test/<class>/*).",
        choices=("cifar10", "cifar10-exact", "cifar100", "svhn", "mnist", "fashion-mnist", "imagefolder"))
    data_dir: str = setting(str, "./data", "Where the data is, or is downloaded to.", free_on_resume=True,
                            groups_report=False)
    model: str = setting(str, "preactresnet18", "A backbone (see `at-mem models`) or any timm model.")
    drop_rate: float | None = setting(
        float, None, "Dropout rate of models that have dropout (timm's drop_rate).", minimum=0.0, maximum=1.0,
        exclusive_maximum=True, default_help="the model's own, e.g. 0.5 for smallcnn")
    epochs: int = setting(int, 200, "Number of epochs.", minimum=1, overridable=True)
    batch_size: int = setting(int, 128, "Global batch size (split over processes).", minimum=1)
    lr: float = setting(float, 0.1, "Learning rate.", minimum=0.0, exclusive_minimum=True, overridable=True)
    momentum: float = setting(float, 0.9, "SGD momentum.", minimum=0.0, maximum=1.0, exclusive_maximum=True,
                              overridable=True)
    weight_decay: float | None = setting(
        float, None, "Weight decay.", minimum=0.0, overridable=True, derived=_from_preset("weight_decay", 5e-4),
        default_help="5e-4; 0 with --preset random-labels")
    schedule: str = setting(str, "step", "Learning-rate schedule.", choices=("step", "cosine"), overridable=True)
    milestones: list[int] | None = setting(
        list, None, "Epochs after which the step schedule multiplies the lr by --lr-gamma.", minimum=1,
        overridable=True, derived=_milestones,
        default_help="50% and 75% of --epochs, i.e. 100,150 of 200: epochs 101 and 151 start at the lower lr")
    lr_gamma: float = setting(float, 0.1, "Factor of the step schedule at each milestone.", minimum=0.0,
                              exclusive_minimum=True, overridable=True)
    eps: float = setting(float, 8 / 255, "Perturbation budget, e.g. 8/255.", minimum=0.0, fraction=True,
                         overridable=True, default_help="8/255")
    step_size: float = setting(float, 2 / 255, "Attack step size.", minimum=0.0, fraction=True, overridable=True,
                               default_help="2/255")
    steps: int = setting(int, 10, "Attack steps during training.", minimum=0, overridable=True)
    norm: str = setting(str, "Linf", "Threat model.", choices=("Linf", "L2"))
    # A config.json without this key (a run saved before it existed) means "eval", the mode those runs
    # trained with: resume_settings and the report fill a missing key with the default.
    attack_bn: str = setting(
        str, "eval", "The model's mode during the training attack. eval: BatchNorm uses its running "
        "statistics and leaves them unchanged, dropout is off (the official TE, TRADES and MART code). train: "
        "BatchNorm normalizes with each attack batch's statistics and updates its running statistics at every "
        "attack step, dropout draws masks (Rice et al.'s and AWP's code). The per-epoch evaluation is in eval "
        "mode either way. Measured on CIFAR-10: train makes PGD-AT overfit less, AWP is unchanged "
        "(docs/differences.md).", choices=("eval", "train"), overridable=True)
    augment: bool | None = setting(
        bool, None, "Standard augmentation (CIFAR: crop+flip; none for SVHN/MNIST).", switch=True,
        derived=_from_preset("augment", True), default_help="on; off with --preset random-labels")
    label_noise: float | None = setting(
        float, None, "Symmetric label noise rate R in [0,1]; 1 = random labels.", minimum=0.0, maximum=1.0,
        derived=_from_preset("label_noise", 0.0), default_help="0; 1 with --preset random-labels")
    input_noise: str | None = setting(str, None, "Randomize the training images.",
                                      choices=("shuffled-pixels", "random-pixels", "gaussian"))
    input_noise_fraction: float = setting(float, 1.0, "Fraction of training images randomized by --input-noise.",
                                          minimum=0.0, maximum=1.0)
    train_size: int | None = setting(int, None, "Use the first N training points.", minimum=1, default_help="all")
    test_size: int | None = setting(int, None, "Use the first N test points.", minimum=1, overridable=True,
                                    default_help="all")
    eval_steps: int = setting(
        int, 10, "PGD steps (of --step-size) for the per-epoch test robust accuracy that selects best.pt; 10 as "
        "the official TE code and Rice et al. (at-mem evaluate uses PGD-20).", minimum=0, overridable=True)
    eval_train_size: int = setting(
        int, 0, "Also report clean/PGD accuracy on the first N training points (on their training labels) at "
        "each evaluated epoch.", minimum=0, overridable=True)
    eval_every: int = setting(
        int, 1, "Evaluate (test clean/PGD accuracy, best.pt selection) every N epochs and at the last; on a CPU "
        "the per-epoch evaluation can take longer than training.", minimum=1, overridable=True)
    track_samples: bool = setting(
        bool, False, "Record each training sample's adversarial correctness and loss per epoch (tracking.pt).",
        groups_report=False)
    # NumPy's legacy seeding (seed_everything) takes 0 <= seed < 2**32; torch's accepts that range too
    seed: int = setting(int, 0, "Random seed (data order, initialization, attacks, noise).", minimum=0,
                        maximum=2**32 - 1, groups_report=False)
    threads: int | None = setting(
        int, None, "CPU threads of the computation (torch.set_num_threads). On a CPU they are part of the result "
        "(sums split differently), so a run records its count and a resume computes with it.", minimum=1,
        overridable=True, groups_report=False, from_environment=True,
        default_help="the process's (OMP_NUM_THREADS, else the cores) when the run starts")
    bf16: bool = setting(bool, False, "bfloat16 autocast for attack and update (fp32 weights).", overridable=True)
    channels_last: bool = setting(bool, False, "channels_last memory format.", overridable=True,
                                  groups_report=False)
    compile: bool = setting(
        bool, False, "torch.compile the model for attack and update, with CUDA graphs on a GPU (slow first "
        "steps).", free_on_resume=True, groups_report=False)
    preset: str | None = setting(
        str, None, "random-labels: label noise 1, weight decay 0, no augmentation (the paper's setting).",
        choices=tuple(sorted(PRESETS)))
    method_args: dict[str, Any] = field(default_factory=dict)

    def resolve(self) -> RunConfig:
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
        config = self.resolve() if self.derived_names() else self  # a resolved config is checked as it is
        for setting in RUN_SETTINGS:
            setting.coerce(getattr(config, setting.name))
        if not isinstance(config.method_args, dict):
            raise SettingError(f"method_args must be a table of a method's settings, got {config.method_args!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _declared_settings() -> tuple[Setting, ...]:
    """RunConfig's Settings in field order, each named after its field: written here, once, at import,
    so that a field's metadata and RUN_SETTINGS hold the same object."""
    declared = []
    for run_field in dataclasses.fields(RunConfig):
        if "setting" in run_field.metadata:
            object.__setattr__(run_field.metadata["setting"], "name", run_field.name)  # frozen once named
            declared.append(run_field.metadata["setting"])
    return tuple(declared)


RUN_SETTINGS: tuple[Setting, ...] = _declared_settings()
SETTINGS_BY_NAME = {s.name: s for s in RUN_SETTINGS}
# Written into a run's config.json beside its settings; not settings (the report ignores them too).
RECORD_ONLY = ("device", "world_size")


# --------------------------------------------------------------------------- reading settings
def _given_once(keys, source: str) -> None:
    """Refuse a key given twice (``train_size`` and ``train-size``): neither may silently win."""
    seen: dict[str, Any] = {}
    for key in keys:
        name = str(key).replace("-", "_")
        if name in seen:
            raise SettingError(f"{source}: {seen[name]!r} and {key!r} are one setting; give it once")
        seen[name] = key


def spelled_once(table: dict, source: str) -> dict:
    """``table`` with its keys written with underscores (``train-size`` -> ``train_size``), after
    refusing one key in two spellings."""
    _given_once(table, source)
    return {str(key).replace("-", "_"): value for key, value in table.items()}


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
    run_values: dict[str, Any] = {}
    method_values: dict[str, Any] = {}
    _given_once([*raw, *method_table], source)  # also one both beside method_args and in it
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
                    hyperparameters: dict[str, Setting], *, complete: bool = False) -> tuple["RunConfig", dict]:
    """The settings a resumed run continues with, and its changes {name: [old, new]}.

    ``saved``/``saved_method``: the run's recorded (resolved) settings; ``given``/``given_method``:
    what the command line or a file gave explicitly (each must equal the saved value, unless it may
    differ on resume); ``overrides``: deliberate changes (``parse_overrides``). Derived values stay as
    they were saved unless overridden (module docstring). ``complete``: ``given`` is a whole config
    (the trainer's, or a plan's resolved settings), so a None in it is a value to compare, not a setting
    left out (except a ``from_environment`` one, whose None means "the run's recorded value").
    """
    config = {s.name: saved.get(s.name, s.default) for s in RUN_SETTINGS}
    method_settings = dict(saved_method)
    for values, target, declarations in ((given, config, SETTINGS_BY_NAME),
                                         (given_method, method_settings, hyperparameters)):
        for name, value in values.items():
            setting = declarations.get(name)
            if name in overrides or (value is None and (not complete or (setting is not None and
                                                                          setting.from_environment))):
                continue
            if setting is not None and setting.free_on_resume:
                target[name] = value
            elif target.get(name) != value:
                hint = (f"to change it deliberately add --override {name}=VALUE" if setting is not None and
                        setting.overridable else "it cannot change on resume; start a new run (another --out)")
                raise SavedSettingDiffers(name, target.get(name), value, hint)
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
