"""One setting, one value (issue 33, items 4 and 5): two spellings of a key (``train_size`` and
``train-size``) are refused instead of one silently winning, and a plan's ``[settings.method_args]``
is applied as an arm's ``method_args`` is, instead of being dropped."""

import pytest

from cli_testing import assert_one_line_error, invoke, tiny_train_args
from at_memorization.plan import PlanError, read_plan
from at_memorization.settings import SettingError, read_settings

PLAN = """\
name = "spelling"
methods = ["pgd-at", "pgd-at-te"]
seeds = [0]

[settings]
dataset = "mnist"
model = "smallcnn"
epochs = 4
{settings}
{arms}
"""


def _plan(tmp_path, settings="", arms=""):
    path = tmp_path / "plan.toml"
    path.write_text(PLAN.format(settings=settings, arms=arms))
    return path


def _runs(tmp_path, **parts) -> dict:
    return {(run.arm.name, run.seed): run for run in read_plan(_plan(tmp_path, **parts)).runs}


def test_two_spellings_of_one_setting_in_one_table_are_refused():
    with pytest.raises(SettingError, match="'train_size' and 'train-size' are one setting; give it once"):
        read_settings({"train_size": 64, "train-size": 128}, {}, "f.toml")
    te_weight = {"te_weight": object()}  # declared as the TE plugin declares it, by name only
    with pytest.raises(SettingError, match="'te_weight' and 'te-weight' are one setting"):
        read_settings({"te_weight": 1.0, "method_args": {"te-weight": 2.0}}, te_weight, "f.toml")


def test_two_spellings_in_a_config_file_are_one_line(mnist_dir, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("train_size = 64\ntrain-size = 128\n")
    result = invoke("train", "--config", config, *tiny_train_args(mnist_dir, tmp_path / "run", train_size=None))
    assert_one_line_error(result, "'train_size' and 'train-size' are one setting")
    assert not (tmp_path / "run").exists()


def test_two_spellings_in_a_plan_table_are_refused_and_an_arm_still_wins_over_settings(tmp_path):
    with pytest.raises(PlanError, match="'train_size' and 'train-size' are one setting"):
        _runs(tmp_path, settings="train_size = 64\ntrain-size = 128")
    # across tables the rule is the plan's: an arm's value wins over [settings], whatever its spelling
    runs = _runs(tmp_path, settings="train_size = 64", arms='[arms.small]\nmethod = "pgd-at"\ntrain-size = 32')
    assert runs["small", 0].given["train_size"] == 32 and runs["pgd-at", 0].given["train_size"] == 64


def test_settings_method_args_of_a_plan_apply_to_the_arms_whose_method_has_them(tmp_path):
    # Before: [settings.method_args] was dropped without a word (the same table under an arm applied).
    runs = _runs(tmp_path, settings="[settings.method_args]\nte_weight = 100.0")
    assert runs["pgd-at-te", 0].given_method["te_weight"] == 100.0
    assert "te_weight" not in runs["pgd-at", 0].given_method
    with pytest.raises(PlanError, match="'awp_gamma' is a setting of no method in this plan"):
        _runs(tmp_path, settings="[settings.method_args]\nawp_gamma = 0.01")
    with pytest.raises(PlanError, match="'te_weight' is given both beside method_args and in it"):
        _runs(tmp_path, settings="te_weight = 1.0\n[settings.method_args]\nte_weight = 100.0")
    arm = '[arms.te]\nmethod = "pgd-at-te"\n[arms.te.method_args]\nte_weight = 7.0'
    runs = _runs(tmp_path, settings="[settings.method_args]\nte_weight = 100.0", arms=arm)
    assert runs["te", 0].given_method["te_weight"] == 7.0  # the arm's own wins
    assert runs["pgd-at-te", 0].given_method["te_weight"] == 100.0
