"""Experiment logging (issue 19): TensorBoard event files read back with TensorBoard's own reader,
Weights & Biases offline, and a logger failure that is a warning, never the end of a run."""

from __future__ import annotations

import json

import pytest
from cli_testing import invoke, tiny_train_args

from at_memorization import loggers
from at_memorization.runfolder import RunFolder


def _train(mnist_dir, run, *extra, epochs=2):
    return invoke("train", *tiny_train_args(mnist_dir, run, *extra, epochs=epochs))


def _scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_read_back_with_tensorboards_reader(mnist_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (pip install '.[tensorboard]') is not installed")
    run = tmp_path / "run"
    result = _train(mnist_dir, run, "--logger", "tensorboard")
    assert result.exit_code == 0, result.output
    events, scalars = _scalars(run)
    records = RunFolder(run).read_metrics()
    for key in ("train_loss", "test_robust_acc", "test_clean_acc", "lr", "grad_norm"):
        assert [step for step, _ in scalars[key]] == [1, 2], key
        assert [value for _, value in scalars[key]] == pytest.approx([r[key] for r in records], rel=1e-6), key
    settings = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"method": "pgd-at"' in settings and '"epochs": 2' in settings

    # a resumed, extended run adds epoch 3 once (what a killed run logged after its checkpoint is purged)
    resumed = invoke("train", "--resume", "--out", run, "--override", "epochs=3", "--quiet", "--device", "cpu",
                     "--logger", "tensorboard")
    assert resumed.exit_code == 0, resumed.output
    _, scalars = _scalars(run)
    assert [step for step, _ in scalars["test_robust_acc"]] == [1, 2, 3]


def test_wandb_logs_offline_and_a_resume_continues_the_same_run(mnist_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra (pip install '.[wandb]') is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    result = _train(mnist_dir, run, "--logger", "wandb")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    run_id = (run / "wandb-id.txt").read_text().strip()
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1
    data = (offline[0] / f"run-{run_id}.wandb").read_bytes()  # protobuf records: keys are stored as text
    for key in (b"test_robust_acc", b"train_loss", b"eval_every"):  # two metrics and a setting
        assert key in data, key
    resumed = invoke("train", "--resume", "--out", run, "--override", "epochs=3", "--quiet", "--device", "cpu",
                     "--logger", "wandb")
    assert resumed.exit_code == 0, resumed.output
    assert (run / "wandb-id.txt").read_text().strip() == run_id
    assert len(sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


class _Broken:
    name = "tensorboard"

    def __init__(self, run_dir, start_epoch):
        pass

    def start(self, settings):
        pass

    def log_epoch(self, record):
        raise OSError(28, "No space left on device")

    def close(self):
        pass


def test_a_failing_logger_is_a_warning_and_the_run_goes_on(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(loggers.LOGGERS, "tensorboard", _Broken)
    run = tmp_path / "run"
    result = _train(mnist_dir, run, "--logger", "tensorboard")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: --logger tensorboard failed")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "goes on" in warnings[0]
    assert [r["epoch"] for r in RunFolder(run).read_metrics()] == [1, 2]


def test_a_missing_logger_package_is_a_warning_with_the_install_hint(mnist_dir, tmp_path, monkeypatch):
    class Missing(_Broken):
        extra = "wandb"  # what a logger declares: the extra that installs its package

        def __init__(self, run_dir, start_epoch):
            raise ModuleNotFoundError("No module named 'wandb'", name="wandb")

    monkeypatch.setitem(loggers.LOGGERS, "wandb", Missing)
    run = tmp_path / "run"
    result = _train(mnist_dir, run, "--logger", "wandb", epochs=1)
    assert result.exit_code == 0, result.output
    assert "warning: --logger wandb is off: wandb is not installed (pip install \".[wandb]\")" in result.output
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 1
