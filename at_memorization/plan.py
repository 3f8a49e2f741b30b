"""A study's plan (``configs/plans/*.toml``), read and checked before anything runs.

A plan names the runs of a study (its arms, i.e. methods with their settings, times its seeds), the
evaluations of their checkpoints, and the report's comparisons. ``read_plan`` checks every run's
settings as ``at-mem train`` checks them, and the plan's own keys, so that a mistake is one line
naming the file and the key, before hours of training. ``at_memorization.reproduce`` runs a plan;
docs/reproduce.md describes the format.

This module imports no torch.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .records import ATTACK_NAMES, CHECKPOINT_NAMES
from .runfolder import read_text
from .settings import SETTINGS_BY_NAME, RunConfig, SettingError, read_settings, spelled_once
from .user_errors import UserError

PLAN_KEYS = {"name", "description", "base", "methods", "seeds", "device", "settings", "arms", "evaluate", "report"}
# The device names a study may give its runs (a plan's `device`, `reproduce --device`): their syntax
# only, so that a plan is checked without torch and may be written on a machine without the device;
# each run's `at-mem train` checks that the device exists where it runs.
DEVICE_NAME = re.compile(r"cpu|mps|cuda(:\d+)?")
DEVICE_NAMES_HINT = "use cpu, cuda, cuda:N or mps"
EVALUATE_KEYS = {"checkpoints", "attacks", "n_examples", "seeds", "arms", "batch_size"}
REPORT_KEYS = {"paired", "late_after", "plot_seed"}


class PlanError(UserError, ValueError):
    """A plan that cannot be run as written; the message names the file and the key."""


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Arm:
    """One row of the table: a method with its settings."""

    name: str
    method: str
    settings: dict  # the arm's own settings, over the plan's
    seeds: tuple[int, ...] | None = None  # None: the plan's seeds


@dataclass(frozen=True)
class EvaluationSpec:
    index: int  # its position in the plan (names its log)
    checkpoints: tuple[str, ...]
    attacks: tuple[str, ...]
    n_examples: int
    seeds: tuple[int, ...] | None  # None: every seed
    arms: tuple[str, ...] | None  # None: every arm
    batch_size: int | None = None

    def applies_to(self, arm: str, seed: int) -> bool:
        return (self.seeds is None or seed in self.seeds) and (self.arms is None or arm in self.arms)

    def describe(self) -> str:
        return f"{'+'.join(self.attacks)} on {self.n_examples} test points, {','.join(self.checkpoints)}"


@dataclass(frozen=True)
class PlannedRun:
    arm: Arm
    seed: int
    given: dict  # run settings as given (what the settings file holds), method and seed included
    given_method: dict  # the method's own settings
    accepted: dict = field(default_factory=dict, compare=False)  # the method's setting declarations

    @property
    def name(self) -> str:
        return f"{self.arm.name}-s{self.seed}"

    def settings_document(self) -> dict:
        return {**self.given, "method_args": dict(self.given_method)}

    def whole_settings(self, saved_derived=()) -> tuple[dict, dict]:
        """The run's settings as the plan states them, every one (a setting the plan leaves out is its
        default, not "anything"), to compare with a run folder's saved ones: (run settings, resolved;
        the method's). A method setting that the method derives when it is built (e.g. TE's start epoch)
        is left out where the saved run derived it too (it follows from settings compared already), and
        is None where the saved run was given it: a plan that stops giving it differs."""
        run_settings = RunConfig(**self.given).resolve().to_dict()
        run_settings.pop("method_args")
        method = {}
        for name, declared in self.accepted.items():
            if name in self.given_method:
                method[name] = self.given_method[name]
            elif declared.default is not None or name not in saved_derived:
                method[name] = declared.default
        return run_settings, method


@dataclass
class Plan:
    path: Path
    name: str
    description: str
    text: str
    arms: list[Arm]
    seeds: list[int]
    device: str | None
    runs: list[PlannedRun]
    evaluations: list[EvaluationSpec]
    paired: list[str]
    late_after: int | None
    plot_seed: int | None
    track_samples: bool


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _list_of(value, kind, path: Path, key: str, *, allow_empty=False) -> list:
    if isinstance(value, kind) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or (not value and not allow_empty) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise PlanError(f"{_where(path, key)} must be a list of {kind.__name__} values, got {value!r}")
    return value


def _int_at_least(value, minimum: int, path: Path, key: str, what: str):
    """``value`` when it is an integer (not a bool) of at least ``minimum``; else a one-line error."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PlanError(f"{_where(path, key)} must be {what}, got {value!r}")
    return value


