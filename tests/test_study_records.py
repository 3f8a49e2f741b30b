"""What a study says about itself is true (issue 33, item 7): a run with a corrupt eval record is left
out of the study's table with the reason, the other runs' table is made, and README.md never embeds an
earlier call's table; a plan's `device` is checked when the plan is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_testing import assert_one_line_error, invoke, tiny_mnist_plan_settings

from at_memorization.plan import PlanError, read_plan
from at_memorization.reproduce import Options, reproduce

# Two arms, one seed: the tiny MNIST run of tests/cli_testing.py, its last checkpoint evaluated on 8 test points.
PLAN = """\
name = "records"
methods = ["pgd-at", "trades"]
seeds = [0]
device = {device}

[[evaluate]]
checkpoints = ["last"]
attacks = ["clean"]
n_examples = 8

"""


def _plan(folder: Path, data_dir: Path, device: str = '"cpu"') -> Path:
    path = folder / "plan.toml"
    path.write_text(PLAN.format(device=device) + tiny_mnist_plan_settings(data_dir))
    return path


def _table_rows(markdown: str) -> list[str]:
    """The first cell of each body row of the markdown tables in ``markdown``."""
    return [line.split("|")[1].strip() for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith(("| method", "| run", "| OTHER"))]


# --------------------------------------------------------------------------- the plan's device
@pytest.mark.parametrize("device", ['"banana"', '"cuda:x"', '"gpu"', '""'])
def test_a_plan_naming_no_device_is_refused_naming_the_file_and_key(tmp_path, device):
    """Before: read without a word; every run then failed in `at-mem train`, after the plan was accepted."""
    plan = _plan(tmp_path, tmp_path / "mnist", device)
    message = str(pytest.raises(PlanError, read_plan, plan).value)
    assert "\n" not in message and f"{plan}: device: {device.strip(chr(34))!r} is not a device" in message, message
    assert "use cpu, cuda, cuda:N or mps" in message, message
    out = tmp_path / "study"
    for extra in ([], ["--dry-run"], ["--prepare"]):
        assert_one_line_error(invoke("reproduce", plan, "--out", out, *extra), f"{plan}: device", exit_code=1)
    assert not out.exists()


@pytest.mark.parametrize("device", ['"cpu"', '"cuda"', '"cuda:3"', '"mps"'])
def test_a_plan_may_name_a_device_this_machine_lacks(tmp_path, device):
    """Only the name is checked: a plan is written (and --prepare'd) where its device may not be, and
    `--device` on the command line wins over it; each run's `at-mem train` checks the device exists."""
    plan = _plan(tmp_path, tmp_path / "mnist", device)
    assert read_plan(plan).device == device.strip('"')
    result = invoke("reproduce", plan, "--out", tmp_path / "study", "--dry-run")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- a corrupt eval record
@pytest.mark.slow
def test_a_corrupt_eval_record_leaves_its_run_out_of_the_table_not_the_others(tmp_path, mnist_dir):
    """Before: `at-mem report` refused the whole study, and README.md embedded the previous call's
    table (both runs) under a "Not complete" list naming the run."""
    plan, out = _plan(tmp_path, mnist_dir), tmp_path / "study"
    assert reproduce(plan, Options(out=out, echo=lambda line: None)) == 0
    readme = (out / "README.md").read_text()
    assert _table_rows((out / "report.md").read_text()) == ["pgd-at", "trades"]
    assert "## Not complete" not in readme and "## Table" in readme

    record = out / "runs" / "trades-s0" / "eval" / "last.json"
    record.write_text('{"epoch": 1, "clean_acc"')  # cut by a full disk, say
    lines = []
    assert reproduce(plan, Options(out=out, echo=lines.append)) == 1  # its evaluation refuses the record
    report, readme = (out / "report.md").read_text(), (out / "README.md").read_text()
    assert _table_rows(report) == ["pgd-at"]  # the other run's table is made
    not_complete = readme.split("## Not complete", 1)[1].split("## Runs", 1)[0]
    assert f"- trades-s0: not in the table: {record}: not valid JSON" in not_complete, readme
    assert "failed: eval trades-s0" in not_complete, readme
    table = readme.split("## Table", 1)[1].split("## Problems", 1)[0]
    assert report.strip() in table and "trades" not in _table_rows(table), readme  # this call's table only
    problem = f"trades-s0 left out of the table and curves: {record}: not valid JSON"
    assert problem in readme.split("## Problems writing the outputs", 1)[1], readme
    assert f"warning: {problem}" in "\n".join(lines), lines

    # No readable run at all: no table, and README.md says the old files are out of date.
    (out / "runs" / "pgd-at-s0" / "eval" / "last.json").write_text("[")
    assert reproduce(plan, Options(out=out, echo=lambda line: None)) == 1
    readme = (out / "README.md").read_text()
    assert (out / "report.md").read_text() == report  # not rewritten: no run could go in it
    table = readme.split("## Table", 1)[1].split("##", 1)[0]
    assert "No table this time (see the problems below)" in table and "out of date" in table, readme
    assert _table_rows(table) == [] and "- pgd-at-s0: not in the table:" in readme, readme
    status = json.loads((out / "status.json").read_text())
    assert status["outputs_fingerprint"] is None  # the next call makes the outputs again
