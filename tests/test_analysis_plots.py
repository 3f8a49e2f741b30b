"""The figures are real PNG files of the expected size."""

from __future__ import annotations

import pytest

from at_memorization.analysis.plots import plot_gradient_stability, plot_memorization, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=200, min_height=200):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as image:
        image.load()
        width, height = image.size
    assert width >= min_width and height >= min_height
    return width, height


def records(n=6, te=False, train_acc=True):
    out = []
    for e in range(1, n + 1):
        r = {"epoch": e, "test_clean_acc": 0.5 + 0.05 * e, "test_robust_acc": 0.3 + 0.04 * e - 0.02 * max(0, e - 3) ** 2,
             "train_adv_acc": 0.2 + 0.1 * e, "train_loss": 2.0 / e, "grad_norm": 1.0 + 0.1 * e}
        if train_acc:
            r.update(train_clean_acc=0.55 + 0.07 * e, train_robust_acc=0.35 + 0.1 * e)
        if te:
            r["te_weight"] = 0.0 if e < 3 else 30.0 * (e - 2)
        out.append(r)
    return out


def test_plot_runs_side_by_side(tmp_path):
    one = assert_png(plot_runs([("a", records())], tmp_path / "one.png"))
    three = assert_png(plot_runs([("a", records()), ("b", records(te=True)), ("c", records(train_acc=False))],
                                 tmp_path / "sub" / "three.png"))
    assert three[0] > 2.5 * one[0]  # three columns
    assert three[1] > one[1]  # the TE-weight row was added
    with pytest.raises(ValueError):
        plot_runs([], tmp_path / "none.png")


def test_plot_gradient_stability_and_memorization(tmp_path):
    result = {"radii": [1e-3, 1e-2], "checkpoint": "/x/run/last.pt",
              "losses": {"pgd-at": {"ratio_mean": [5.0, 4.0], "ratio_std": [0.1, 0.2]},
                         "trades": {"ratio_mean": [2.0, 1.5], "ratio_std": [0.1, 0.1]},
                         "clean": {"ratio_mean": [1.0, 0.9], "ratio_std": [0.0, 0.0]}}}
    assert_png(plot_gradient_stability([result, result], tmp_path / "gs.png"))
    report = {"run": "r", "samples": 10, "late": 2, "late_after": 2, "best_epoch": 2,
              "per_epoch": {"epoch": [1, 2, 3], "newly_fitted": [5, 1, 2], "test_robust_acc": [0.1, 0.3, 0.2],
                            "train_robust_acc": [0.2, 0.5, 0.8]}}
    assert_png(plot_memorization([report], tmp_path / "mem.png"))


def test_mean_band_over_seeds_and_the_robust_gap():
    from at_memorization.analysis.plots import _mean_band

    a, b = records(4), records(4)
    for r in b:
        r["test_robust_acc"] += 0.1
        r["train_robust_acc"] += 0.3
    epochs, mean, low, high = _mean_band([a, b[:3]], "test_robust_acc")
    assert epochs == [1, 2, 3, 4]
    assert mean[0] == pytest.approx(a[0]["test_robust_acc"] + 0.05)
    assert (low[0], high[0]) == pytest.approx((a[0]["test_robust_acc"], a[0]["test_robust_acc"] + 0.1))
    assert mean[3] == pytest.approx(a[3]["test_robust_acc"])  # only one run reached epoch 4
    _, gap, _, _ = _mean_band([a, b], "robust_gap")
    assert gap[1] == pytest.approx(a[1]["train_robust_acc"] - a[1]["test_robust_acc"] + 0.1)
    assert _mean_band([records(3, train_acc=False)], "robust_gap")[0] == []


def test_plot_groups_overlays_methods(tmp_path):
    from at_memorization.analysis.plots import plot_groups

    four = assert_png(plot_groups([("pgd-at", [records(), records()]), ("pgd-at-te", [records(te=True)])],
                                  tmp_path / "groups.png"))
    # without training accuracies the train-robust and gap panels are left out
    two = assert_png(plot_groups([("pgd-at", [records(train_acc=False)])], tmp_path / "two.png"))
    assert four[0] > 1.5 * two[0]
    with pytest.raises(ValueError):
        plot_groups([], tmp_path / "none.png")


def test_te_weight_is_read_under_both_names_per_record():
    from at_memorization.analysis.plots import _logged_series
    from at_memorization.plugins.temporal_ensembling import TemporalEnsembling

    (te_weight,) = TemporalEnsembling.logged  # as the TE plugin declares it
    resumed = records(5, te=True)  # te_weight, as runs logged it before it was named te_weight_now
    for r in resumed[3:]:  # the epochs after a resume with the renamed metric
        r["te_weight_now"] = r.pop("te_weight")
    assert _logged_series(resumed, te_weight) == ([1, 2, 3, 4, 5], [0.0, 0.0, 30.0, 60.0, 90.0])
    assert _logged_series(records(3), te_weight) == ([], [])


def test_a_row_per_declared_value_a_run_logged(captured, tmp_path):
    """The TE weight (declared to plot) gets a row when a run logged it; the AWP gamma (declared not
    to) never does."""
    def awp(rs):
        return [{**r, "awp_gamma_now": 0.01} for r in rs]

    plot_runs([("a", awp(records()))], tmp_path / "p.png")
    plot_runs([("a", awp(records())), ("b", records(te=True))], tmp_path / "q.png")
    assert [ax.get_ylabel() for ax in captured[0].axes[:3]] == ["accuracy", "robust gap", "grad norm (mean/epoch)"]
    assert len([ax for ax in captured[0].axes if ax.get_ylabel() == "TE weight"]) == 0
    te_rows = [ax for ax in captured[1].axes if ax.get_ylabel() == "TE weight"]
    assert len(te_rows) == 2 and [t.get_text() for t in te_rows[0].texts] == ["no TE weight"]
    assert not any("AWP" in ax.get_ylabel() for figure in captured for ax in figure.axes)


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save (kept open for inspection)."""
    from at_memorization.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_an_unfinished_run_is_marked_last_so_far_and_runs_share_one_integer_epoch_axis(captured, tmp_path):
    # Before: an unfinished run's last epoch was labelled "final"; runs of different lengths got
    # separate x axes; ticks read 2.5, 7.5.
    plot_runs([("short", records(4)), ("long", records(9))], tmp_path / "p.png", planned=[10, 9])
    fig = captured[0]
    top = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert any(t.startswith("last so far (of 10) ep 4") for t in _legend_texts(top[0]))
    assert any(t.startswith("final ep 9") for t in _legend_texts(top[1]))
    limits = {ax.get_xlim() for ax in fig.axes if ax.get_xlabel() == "epoch" or ax in top}
    assert limits == {(0.5, 10.5)}  # up to the longest planned run
    fig.canvas.draw()
    for ax in top:
        ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 10.5]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_memorization_plot_legend_names_early_and_late_bars(captured, tmp_path):
    report = {"run": "r", "samples": 10, "late": 3, "late_after": 2, "best_epoch": 2,
              "per_epoch": {"epoch": [1, 2, 3, 4], "newly_fitted": [4, 2, 2, 1], "test_robust_acc": [0.1, 0.3, 0.2, 0.2],
                            "train_robust_acc": [0.2, 0.4, 0.6, 0.8]}}
    plot_memorization([report], tmp_path / "m.png")
    texts = _legend_texts(captured[0].axes[0])
    assert "newly fitted, stays fitted" in texts and "... late (after epoch 2)" in texts
