"""The memorization report on a hand-made tracked run with a known answer."""

from __future__ import annotations

import json

import pytest
import torch

from at_memorization.user_errors import AnalysisError
from at_memorization.analysis.memorization import compare_runs, fit_epochs, memorization_report

# 5 epochs x 6 samples: rows are epochs
CORRECT = torch.tensor([
    [1, 0, 0, 1, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [1, 1, 0, 1, 0, 1],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 0, 1],
], dtype=torch.uint8)
FIT = [1, 2, 4, 3, 0, 5]  # first epoch after which each sample stays correct (0: not fitted)
TEST_ROBUST = [0.30, 0.40, 0.50, 0.45, 0.42]  # best at epoch 3, then falls
TRAIN_ROBUST = [0.30, 0.45, 0.60, 0.70, 0.80]  # keeps rising


def make_run(path, *, with_train_acc=True, noisy=(4, 5)):
    path.mkdir()
    records = []
    for e in range(5):
        record = {"epoch": e + 1, "test_robust_acc": TEST_ROBUST[e], "test_clean_acc": 0.9, "train_loss": 1.0}
        if with_train_acc:
            record["train_robust_acc"] = TRAIN_ROBUST[e]
        records.append(record)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    losses = (1.0 - CORRECT.float()).to(torch.float16) + 0.5
    # tracking files hold all planned epochs; a run stopped early has trailing zero rows
    torch.save({"adv_correct": torch.cat([CORRECT, torch.zeros(2, 6, dtype=torch.uint8)]),
                "adv_loss": torch.cat([losses, torch.zeros(2, 6, dtype=torch.float16)])}, path / "tracking.pt")
    clean = torch.tensor([0, 1, 2, 3, 4, 5])
    labels = clean.clone()
    for i in noisy:
        labels[i] = (labels[i] + 1) % 10
    torch.save({"labels": labels, "clean_labels": clean}, path / "labels.pt")
    return path


def test_fit_epochs():
    assert fit_epochs(CORRECT).tolist() == FIT
    assert fit_epochs(torch.zeros(3, 2, dtype=torch.uint8)).tolist() == [0, 0]
    assert fit_epochs(torch.ones(3, 2, dtype=torch.uint8)).tolist() == [1, 1]


def test_report_on_a_hand_made_run(tmp_path):
    report = memorization_report(make_run(tmp_path / "run"))
    assert report["epochs"] == 5 and report["samples"] == 6
    assert report["best_epoch"] == 3 and report["late_after"] == 3
    assert report["robust_overfitting"] == pytest.approx(0.08)
    assert report["final_robust_gap"] == pytest.approx(0.80 - 0.42)
    assert report["train_robust_source"] == "train_robust_acc"
    # late: fitted after epoch 3 -> samples 2 (epoch 4) and 5 (epoch 5), listed by fit epoch
    assert report["late"] == 2 and report["fraction_late"] == pytest.approx(2 / 6)
    assert report["late_samples"] == [2, 5] and report["late_samples_fit_epoch"] == [4, 5]
    assert report["never_fitted"] == 1 and report["fitted_at_end"] == 5
    # train robust rises and test robust falls at epochs 4 and 5
    assert report["diverging_epochs"] == [4, 5]
    assert report["late_in_diverging_epochs"] == 2
    per = report["per_epoch"]
    assert per["newly_fitted"] == [1, 1, 1, 1, 1]
    assert per["tracked_adv_acc"] == pytest.approx(CORRECT.float().mean(1).tolist())
    assert per["mean_adv_loss_late"][0] == pytest.approx(1.5)  # both late samples wrong at epoch 1
    noisy = report["noisy_labels"]
    assert noisy["noisy"]["count"] == 2 and noisy["noisy"]["fitted_at_end"] == 1 and noisy["noisy"]["late"] == 1
    assert noisy["clean"]["count"] == 4 and noisy["clean"]["fitted_at_end"] == 4 and noisy["clean"]["late"] == 1
    assert noisy["clean"]["mean_fit_epoch"] == pytest.approx((1 + 2 + 4 + 3) / 4)
    assert noisy["fraction_of_late_that_are_noisy"] == pytest.approx(0.5)


def test_report_options_and_fallbacks(tmp_path):
    run = make_run(tmp_path / "run", with_train_acc=False)
    report = memorization_report(run, late_after=1, max_listed=2)
    assert report["train_robust_source"] == "tracked adv_correct"
    assert report["late"] == 4 and report["late_samples"] == [1, 3]  # capped at 2, earliest first
    with pytest.raises(AnalysisError, match="late-after"):
        memorization_report(run, late_after=9)
    rows = compare_runs([report, memorization_report(make_run(tmp_path / "other"))])["runs"]
    assert [r["late"] for r in rows] == [4, 2]
    assert rows[1]["noisy_fraction_fitted"] == pytest.approx(0.5)


def test_missing_inputs_give_clear_errors(tmp_path):
    with pytest.raises(AnalysisError, match="no such run folder"):
        memorization_report(tmp_path / "absent")
    run = make_run(tmp_path / "run")
    (run / "tracking.pt").unlink()
    with pytest.raises(AnalysisError, match="--track-samples"):
        memorization_report(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="metrics.jsonl"):
        memorization_report(tmp_path / "empty")
