"""CI-sized run of benchmarks/bench_train.py on CPU: the JSON has every field, throughputs are positive.

Speed itself is measured by the benchmark, never asserted here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_writes_a_complete_report(mnist_dir, tmp_path):
    output = tmp_path / "bench.json"
    _bench().main(["--device", "cpu", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model", "smallcnn",
                   "--batch-size", "32", "--iters", "2", "--warmup", "0", "--repeats", "1", "--steps", "2",
                   "--epoch-estimate", "--estimate-models", "smallcnn", "--estimate-batches", "16",
                   "--note", "CI", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["device"] == "cpu" and report["device_name"]
    assert report["versions"]["torch"] and report["versions"]["torchattacks"] and report["versions"]["timm"]
    assert report["settings"]["data"] == "real:mnist" and report["settings"]["batch_size"] == 32
    assert report["note"] == "CI" and report["peak_rss_bytes"] > 0
    assert set(report["methods"]) == {"pgd-at", "pgd-at-te", "trades", "trades-te"}
    for method, result in report["methods"].items():
        assert result["images_per_timing"] == 64 and result["steps_per_timing"] == 2
        assert result["package_images_per_s"] > 0 and result["reference_images_per_s"] > 0, method
        assert result["speedup_vs_reference"] == result["package_images_per_s"] / result["reference_images_per_s"]
        assert len(result["seconds"]["package"]) == len(result["seconds"]["reference"]) == 1
    for key in ("pgd-at-te_vs_pgd-at", "trades-te_vs_trades"):
        assert isinstance(report["te_overhead"][key]["package"], float)
    (row,) = report["epoch_estimate"]
    assert row["model"] == "smallcnn" and row["batch_size"] == 16 and row["data"] == "random-uint8"
    assert row["seconds_per_cifar10_epoch"] > 0 and row["forward_equivalents_per_image_step"] == 7
    assert abs(row["forward_gflop_per_image"] - 0.0292) < 0.001
    assert row["mfu_vs_bf16_peak"] is None  # no known peak for a CPU


def test_peak_table_and_flop_count_match_the_issue():
    bench = _bench()
    assert bench.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_bf16("AMD EPYC") is None
    assert abs(bench.forward_flops("preactresnet18", (3, 32, 32)) / 1e9 - 1.11) < 0.01


def test_full_epoch_reports_the_epoch_a_user_waits_for(mnist_dir, tmp_path):
    """--full-epoch: Trainer.fit with a smaller last batch, the per-epoch evaluation and checkpoints,
    each epoch split into training, test evaluation, training-set evaluation and the rest."""
    output = tmp_path / "full.json"
    _bench().main(["--device", "cpu", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--model", "smallcnn",
                   "--batch-size", "16", "--steps", "1", "--full-epoch", "--skip-compare", "--methods", "pgd-at",
                   "--epochs", "2", "--train-size", "70", "--test-size", "40", "--eval-train-size", "20",
                   "--eval-steps", "2", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["methods"] == {} and len(report["load_average"]["start"]) == 3
    full = report["full_epoch"]["pgd-at"]
    assert full["train_size"] == 70 and full["full_batches"] == 4 and full["last_batch"] == 6
    assert full["test_size"] == 40 and full["eval_train_size"] == 20
    assert [e["epoch"] for e in full["epochs"]] == [1, 2]
    for epoch in full["epochs"]:
        parts = epoch["train"] + epoch["eval_test"] + epoch["eval_train"] + epoch["checkpoint_and_bookkeeping"]
        assert abs(parts - epoch["epoch_total"]) < 1e-9
        assert min(epoch["train"], epoch["eval_test"], epoch["eval_train"], epoch["write_last_checkpoint"]) > 0
        assert epoch["train_seconds_recorded"] <= epoch["train"]  # the run's own figure is inside ours
        assert epoch["images_per_s_full_epoch"] == 70 / epoch["epoch_total"]
    assert abs(sum(full["last_epoch_share"].values()) - 1) < 1e-9
