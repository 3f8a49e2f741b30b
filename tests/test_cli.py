"""The `at-mem` command line: one-line errors for every bad input, and end-to-end runs on real data."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from at_memorization import checkpoint as ckpt


from cli_testing import assert_one_line_error, invoke, subprocess_env, tiny_train_args


def tiny_train(data_dir, out, *extra, dataset="mnist"):
    return ["train", *tiny_train_args(data_dir, out, *extra, dataset=dataset, device=None)]


# --------------------------------------------------------------------------- bad inputs
def test_unknown_dataset(tmp_path):
    assert_one_line_error(invoke("train", "--dataset", "imagenet", "--out", tmp_path / "r"), "imagenet")


def test_unknown_model(mnist_dir, tmp_path):
    result = invoke(*tiny_train(mnist_dir, tmp_path / "r", "--model", "no_such_net"))
    assert_one_line_error(result, "unknown model 'no_such_net'")


def test_unknown_method(mnist_dir, tmp_path):
    result = invoke(*tiny_train(mnist_dir, tmp_path / "r", "--method", "free-at"))
    assert_one_line_error(result, "unknown method 'free-at'", "pgd-at", "trades")


@pytest.mark.parametrize("args, words", [
    (["--eps=-1"], ["eps must be >= 0"]),
    (["--eps", "8/0"], ["8/0", "fraction"]),
    (["--eps", "abc"], ["abc"]),
    (["--step-size=-1/255"], ["--step-size"]),
    (["--label-noise", "1.5"], ["--label-noise must be in [0, 1]"]),
    (["--input-noise", "gaussian", "--input-noise-fraction", "2"], ["--input-noise-fraction"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--train-size", "0"], ["--train-size must be >= 1"]),
    (["--milestones", "a,b"], ["100,150"]),
    (["--beta", "6"], ["--beta does not apply to method pgd-at", "trades"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], ["device"]),
    (["--device", "tpu"], ["tpu"]),
    (["--momentum=-1"], ["--momentum must be in [0, 1)"]),
    (["--eval-train-size=-5"], ["--eval-train-size must be >= 0"]),
    (["--milestones", "0,3"], ["--milestones must be >= 1"]),
    (["--drop-rate", "1.5"], ["--drop-rate must be in [0, 1)"]),
    (["--model", "preactresnet18_w16", "--drop-rate", "0.1"], ["no dropout", "--drop-rate"]),
])
def test_bad_training_options(mnist_dir, tmp_path, args, words):
    result = invoke(*tiny_train(mnist_dir, tmp_path / "r", *args))
    assert_one_line_error(result, *words)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    result = invoke(*tiny_train(missing, tmp_path / "r"))
    assert_one_line_error(result, str(missing), "train-images-idx3-ubyte.gz")
    result = invoke(*tiny_train(missing, tmp_path / "r", dataset="imagefolder"))
    assert_one_line_error(result, str(missing / "train"), "DIR/train/<class>")


def test_resume_without_a_run(mnist_dir, tmp_path):
    result = invoke(*tiny_train(mnist_dir, tmp_path / "r", "--resume"))
    assert_one_line_error(result, "--resume", "nothing to resume")


def test_resume_with_a_different_configuration(mnist_dir, tmp_path):
    out = tmp_path / "r"
    result = invoke(*tiny_train(mnist_dir, out))
    assert result.exit_code == 0, result.output
    result = invoke(*tiny_train(mnist_dir, out, "--resume", "--lr", "0.5"))
    assert_one_line_error(result, "configuration differs", "'lr'", "0.5")
    result = invoke(*tiny_train(mnist_dir, out))
    assert_one_line_error(result, "already holds a run", "--resume")
    result = invoke(*tiny_train(mnist_dir, out, "--resume"))
    assert result.exit_code == 0 and "already finished all 1 epochs" in result.output


@pytest.fixture
def bad_checkpoints(tmp_path):
    files = {}
    files["garbage"] = tmp_path / "garbage.pt"
    files["garbage"].write_bytes(b"\x00\x01 definitely not a checkpoint" * 20)
    files["foreign"] = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, files["foreign"])
    files["pickle"] = tmp_path / "pickle.pt"
    torch.save({"format": ckpt.FORMAT, "args": argparse.Namespace(lr=0.1)}, files["pickle"])
    return files


@pytest.mark.parametrize("kind, words", [
    ("missing", ["no such checkpoint file"]),
    ("garbage", ["unreadable checkpoint"]),
    ("foreign", ["not an at-memorization checkpoint"]),
    ("pickle", ["arbitrary Python objects", "argparse.Namespace"]),
])
def test_evaluate_bad_checkpoints(bad_checkpoints, tmp_path, kind, words):
    path = bad_checkpoints.get(kind, tmp_path / "missing.pt")
    result = invoke("evaluate", path, "--attack", "clean", "--n-examples", 8)
    line = assert_one_line_error(result, str(path), *words)
    if kind == "garbage":
        assert "arbitrary" not in line


def test_evaluate_bad_options(mnist_dir, tmp_path):
    out = tmp_path / "r"
    assert invoke(*tiny_train(mnist_dir, out)).exit_code == 0
    last = out / "last.pt"
    assert_one_line_error(invoke("evaluate", last, "--n-examples", 0), "--n-examples must be positive")
    assert_one_line_error(invoke("evaluate", last, "--eps=-0.1", "--n-examples", 4), "eps must be >= 0")
    assert_one_line_error(invoke("evaluate", last, "--attack", "fgsm"), "fgsm")
    assert_one_line_error(invoke("evaluate", last, "--attack", "clean", "--model-card", tmp_path / "c.json"),
                          "--model-card needs --attack autoattack")
    assert_one_line_error(invoke("evaluate", last, "--attack", "clean", "--n-examples", 4,
                                 "--data-dir", tmp_path / "nowhere"), str(tmp_path / "nowhere"))
    if not torch.cuda.is_available():
        assert_one_line_error(invoke("evaluate", last, "--attack", "clean", "--n-examples", 4, "--device", "cuda"),
                              "cuda")
    assert_one_line_error(invoke("evaluate", last, "--attack", "clean", "--batch-size", 0), "--batch-size must be positive")


def test_evaluate_on_data_of_another_shape(mnist_dir, cifar_jpg_dir, tmp_path):
    out = tmp_path / "r"
    assert invoke(*tiny_train(mnist_dir, out)).exit_code == 0  # 1-channel 28x28
    result = invoke("evaluate", out / "last.pt", "--attack", "clean", "--n-examples", 4,
                    "--dataset", "imagefolder", "--data-dir", cifar_jpg_dir)
    assert_one_line_error(result, "3x32x32", "1-channel 28x28")
    import at_memorization

    model = at_memorization.load_model(out / "last.pt")  # the safe Python loader
    assert not model.training and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_methods_lists_the_four_methods_with_their_modules():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    expected = {"pgd-at": "at_memorization.methods.pgd_at", "trades": "at_memorization.methods.trades",
                "pgd-at-te": "at_memorization.plugins.temporal_ensembling",
                "trades-te": "at_memorization.plugins.temporal_ensembling"}
    for name, module in expected.items():
        line = next(line for line in lines if line.split()[0] == name)
        assert "at-memorization" in line and module in line
    # each method's settings with their defaults for 200 epochs, the derived ones resolved
    assert "[--beta 6.0 --awp-gamma 0.005 --awp-warmup 9]" in result.output  # trades-awp: TRADES' own AWP defaults
    assert "[--te-momentum 0.9 --te-weight 300.0 --te-start 90 --te-end 150]" in result.output
    models = invoke("models")
    assert models.exit_code == 0 and "preactresnet18" in models.output.split()


def test_real_processes_help_and_error(tmp_path):
    env = subprocess_env()
    script = shutil.which("at-mem") or os.path.join(os.path.dirname(sys.executable), "at-mem")
    assert os.path.exists(script), "the at-mem console script is not installed"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout
    missing = tmp_path / "missing.pt"
    result = subprocess.run([sys.executable, "-m", "at_memorization", "evaluate", str(missing)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {missing}: no such checkpoint file"


# --------------------------------------------------------------------------- end to end on real data
@pytest.mark.slow
def test_mnist_pgd_at_then_autoattack(mnist_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *tiny_train_args(mnist_dir, out, method="pgd-at", epochs=2, train_size=512, test_size=64,
                                              batch_size=64, eps=0.1, step_size=0.05, steps=2, eval_steps=2, lr=0.05,
                                              device=None))
    assert result.exit_code == 0, result.output
    assert "epoch 2:" in result.output and "done: best epoch" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["test_clean_acc"] > 0.3  # it learned something in 2 short epochs

    report = tmp_path / "x.json"
    # At eps 0.3 APGD-CE breaks most points, so the slow later attacks (Square: 5000 queries) run on few.
    result = invoke("evaluate", out / "best.pt", "--attack", "autoattack", "--n-examples", 32, "--eps", "0.3",
                    "--output", report)
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert record["n_examples"] == 32 and record["dataset"] == "mnist" and record["model"] == "smallcnn"
    assert record["method"] == "pgd-at" and record["eps"] == pytest.approx(0.3) and record["norm"] == "Linf"
    assert "pyautoattack" in record["autoattack_protocol"]
    assert 0.0 <= record["autoattack_acc"] <= 1.0
    assert record["autoattack_acc"] <= record["clean_acc"] <= 1.0  # clean accuracy always comes with AutoAttack
    assert f"autoattack_acc: {record['autoattack_acc']:.4f}" in result.output


@pytest.mark.slow
def test_cifar_jpeg_trades_then_all_attacks_and_model_card(cifar_jpg_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("train", *tiny_train_args(cifar_jpg_dir, out, "--beta", 6, method="trades", dataset="imagefolder",
                                              epochs=2, train_size=200, test_size=40, batch_size=50, steps=2,
                                              eval_steps=2, device=None))
    assert result.exit_code == 0, result.output
    last = ckpt.load_checkpoint(out / "last.pt")
    assert last["method"]["name"] == "trades" and last["method"]["config"]["beta"] == 6.0
    assert last["dataset"] == "imagefolder" and last["in_chans"] == 3 and last["num_classes"] == 10
    assert last["config"]["augment"] is True

    report, card = tmp_path / "eval.json", tmp_path / "card.json"
    result = invoke("evaluate", out / "last.pt", "--attack", "all", "--n-examples", 32, "--output", report,
                    "--model-card", card)
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    for key in ("clean_acc", "pgd20_acc", "cw_acc", "autoattack_acc"):
        assert 0.0 <= record[key] <= 1.0, key
    assert record["pgd20_acc"] <= record["clean_acc"] and record["autoattack_acc"] <= record["clean_acc"]
    assert record["eps"] == pytest.approx(8 / 255) and record["n_examples"] == 32
    model_card = json.loads(card.read_text())
    assert model_card["dataset"] == "imagefolder"
    for key, fraction in (("clean_acc", record["clean_acc"]), ("autoattack_acc", record["autoattack_acc"])):
        assert isinstance(model_card[key], str)
        assert float(model_card[key]) == pytest.approx(100 * fraction, abs=0.01)


def test_evaluation_batch_size_defaults_to_large_batches_on_a_gpu():
    from at_memorization.evaluation import default_batch_size

    assert default_batch_size("cpu") == 256
    assert default_batch_size("cuda") == default_batch_size("cuda:1") == 1024
