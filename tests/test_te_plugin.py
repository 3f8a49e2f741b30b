"""The TE plugin end to end: entry points, CLI training on real data, resume, the examples."""

from __future__ import annotations

import json
import math
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from at_memorization.cli import main
from at_memorization.methods import discover
from cli_testing import subprocess_env, tiny_train_args
from subprocess_guard import run_with_hang_guard

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(OMP_NUM_THREADS=2)


def test_te_methods_come_from_the_plugin_entry_points():
    declared = {ep.name: ep.value for ep in entry_points(group="at_memorization.methods")}
    assert declared["pgd-at-te"] == "at_memorization.plugins.temporal_ensembling.methods:PGDATTE"
    assert declared["trades-te"] == "at_memorization.plugins.temporal_ensembling.methods:TRADESTE"
    found = discover()
    assert found["pgd-at-te"].distribution == "at-memorization"
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0
    line = next(l for l in result.output.splitlines() if l.startswith("trades-te"))
    assert "at_memorization.plugins.temporal_ensembling" in line


def test_no_top_level_plugins_module_is_installed():
    import importlib.util

    assert importlib.util.find_spec("plugins") is None or "at_memorization" in str(
        importlib.util.find_spec("plugins").origin or "")
    import at_memorization.plugins.temporal_ensembling as te

    assert Path(te.__file__).resolve().parent == ROOT / "plugins" / "temporal_ensembling"


def _train(args):
    result = CliRunner().invoke(main, ["train", "--quiet", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["pgd-at-te", "trades-te"])
def test_te_methods_train_on_real_data_with_a_ramping_weight(method, cifar_jpg_dir, tmp_path):
    run = tmp_path / method
    result = _train(tiny_train_args(cifar_jpg_dir, run, method=method, dataset="imagefolder", epochs=4, train_size=200,
                                    test_size=40, batch_size=50, steps=2, eval_steps=2))
    assert "starts at epoch 2 (45%)" in result.output  # 4 epochs: round(1.8) = 2, round(3) = 3
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    weights = [r["te_weight_now"] for r in records]
    assert weights[0] == 0.0 and 0 < weights[1] < 300.0 and weights[2] == weights[3] == 300.0
    assert records[0]["te_loss"] == 0.0 and all(r["te_loss"] > 0 for r in records[1:])
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["method"]["name"] == method
    assert state["method"]["config"]["te_start"] == 2 and state["method"]["config"]["te_end"] == 3
    ensemble = state["method"]["state"]["te"]["ensemble"]
    assert ensemble.shape == (200, 10) and ensemble.dtype == torch.float32
    assert torch.all(ensemble.sum(1) > 0)  # every training sample was ensembled


class _Interrupt(Exception):
    pass


def test_resume_restores_the_ensemble_exactly(cifar_jpg_dir, tmp_path):
    from at_memorization.training import Callbacks, RunConfig, Trainer

    def config():
        return RunConfig(method="pgd-at-te", dataset="imagefolder", data_dir=str(cifar_jpg_dir), model="smallcnn",
                         epochs=3, batch_size=50, steps=2, eval_steps=2, train_size=200, test_size=40,
                         milestones=[2, 3], method_args={"te_start": 1, "te_end": 2})

    Trainer(config(), tmp_path / "full", device="cpu").fit()

    def stop_after_epoch_2(record):
        if record["epoch"] == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        Trainer(config(), tmp_path / "cut", device="cpu", callbacks=Callbacks(epoch_end=stop_after_epoch_2)).fit()
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2
    resumed = Trainer(config(), tmp_path / "cut", device="cpu", resume=True)
    assert resumed.start_epoch == 3
    resumed.fit()
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    again = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert torch.equal(full["method"]["state"]["te"]["ensemble"], again["method"]["state"]["te"]["ensemble"])
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, again["model"][name]), name
    assert [r["epoch"] for r in _metrics(tmp_path / "cut")] == [1, 2, 3]


def test_drop_in_example_runs(mnist_dir):
    result = run_with_hang_guard([sys.executable, str(ROOT / "examples" / "drop_in_te.py"), "--data-dir",
                                  str(mnist_dir), "--train-size", "256", "--test-size", "64", "--epochs", "4"], env=ENV)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("epoch")]
    assert len(lines) == 4
    assert "te_weight_now 0 " in lines[0] and "te_weight_now 300" in lines[3]


def test_custom_method_plugin_is_discovered_and_trains(mnist_dir, tmp_path):
    target = tmp_path / "site"
    # pip --quiet says nothing until it is done: its silence is its whole run, hence the longer guard.
    install = run_with_hang_guard([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                   "--no-build-isolation", "--no-index", "--target", str(target),
                                   str(ROOT / "examples" / "custom_method_plugin")], env=ENV, silence_s=600)
    assert install.returncode == 0, install.stderr
    env = {**ENV, "PYTHONPATH": f"{target}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    listed = run_with_hang_guard([sys.executable, "-m", "at_memorization", "methods"], env=env)
    assert listed.returncode == 0, listed.stderr
    line = next(l for l in listed.stdout.splitlines() if l.startswith("fast-at"))
    assert "at-mem-fast-at" in line and "fast_at_plugin" in line
    run = tmp_path / "fast"
    trained = run_with_hang_guard([sys.executable, "-m", "at_memorization", "train", *tiny_train_args(
        mnist_dir, run, "--fgsm-step", 0.1, method="fast-at", train_size=128, test_size=32, eps=0.1, eval_steps=2)],
        env=env)
    assert trained.returncode == 0, trained.stderr
    assert _metrics(run)[0]["epoch"] == 1
    assert json.loads((run / "config.json").read_text())["method"]["fgsm_step"] == 0.1
    # Its TE variant is four lines (extensions = (TemporalEnsembling,)) and trains with the TE penalty on.
    assert any(l.startswith("fast-at-te") for l in listed.stdout.splitlines())
    run_te = tmp_path / "fast-te"
    trained = run_with_hang_guard([sys.executable, "-m", "at_memorization", "train", *tiny_train_args(
        mnist_dir, run_te, "--te-start", 1, "--te-end", 2, method="fast-at-te", epochs=2, train_size=128, test_size=32,
        eps=0.1, eval_steps=2)], env=env)
    assert trained.returncode == 0, trained.stderr
    records = _metrics(run_te)
    assert [r["te_weight_now"] for r in records] == [pytest.approx(300 * math.exp(-5.0)), 300.0]
    assert records[1]["te_loss"] > 0 and math.isfinite(records[1]["train_loss"])
    state = torch.load(run_te / "last.pt", weights_only=True)
    assert state["method"]["state"]["te"]["ensemble"].abs().sum() > 0  # the ensemble was fed by the plugin's run
