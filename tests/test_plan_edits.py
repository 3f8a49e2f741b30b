"""Issue 33, item 3: a study compares each existing run folder with its plan's settings as resolved
values, every setting included, so that a setting removed from the plan (its default then applies)
is refused as a changed one is, while an unchanged plan (derived values, the thread count, another
data folder) passes. The saved records are written as a run writes them (``config.json``)."""

from __future__ import annotations

import json

import torch
from cli_testing import assert_one_line_error, invoke

from at_memorization.plan import read_plan
from at_memorization.training import resolved_method_settings
from at_memorization.settings import RunConfig

PLAN = """\
name = "edits"
methods = ["pgd-at-te"]
seeds = [0]

[settings]
dataset = "mnist"
data_dir = "{data_dir}"
model = "smallcnn"
epochs = 6
eps = 0.1
{extra}
"""


def _plan(tmp_path, extra="", **replace) -> str:
    text = PLAN.format(data_dir=tmp_path / "mnist", extra=extra)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


def _saved_study(tmp_path, plan_text: str, method_given: dict | None = None) -> tuple:
    """A study folder holding one run saved as ``at-mem train`` saves it from ``plan_text``: config.json
    with the resolved settings, the thread count, the method's resolved settings and what was derived."""
    plan, out = tmp_path / "plan.toml", tmp_path / "study"
    plan.write_text(plan_text)
    run = read_plan(plan).runs[0]
    config = RunConfig(**run.given, method_args=dict(method_given if method_given is not None else run.given_method))
    derived = config.derived_names() + ["threads"]
    derived += [name for name, h in run.accepted.items() if h.default is None and name not in config.method_args]
    config = config.resolve()
    document = {"config": {**config.to_dict(), "threads": torch.get_num_threads(), "data_dir": "/elsewhere"},
                "method": resolved_method_settings(config), "derived": derived, "world_size": 1, "device": "cpu"}
    folder = out / "runs" / run.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(document))
    (out / "plan.toml").write_text(plan_text)
    return plan, out, run


def _rerun(plan, out, new_text: str):
    plan.write_text(new_text)
    (out / "plan.toml").write_text(new_text)  # as the refusal for another plan tells the user to do
    return invoke("reproduce", plan, "--out", out, "--dry-run")


def test_the_unchanged_plan_agrees_with_its_saved_run(tmp_path):
    plan, out, _ = _saved_study(tmp_path, _plan(tmp_path))
    result = invoke("reproduce", plan, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output


def test_a_setting_removed_from_the_plan_is_refused_as_a_changed_one(tmp_path):
    plan, out, run = _saved_study(tmp_path, _plan(tmp_path))
    result = _rerun(plan, out, _plan(tmp_path, **{"eps = 0.1\n": ""}))  # the default, 8/255, would apply
    assert_one_line_error(result, f"runs/{run.name} was trained with other settings than the plan's", "'eps'",
                          f"saved 0.1, given {8 / 255!r}", exit_code=1)


def test_a_derived_setting_follows_what_it_derives_from(tmp_path):
    # milestones are derived from epochs: giving them as they were derived changes nothing, removing
    # epochs changes both (the first difference is named).
    plan, out, _ = _saved_study(tmp_path, _plan(tmp_path))
    assert _rerun(plan, out, _plan(tmp_path, extra="milestones = [3, 4]")).exit_code == 0
    result = _rerun(plan, out, _plan(tmp_path, **{"epochs = 6\n": ""}))
    assert_one_line_error(result, "'epochs' (saved 6, given 200)", exit_code=1)


def test_a_method_setting_removed_from_the_plan_is_refused(tmp_path):
    plan, out, _ = _saved_study(tmp_path, _plan(tmp_path, extra="te_weight = 100.0"))
    result = _rerun(plan, out, _plan(tmp_path))
    assert_one_line_error(result, "'te_weight' (saved 100.0, given 300.0)", exit_code=1)


def test_a_derived_method_setting_that_the_run_was_given_differs_when_the_plan_leaves_it_to_derivation(tmp_path):
    plan, out, _ = _saved_study(tmp_path, _plan(tmp_path, extra="te_start = 2"))
    assert _rerun(plan, out, _plan(tmp_path, extra="te_start = 2")).exit_code == 0
    result = _rerun(plan, out, _plan(tmp_path))
    assert_one_line_error(result, "'te_start' (saved 2, given None)", exit_code=1)


def test_the_thread_count_is_the_runs_own_unless_the_plan_states_another(tmp_path):
    plan, out, _ = _saved_study(tmp_path, _plan(tmp_path))
    threads = torch.get_num_threads()
    assert _rerun(plan, out, _plan(tmp_path, extra=f"threads = {threads}")).exit_code == 0
    result = _rerun(plan, out, _plan(tmp_path, extra=f"threads = {threads + 1}"))
    assert_one_line_error(result, f"'threads' (saved {threads}, given {threads + 1})", exit_code=1)
