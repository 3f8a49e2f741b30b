"""Issue 33, item 7: a study whose finished run lost records that its checkpoint still holds (lines
of metrics.jsonl, a cut config.json) is repaired by the next call, which then finishes: before, the
evaluation failed with ``--checkpoints: give best, last or best,last`` and the cut config.json was
announced as rewritten but never was, so the run failed on every call."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from cli_testing import subprocess_env, tiny_mnist_plan_settings
from subprocess_guard import run_with_hang_guard

PLAN = """\
name = "repairs"
description = "One tiny MNIST run, evaluated."
methods = ["pgd-at"]
seeds = [0]
device = "cpu"

[[evaluate]]
checkpoints = ["best", "last"]
attacks = ["clean"]
n_examples = 16
"""
RUN = "pgd-at-s0"


def _reproduce(plan, out):
    return run_with_hang_guard([sys.executable, "-m", "at_memorization", "reproduce", str(plan), "--out", str(out)],
                               env=subprocess_env(), cwd=out.parent, silence_s=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_dir):
    folder = tmp_path_factory.mktemp("repairs")
    plan = folder / "plan.toml"
    plan.write_text(PLAN + tiny_mnist_plan_settings(mnist_dir, epochs=3))
    result = _reproduce(plan, folder / "study")
    assert result.returncode == 0, result.stdout + result.stderr
    return plan, folder / "study"


def _copy(finished, tmp_path):
    plan, study = finished
    out = tmp_path / "study"
    shutil.copytree(study, out)
    return plan, out, out / "runs" / RUN


def _states(out):
    return {key: task["state"] for key, task in json.loads((out / "status.json").read_text())["tasks"].items()}


@pytest.mark.slow
def test_a_finished_evaluated_run_that_lost_metrics_lines_is_repaired_and_not_evaluated_again(finished, tmp_path):
    plan, out, run = _copy(finished, tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    evaluations = {path.name: path.read_bytes() for path in (run / "eval").glob("*.json")}
    (run / "metrics.jsonl").write_text(metrics.splitlines(keepends=True)[0])
    result = _reproduce(plan, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stderr and "--checkpoints" not in result.stderr, result.stderr
    assert (run / "metrics.jsonl").read_text() == metrics
    assert {path.name: path.read_bytes() for path in (run / "eval").glob("*.json")} == evaluations
    assert set(_states(out).values()) == {"done"}
    assert "Not complete" not in (out / "README.md").read_text()


@pytest.mark.slow
def test_a_finished_run_with_a_cut_config_json_is_repaired_by_the_next_call(finished, tmp_path):
    plan, out, run = _copy(finished, tmp_path)
    whole = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text((run / "config.json").read_text()[:50])
    result = _reproduce(plan, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "of None" not in result.stderr and "config.json cannot be read" in result.stderr, result.stderr
    repaired = json.loads((run / "config.json").read_text())
    assert repaired["config"] == whole["config"] and repaired["method"] == whole["method"]
    again = _reproduce(plan, out)
    assert again.returncode == 0 and "nothing to run" in again.stderr + again.stdout, again.stderr
    assert set(_states(out).values()) == {"done"}
