"""One config resolution for the CLI and the Python API, config files (--config), and configs/."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from cli_testing import assert_one_line_error, invoke, tiny_train_args

from at_memorization.training import RunConfig, Trainer, learning_rate, resolved_method_settings, with_threads

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted(CONFIGS.glob("*.toml"))
CPU = sorted((CONFIGS / "cpu").glob("*.toml"))


def printed(*args) -> dict:
    result = invoke("train", *args, "--print-config")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("cli_args,api", [
    ([], {}),
    (["--epochs", "10"], {"epochs": 10}),
    (["--epochs", "40", "--method", "pgd-at-te"], {"epochs": 40, "method": "pgd-at-te"}),
    (["--preset", "random-labels", "--epochs", "300", "--weight-decay", "1e-4"],
     {"preset": "random-labels", "epochs": 300, "weight_decay": 1e-4}),
    (["--method", "trades-te", "--te-weight", "30", "--epochs", "7"],
     {"method": "trades-te", "epochs": 7, "method_args": {"te_weight": 30.0}}),
    (["--milestones", "3,5", "--epochs", "6", "--no-augment"], {"milestones": [3, 5], "epochs": 6, "augment": False}),
])
def test_cli_and_python_api_resolve_the_same_settings(cli_args, api):
    # Before: `at-mem train --epochs 10` lowered the lr at epochs 5 and 8, RunConfig(epochs=10) never.
    cli = printed(*cli_args)
    config = with_threads(RunConfig(**api).resolve())  # as a run records it: its thread count, its method's
    assert cli["config"] == {**config.to_dict(), "method_args": resolved_method_settings(config)}  # settings
    assert cli["method"] == resolved_method_settings(config)


def test_python_api_derives_milestones_from_the_epochs():
    config = RunConfig(epochs=10)
    assert config.resolve().milestones == [5, 8]
    assert [learning_rate(config, e) for e in (5, 6, 8, 9)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    assert RunConfig().resolve().milestones == [100, 150]
    assert RunConfig(preset="random-labels").resolve().weight_decay == 0.0
    assert RunConfig(epochs=10).resolve().resolve() == RunConfig(epochs=10).resolve()  # idempotent


def test_trainer_records_the_resolved_config(mnist_dir, tmp_path):
    config = RunConfig(method="pgd-at", dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", epochs=2,
                       train_size=32, test_size=16, batch_size=32, steps=1, eval_steps=1)
    trainer = Trainer(config, tmp_path / "run")
    trainer.close()
    assert trainer.config.milestones == [1, 2] and trainer.config.weight_decay == 5e-4
    # and the thread count it computes with (the process's, when not given)
    assert trainer.config == dataclasses.replace(config.resolve(), threads=torch.get_num_threads())


# --------------------------------------------------------------------------- config files
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_parse_and_resolve(path):
    text = path.read_text()
    assert text.startswith("# Source: ")  # each names where its setting comes from
    resolved = printed("--config", path)["config"]
    mart = path.stem.endswith("-mart")  # MART's own reference settings: tests/test_mart_configs.py
    assert resolved["dataset"] == "cifar10" and resolved["eval_steps"] == (20 if mart else 10)
    if mart:
        pass
    elif "random-labels" in path.stem:
        assert (resolved["model"], resolved["epochs"], resolved["milestones"]) == ("wrn28_10", 300, [100, 200])
        assert resolved["label_noise"] == 1.0 and resolved["weight_decay"] == 0.0 and resolved["augment"] is False
    else:
        assert (resolved["epochs"], resolved["milestones"], resolved["lr"], resolved["weight_decay"]) == (
            200, [100, 150], 0.1, 5e-4)
        assert resolved["eps"] == pytest.approx(8 / 255) and resolved["step_size"] == pytest.approx(2 / 255)
    assert path.stem.endswith("-" + resolved["method"])


def test_the_paper_configs_cover_every_method_and_model():
    names = {p.stem for p in PAPER}
    for model in ("preactresnet18", "resnet18", "wrn34-10"):
        for method in ("pgd-at", "pgd-at-te", "trades", "trades-te"):
            assert f"cifar10-{model}-{method}" in names
    assert {"cifar10-wrn28-10-random-labels-pgd-at", "cifar10-wrn28-10-random-labels-trades"} <= names
    assert len(CPU) == 6 and all(p.read_text().startswith("# CPU-SIZED") for p in CPU)


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU, ids=lambda p: p.stem)
def test_cpu_configs_train_one_epoch(path, mnist_dir, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--config", path, "--data-dir", mnist_dir, "--epochs", 1, "--train-size", 64,
                    "--test-size", 32, "--eval-train-size", 32, "--out", run, "--quiet")
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())["config"]
    file_settings = printed("--config", path)["config"]
    for key, value in file_settings.items():  # the file's settings, except what the command line changed
        if key not in ("epochs", "train_size", "test_size", "eval_train_size", "data_dir", "milestones",
                       "method_args"):  # derived from the epochs too (TE's schedule)
            assert recorded[key] == value, key
    assert recorded["epochs"] == 1 and recorded["train_size"] == 64
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_run_config_json_is_accepted_as_config(mnist_dir, tmp_path):
    first = tmp_path / "first"
    args = tiny_train_args(mnist_dir, None, "--beta", 3, train_size=32, method="trades", lr=0.02)
    assert invoke("train", *args, "--out", first).exit_code == 0
    again = printed("--config", first / "config.json")
    assert again["config"] == json.loads((first / "config.json").read_text())["config"]
    assert printed("--config", first / "config.json", "--lr", 0.5)["config"]["lr"] == 0.5  # flags win


@pytest.mark.parametrize("content,words", [
    ('epochs = 10\ncolour = "red"\n', ["unknown setting 'colour'"]),
    ('epochs = "ten"\n', ["--epochs: 'ten' is not an integer"]),
    ('epochs = [10\n', ["not a readable TOML"]),
    ('method_args = 3\n', ["method_args must be a table"]),
])
def test_bad_config_files_are_one_line_errors(content, words, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert_one_line_error(invoke("train", "--config", path, "--print-config"), "--config", *words)


def test_missing_config_file(tmp_path):
    assert_one_line_error(invoke("train", "--config", tmp_path / "nope.toml"), "no such file")