def _subset_of(values: list, allowed: list, path: Path, key: str, what: str) -> list:
    """``values`` when each is in ``allowed`` (e.g. an arm's seeds among the plan's); else a one-line
    error naming the first that is not, as ``what`` says it: "seed {0} is not among ..."."""
    missing = [v for v in values if v not in allowed]
    if missing:
        raise PlanError(f"{_where(path, key)}: {what.format(missing[0])}")
    return values


def _read_toml(path: Path, what: str) -> dict:
    text = read_text(path, PlanError, f"{what} {path}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PlanError(f"{what} {path}: not valid TOML ({str(error).splitlines()[0]})") from None


def _spelled_once(table: dict, where: str) -> dict:
    try:
        return spelled_once(table, where)
    except SettingError as error:
        raise PlanError(str(error)) from None


def _given_once_beside(table: dict, method_args: dict, where: str) -> dict:
    """``method_args``, after refusing a setting given both in ``table`` and in its method_args."""
    both = sorted(set(table) & set(method_args))
    if both:
        raise PlanError(f"{where}: {both[0]!r} is given both beside method_args and in it; give it once")
    return method_args


def _base_settings(plan_path: Path, base: str) -> dict:
    """The base config's settings: a path relative to the plan file (or to the working folder)."""
    candidates = [plan_path.parent / base, Path(base)]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise PlanError(f"{_where(plan_path, 'base')}: {base!r} not found next to the plan or in the working folder")
    raw = _read_toml(found, "base config")
    # A configs/ file names its method, its output folder and device: the plan's arms, DIR and
    # --device decide those.
    for key in ("method", "out", "device"):
        raw.pop(key, None)
    return raw


def _method_infos() -> dict:
    from .method_catalog import method_catalog

    return {m.name: m for m in method_catalog() if m.error is None}


def read_plan(path: str | Path, *, methods: dict | None = None) -> Plan:
    """Read and check a plan file: every run's settings are checked as ``at-mem train`` checks them,
    before anything runs. ``methods``: name -> MethodInfo (default: the installed methods)."""
    path = Path(path)
    raw = _read_toml(path, "plan")
    text = path.read_text()
    unknown = sorted(set(raw) - PLAN_KEYS)
    if unknown:
        raise PlanError(f"{_where(path, unknown[0])}: unknown key (a plan has {', '.join(sorted(PLAN_KEYS))}; "
                        "run settings go in [settings] or [arms.NAME])")
    methods = _method_infos() if methods is None else methods
    name = raw.get("name", path.stem)
    description = raw.get("description", "")
    if not isinstance(name, str) or not name or not isinstance(description, str):
        raise PlanError(f"{_where(path, 'name')}/description must be text")
    seeds = _list_of(raw.get("seeds", [0]), int, path, "seeds")
    if len(set(seeds)) != len(seeds):
        raise PlanError(f"{_where(path, 'seeds')}: a seed is listed twice ({seeds})")
    for seed in seeds:  # the bounds of --seed, as a run's settings are checked
        try:
            SETTINGS_BY_NAME["seed"].check(seed)
        except SettingError as error:
            raise PlanError(f"{_where(path, 'seeds')}: {error}") from None
    device = raw.get("device")
    if device is not None and not isinstance(device, str):
        raise PlanError(f"{_where(path, 'device')} must be text such as \"cpu\" or \"cuda\"")
    if device is not None and not DEVICE_NAME.fullmatch(device):
        raise PlanError(f"{_where(path, 'device')}: {device!r} is not a device; {DEVICE_NAMES_HINT}")

    common = {}
    if "base" in raw:
        if not isinstance(raw["base"], str):
            raise PlanError(f"{_where(path, 'base')} must be the path of a config file")
        common.update(_spelled_once(_base_settings(path, raw["base"]), f"{_where(path, 'base')}"))
    settings_table = raw.get("settings", {})
    if not isinstance(settings_table, dict):
        raise PlanError(f"{_where(path, 'settings')} must be a table of run settings")
    # [settings] wins over the base config, whichever spelling each uses
    settings_table = _spelled_once(settings_table, _where(path, "settings"))
    common.update(settings_table)
    common_method_args = common.pop("method_args", None) or {}
    if not isinstance(common_method_args, dict):
        raise PlanError(f"{_where(path, 'settings.method_args')} must be a table of a method's settings")
    common_method_args = _given_once_beside(settings_table, _spelled_once(common_method_args,
                                                                          _where(path, "settings.method_args")),
                                            _where(path, "settings"))
    for key in ("method", "seed"):
        if key in common:
            raise PlanError(f"{_where(path, key)}: the plan's `methods`/[arms] and `seeds` set it, not [settings] "
                            "or the base config")
    common.pop("method", None)

    arms = _read_arms(path, raw, methods, seeds)
    hyperparameters = {}
    for info in methods.values():
        for h in info.hyperparameters:
            hyperparameters.setdefault(h.name, h)
    # A method setting in [settings] applies to the arms whose method has it; one that no arm's
    # method has is a mistake (a typo, or a setting of a method the plan does not train).
    for key in [*common, *common_method_args]:
        normal = key.replace("-", "_")
        if normal in SETTINGS_BY_NAME:
            continue
        if normal not in hyperparameters:
            raise PlanError(f"{_where(path, 'settings')}: unknown setting {key!r} (see `at-mem train --help`)")
        if not any(normal in {h.name for h in methods[a.method].hyperparameters} for a in arms):
            raise PlanError(f"{_where(path, 'settings')}: {key!r} is a setting of no method in this plan")

    runs = []
    for seed in seeds:
        for arm in arms:
            if arm.seeds is not None and seed not in arm.seeds:
                continue
            accepted = {h.name: h for h in methods[arm.method].hyperparameters}
            values = {k: v for k, v in common.items() if k in SETTINGS_BY_NAME or k in accepted}
            source = f"{path} (arm {arm.name})"
            # an arm's settings win over [settings], whichever spelling each uses
            arm_settings = _spelled_once(dict(arm.settings), source)
            arm_method_args = arm_settings.pop("method_args", None) or {}
            if not isinstance(arm_method_args, dict):
                raise PlanError(f"{source}: method_args must be a table of a method's settings")
            arm_method_args = _given_once_beside(arm_settings, _spelled_once(arm_method_args, source), source)
            # [settings.method_args] applies to the arms whose method has each setting, as [settings] does;
            # a method_args table is one more place for the same settings (read_settings reads them alike)
            values.update({k: v for k, v in common_method_args.items() if k in SETTINGS_BY_NAME or k in accepted})
            values.update(arm_settings)
            values.update(arm_method_args)
            try:
                given, given_method = read_settings(values, accepted, source)
                given.update(method=arm.method, seed=seed)
                RunConfig(**given, method_args=given_method).validate()
            except SettingError as error:
                raise PlanError(str(error).splitlines()[0]) from None
            runs.append(PlannedRun(arm, seed, given, given_method, accepted))
    evaluations = _read_evaluations(path, raw.get("evaluate", []), arms, seeds)
    paired, late_after, plot_seed = _read_report(path, raw.get("report", {}), arms, seeds)
    _check_distinct_arms(path, runs)
    track = all(bool(run.given.get("track_samples")) for run in runs)
    if late_after is not None and not track:
        raise PlanError(f"{_where(path, 'report.late_after')}: needs track_samples = true for every run")
    return Plan(path, name, description, text, arms, seeds, device, runs, evaluations, paired, late_after,
                plot_seed, track)


def _check_distinct_arms(path: Path, runs: list[PlannedRun]) -> None:
    """Two arms whose runs the report cannot tell apart (the same settings, up to those it ignores,
    such as data_dir or channels_last) would make ``at-mem report`` refuse the study at its end."""
    from .report import settings as report_settings

    seen = {}
    for run in runs:
        config = RunConfig(**run.given, method_args=run.given_method).resolve().to_dict()
        key = json.dumps([report_settings(config, dict(run.given_method)), run.seed], sort_keys=True, default=str)
        if key in seen and seen[key].arm.name != run.arm.name:
            raise PlanError(f"{path}: arms {seen[key].arm.name!r} and {run.arm.name!r} have the same settings (up to "
                            "settings the report ignores): their runs would be one row; make them differ or drop one")
        seen[key] = run


def _read_arms(path: Path, raw: dict, methods: dict, seeds: list[int]) -> list[Arm]:
    listed = raw.get("methods", [])
    listed = _list_of(listed, str, path, "methods", allow_empty=True)
    tables = raw.get("arms", {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise PlanError(f"{_where(path, 'arms')} must hold tables: [arms.NAME] with method = \"...\" and settings")
    names = list(dict.fromkeys([*listed, *tables]))
    if len(names) != len(listed) + len([t for t in tables if t not in listed]) or len(set(listed)) != len(listed):
        raise PlanError(f"{_where(path, 'methods')}: a method is listed twice ({listed})")
    if not names:
        raise PlanError(f"{path}: no runs: give methods = [...] or [arms.NAME] tables")
    arms = []
    for name in names:
        table = dict(tables.get(name, {}))
        method = table.pop("method", name)
        if not isinstance(method, str) or method not in methods:
            known = ", ".join(sorted(methods))
            raise PlanError(f"{_where(path, f'arms.{name}.method' if name in tables else 'methods')}: unknown method "
                            f"{method!r} (installed: {known})")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise PlanError(f"{_where(path, f'arms.{name}')}: an arm's name names folders: use letters, digits, - _ .")
        for key in ("seed", "out", "device"):
            if key in table:
                raise PlanError(f"{_where(path, f'arms.{name}.{key}')}: not an arm's setting (the plan sets it)")
        own_seeds = table.pop("seeds", None)  # e.g. a side measurement on seed 0 only
        if own_seeds is not None:
            key = f"arms.{name}.seeds"
            own_seeds = tuple(_subset_of(_list_of(own_seeds, int, path, key), seeds, path, key,
                                         f"seed {{}} is not among the plan's seeds {seeds}"))
        arms.append(Arm(name, method, table, own_seeds))
    return arms


def _read_evaluations(path: Path, tables, arms: list[Arm], seeds: list[int]) -> list[EvaluationSpec]:
    if isinstance(tables, dict):
        tables = [tables]
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise PlanError(f"{_where(path, 'evaluate')}: write [[evaluate]] tables")
    arm_names = [a.name for a in arms]
    specs = []
    for i, table in enumerate(tables):
        key = f"evaluate[{i}]"
        unknown = sorted(set(table) - EVALUATE_KEYS)
        if unknown:
            raise PlanError(f"{_where(path, f'{key}.{unknown[0]}')}: unknown key (use {', '.join(sorted(EVALUATE_KEYS))})")
        checkpoints = _list_of(table.get("checkpoints", list(CHECKPOINT_NAMES)), str, path, f"{key}.checkpoints")
        attacks = _list_of(table.get("attacks", ["clean", "pgd20", "cw"]), str, path, f"{key}.attacks")
        if "all" in attacks:
            attacks = list(ATTACK_NAMES)
        for name, allowed, values in (("checkpoints", CHECKPOINT_NAMES, checkpoints),
                                      ("attacks", ATTACK_NAMES, attacks)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise PlanError(f"{_where(path, f'{key}.{name}')}: unknown {bad[0]!r} (use {', '.join(allowed)})")
        n = _int_at_least(table.get("n_examples", 10000), 1, path, f"{key}.n_examples", "a positive integer")
        batch_size = table.get("batch_size")
        if batch_size is not None:
            _int_at_least(batch_size, 1, path, f"{key}.batch_size", "a positive integer")
        only_seeds = table.get("seeds")
        if only_seeds is not None:
            only_seeds = _subset_of(_list_of(only_seeds, int, path, f"{key}.seeds"), seeds, path, f"{key}.seeds",
                                    f"seed {{}} is not among the plan's seeds {seeds}")
        only_arms = table.get("arms")
        if only_arms is not None:
            only_arms = _subset_of(_list_of(only_arms, str, path, f"{key}.arms"), arm_names, path, f"{key}.arms",
                                   "no arm {!r} (arms: " + ", ".join(arm_names) + ")")
        specs.append(EvaluationSpec(i, tuple(c for c in CHECKPOINT_NAMES if c in checkpoints),
                                    tuple(a for a in ATTACK_NAMES if a in attacks), n,
                                    None if only_seeds is None else tuple(only_seeds),
                                    None if only_arms is None else tuple(only_arms), batch_size))
    # RUN/eval/<checkpoint>.json keeps one result per attack: two blocks measuring the same attack of
    # the same checkpoint of the same run on different numbers of points would replace each other
    # on every call.
    for a in specs:
        for b in specs[a.index + 1:]:
            checkpoints, attacks = set(a.checkpoints) & set(b.checkpoints), set(a.attacks) & set(b.attacks)
            shared = any(a.applies_to(arm.name, s) and b.applies_to(arm.name, s)
                         for arm in arms for s in (arm.seeds or seeds))
            if a.n_examples != b.n_examples and checkpoints and attacks and shared:
                raise PlanError(f"{_where(path, f'evaluate[{b.index}]')}: {sorted(attacks)[0]} of "
                                f"{sorted(checkpoints)[0]} is also in evaluate[{a.index}] at another n_examples "
                                f"({a.n_examples} vs {b.n_examples}); a run keeps one result per attack")
    return specs


def _read_report(path: Path, table, arms: list[Arm], seeds: list[int]):
    if not isinstance(table, dict):
        raise PlanError(f"{_where(path, 'report')} must be a table")
    unknown = sorted(set(table) - REPORT_KEYS)
    if unknown:
        raise PlanError(f"{_where(path, f'report.{unknown[0]}')}: unknown key (use {', '.join(sorted(REPORT_KEYS))})")
    paired = _list_of(table.get("paired", []), str, path, "report.paired", allow_empty=True)
    names = {a.name for a in arms}
    for spec in paired:
        base, _, other = spec.partition(":")
        if not other or base not in names or other not in names or base == other:
            raise PlanError(f"{_where(path, 'report.paired')}: {spec!r} must be BASE:OTHER, two different arms of "
                            f"the plan ({', '.join(a.name for a in arms)})")
    late_after = table.get("late_after")
    if late_after is not None:
        _int_at_least(late_after, 0, path, "report.late_after", "an epoch number")
    plot_seed = table.get("plot_seed")
    if plot_seed is not None and (not isinstance(plot_seed, int) or isinstance(plot_seed, bool)
                                  or plot_seed not in seeds):
        raise PlanError(f"{_where(path, 'report.plot_seed')} must be one of the plan's seeds {seeds}, got {plot_seed!r}")
    return paired, late_after, plot_seed
