"""The analysis commands end to end on a tiny real tracked run (MNIST), and their bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_testing import tiny_train_args
from click.testing import CliRunner

from at_memorization.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tracked_run(mnist_dir, tmp_path_factory):
    """256 MNIST images, 2 epochs of PGD-AT (2 steps), per-sample tracking and train accuracies."""
    out = tmp_path_factory.mktemp("analysis") / "pgd-at-run"
    result = invoke("train", *tiny_train_args(mnist_dir, out, epochs=2, batch_size=64, lr=0.01, train_size=256,
                                              test_size=64, eval_train_size=64, eps=0.1, step_size=0.05, steps=2,
                                              eval_steps=2, track_samples=True))
    assert result.exit_code == 0, result.output
    return out


def test_memorization_report_on_a_real_tracked_run(tracked_run, tmp_path):
    result = invoke("memorization", tracked_run, tracked_run, "--output", tmp_path / "mem.json",
                    "--plot", tmp_path / "mem.png")
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "mem.json").read_text())
    report = out["reports"][0]
    tracked = torch.load(tracked_run / "tracking.pt", weights_only=True)
    assert tracked["adv_correct"].shape == (2, 256) and tracked["adv_loss"].dtype == torch.float16
    assert report["samples"] == 256 and report["epochs"] == 2
    assert report["fitted_at_end"] + report["never_fitted"] == 256
    assert report["fitted_at_end"] == int(tracked["adv_correct"][1].sum())
    assert sum(report["per_epoch"]["newly_fitted"]) == report["fitted_at_end"]
    assert report["per_epoch"]["tracked_adv_acc"][1] == pytest.approx(tracked["adv_correct"][1].float().mean().item())
    assert report["noisy_labels"]["noisy"]["count"] == 0  # true labels
    assert len(out["comparison"]["runs"]) == 2
    assert "samples fitted after epoch" in result.output
    assert (tmp_path / "mem.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_command_writes_a_png(tracked_run, tmp_path):
    from PIL import Image

    result = invoke("plot", tracked_run, tracked_run, "--output", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 0
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size[0] > image.size[1] * 0.8 and image.size[0] >= 600  # two columns


def test_gradient_stability_command(tracked_run, tmp_path):
    result = invoke("gradient-stability", tracked_run / "last.pt", "--output", tmp_path / "gs.json",
                    "--plot", tmp_path / "gs.png", "--n-batches", 1, "--batch-size", 32, "--radii", "1e-2,1",
                    "--draws", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "gs.json").read_text())
    assert set(out["losses"]) == {"pgd-at", "trades", "clean"}
    assert out["radii"] == [0.01, 1.0] and out["n_points"] == 32 and out["eps"] == pytest.approx(0.1)
    for values in out["losses"].values():
        assert len(values["ratio_mean"]) == 2 and all(v > 0 for v in values["ratio_mean"])
    # the PGD-AT loss is the loss on adversarial examples: at least the clean loss
    assert out["losses"]["pgd-at"]["loss"] >= out["losses"]["clean"]["loss"]
    assert (tmp_path / "gs.png").read_bytes()[:8] == PNG_SIGNATURE


def test_measures_command_ranks_checkpoints(tracked_run, tmp_path):
    result = invoke("measures", tracked_run / "best.pt", tracked_run, "--output", tmp_path / "m.json",
                    "--n-points", 64, "--gap-points", 64, "--draws", 1, "--awp-steps", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "m.json").read_text())
    first, last = out["checkpoints"]
    assert last["checkpoint"].endswith("last.pt") and last["epoch"] == 2
    assert last["measures"]["distance_from_init"] > 0  # init.pt was found
    assert last["gaps"]["robust_gap"] == pytest.approx(last["gaps"]["train_robust_acc"] - last["gaps"]["test_robust_acc"])
    assert len(last["details"]["layers"]) == 7  # smallcnn: 4 conv + 3 linear
    assert set(out["ranking"]["measures"]) >= {"path_norm", "awp_flatness", "spectral_complexity_adv"}
    assert "Kendall tau" in result.output


def test_bad_input_gives_one_line_errors(tracked_run, tmp_path):
    cases = [
        (("memorization", tmp_path / "absent", "--output", tmp_path / "x.json"), "no such run folder"),
        (("plot", tmp_path / "absent", "--output", tmp_path / "x.png"), "no such run folder"),
        (("plot", tracked_run, "--output", tmp_path / "x.jpg"), "must be a .png"),
        (("measures", tmp_path / "absent.pt", "--output", tmp_path / "x.json"), "no such checkpoint"),
        (("gradient-stability", tmp_path, "--output", tmp_path / "x.json"), "without last.pt"),
        (("measures", tracked_run, "--output", tmp_path / "x.json", "--sigma", "-1"), "--sigma must be positive"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        last = result.output.strip().splitlines()[-1]  # measures first says what it starts on (stderr)
        assert last.startswith("Error: ") and message in last, result.output
        assert "Traceback" not in result.output
    result = invoke("gradient-stability", tracked_run, "--output", tmp_path / "x.json", "--radii", "0,-1")
    assert result.exit_code == 2 and "positive" in result.output
    # a run trained without --track-samples
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    (untracked / "metrics.jsonl").write_text((tracked_run / "metrics.jsonl").read_text())
    result = invoke("memorization", untracked, "--output", tmp_path / "x.json")
    assert result.exit_code == 1 and "train the run with --track-samples" in result.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = invoke("measures", garbage, "--output", tmp_path / "x.json")
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "unreadable checkpoint" in result.output
