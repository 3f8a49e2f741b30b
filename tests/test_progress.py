"""Progress lines (issue 19): done/total, rate and ETA, every so often when the output is a file."""

from __future__ import annotations

import io

from cli_testing import invoke, tiny_train_args

from at_memorization.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_file_gets_a_line_every_interval_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    progress = Progress("epoch 3", 100, unit="steps", out=out, interval=30, clock=clock)
    for _ in range(100):
        clock.now += 1.0  # one step a second
        progress.advance()
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 30, 60 and 90 s, and the final line: not one per step
    assert lines[0] == "epoch 3: 30/100 steps (30%), 1 steps/s, 30s elapsed, ETA 1m10s"
    assert lines[-1] == "epoch 3: 100/100 steps (100%), 1 steps/s, 1m40s elapsed"


def test_notes_and_an_unknown_total():
    out, clock = io.StringIO(), Clock()
    progress = Progress("autoattack", None, unit="points", out=out, interval=10, clock=clock)
    clock.now = 20
    progress.advance(8)
    progress.note("apgd-ce done: 6 of 8 still robust")
    progress.close()
    assert out.getvalue().splitlines()[-1] == ("autoattack: 8 points, 0.4 points/s, 20s elapsed; "
                                              "apgd-ce done: 6 of 8 still robust")


def test_training_prints_step_progress_when_not_quiet(mnist_dir, tmp_path):
    result = invoke("train", *tiny_train_args(mnist_dir, tmp_path / "run", quiet=False))
    assert result.exit_code == 0, result.output
    assert "epoch 1: 2/2 steps (100%)" in result.output and "steps/s" in result.output


def test_evaluation_and_autoattack_show_progress(mnist_dir, tmp_path):
    # Before: AutoAttack printed nothing after "clean on 32 points" for 22 minutes.
    run = tmp_path / "run"
    trained = invoke("train", *tiny_train_args(mnist_dir, run))
    assert trained.exit_code == 0, trained.output
    result = invoke("evaluate", run / "last.pt", "--attack", "pgd20", "--attack", "autoattack", "--n-examples", 8,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "pgd20: 8/8 points (100%)" in result.output and "points/s" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("autoattack: "))
    assert "attacks" in line and ("4/4 attacks" in line or "no robust point left" in line), line
    assert "ETA" not in line  # a finished evaluation has none, even when attacks were skipped
