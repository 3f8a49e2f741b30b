"""Issue 31, item 4: ``te_schedule`` / ``TELoss.for_run(lr_schedule=...)`` place TE relative to a run's
learning-rate decays as the paper relates them (start 5% of the run before the first decay, full
weight at the second), for step, multi-step, cosine and one-cycle schedules, with stated rounding.
The table of docs/drop_in.md is checked against the function."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from at_memorization import TELoss
from at_memorization.plugins.temporal_ensembling import te_schedule
from at_memorization.plugins.temporal_ensembling.schedule import default_schedule, round_half_up

DROP_IN = Path(__file__).resolve().parents[1] / "docs" / "drop_in.md"


@pytest.mark.parametrize("epochs, kwargs, expected", [
    # the paper / official train_te.py: MultiStepLR([100, 150]) over 200 epochs -> --start-es 90 --end-es 150
    (200, dict(lr_schedule="multistep", milestones=[100, 150]), (90, 150)),
    # the official code's cosine runs keep 90 and 150: 45% and 75%
    (200, dict(lr_schedule="cosine"), (90, 150)),
    # TRADES' train_trades_cifar10.py: 76 epochs, lr / 10 from epoch 75 (the later decays never come)
    (76, dict(lr_schedule="multistep", milestones=[74, 89, 99]), (70, 76)),
    # StepLR(30) over 90 epochs: decays after 30 and 60
    (90, dict(lr_schedule="step", step_size=30), (25, 60)),
    # fast_adversarial CIFAR-10: 15 epochs, CyclicLR peaking at half -> 7.5 + 0.45 * 7.5 and 7.5 + 0.75 * 7.5
    (15, dict(lr_schedule="one-cycle", peak=7.5), (11, 13)),
    # rounding half up: 0.45 * 10 = 4.5 -> 5 (Python's round gives 4)
    (10, dict(lr_schedule="cosine"), (5, 8)),
    # a decay in the first epochs: the start is at least epoch 1, the end after it
    (10, dict(lr_schedule="multistep", milestones=[1]), (1, 4)),
])
def test_te_schedule_places_te_relative_to_the_decays(epochs, kwargs, expected):
    assert te_schedule(epochs, epoch_origin=1, **kwargs) == expected
    start, end = expected
    assert te_schedule(epochs, epoch_origin=0, **kwargs) == (start - 1, end - 1)
    te = TELoss.for_run(100, 10, epochs=epochs, epoch_origin=0, **kwargs)
    assert (te.start_epoch, te.end_epoch, te.epoch_origin) == (start - 1, end - 1, 0)


def test_rounding_is_stated_and_half_up():
    assert [round_half_up(v) for v in (0.5, 1.5, 2.5, 4.5, 4.49)] == [1, 2, 3, 5, 4]
    # for_run without lr_schedule keeps at-mem train's rule (Python's round, halves to even) and says so.
    assert default_schedule(10) == (4, 8) and default_schedule(200) == (90, 150)
    assert "halves to even" in TELoss.for_run.__doc__ and "rounded half up" in te_schedule.__doc__


def test_the_documented_table_matches_te_schedule():
    """docs/drop_in.md's table of codebases: each row's call gives the row's start and end."""
    rows = [line for line in DROP_IN.read_text().splitlines() if line.startswith("| ") and "`te_schedule(" in line]
    assert len(rows) >= 6
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        call = re.search(r"`(te_schedule\(.*?\))`", row).group(1)
        start, end = (int(v) for v in re.findall(r"\d+", cells[-1]))
        assert eval(call, {"te_schedule": te_schedule}) == (start, end), row


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(lr_schedule="linear"), ValueError, "lr_schedule must be one of"),
    (dict(lr_schedule="multistep"), TypeError, "needs milestones="),
    (dict(lr_schedule="cosine", milestones=[5]), TypeError, "takes no milestones="),
    (dict(lr_schedule="multistep", milestones=[5, 3]), ValueError, "increasing"),
    (dict(lr_schedule="multistep", milestones=[2.5]), TypeError, "ints"),
    (dict(lr_schedule="multistep", milestones=[20, 30]), ValueError, "never decays"),
    (dict(lr_schedule="step", step_size=0), ValueError, "positive int"),
    (dict(lr_schedule="one-cycle", peak=10), ValueError, "peak must be"),
])
def test_te_schedule_refuses_what_it_cannot_place(kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        te_schedule(10, epoch_origin=1, **kwargs)


def test_for_run_needs_lr_schedule_for_its_details():
    with pytest.raises(TypeError, match="needs lr_schedule="):
        TELoss.for_run(10, 3, epochs=20, epoch_origin=1, milestones=[10, 15])
