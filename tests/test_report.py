"""`at-mem evaluate RUN_DIR` (best and last into RUN/eval/, merged across calls) and `at-mem report`.

Four real tiny runs (pgd-at and pgd-at-te, seeds 0 and 1, smallcnn on MNIST) are trained and
evaluated once per module; the report's numbers are checked against values recomputed from the
files the runs wrote.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics

import pytest

from cli_testing import assert_one_line_error as shared_one_line_error, invoke, tiny_train_args

METHODS = ("pgd-at", "pgd-at-te")
SEEDS = (0, 1)
EVAL_KEYS = ("checkpoint", "epoch", "dataset", "model", "method", "n_examples", "eps", "norm", "seed", "device",
             "clean_acc", "pgd20_acc")


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result, *words):
    return shared_one_line_error(result, *words, exit_code=1)


def read_json(path):
    return json.loads(path.read_text())


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def best_epoch(records):
    """Independent of the library: highest robust, then clean; the first such epoch wins."""
    best = records[0]
    for record in records[1:]:
        if (record["test_robust_acc"], record["test_clean_acc"]) > (best["test_robust_acc"], best["test_clean_acc"]):
            best = record
    return best


def copy_run(src, dst, checkpoints=False):
    """A copy of a run folder; without checkpoints, only what `report` reads."""
    if checkpoints:
        shutil.copytree(src, dst)
        return dst
    dst.mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(src / name, dst / name)
    if (src / "eval").is_dir():
        shutil.copytree(src / "eval", dst / "eval")
    return dst


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
    """{(method, seed): run folder}, trained and then evaluated with `at-mem evaluate RUN_DIR`."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in METHODS:
        for seed in SEEDS:
            run = root / f"{method}-s{seed}"
            ok("train", *tiny_train_args(mnist_dir, run, method=method, test_size=32, epochs=3, eval_train_size=16,
                                         seed=seed))
            result = ok("evaluate", run, "--attack", "clean", "--attack", "pgd20", "--n-examples", 32,
                        "--device", "cpu")
            assert f"wrote {run / 'eval' / 'best.json'}" in result.stdout
            assert f"wrote {run / 'eval' / 'last.json'}" in result.stdout
            out[method, seed] = run
    return out


# --------------------------------------------------------------------------- evaluate RUN_DIR
def test_evaluate_run_folder_writes_best_and_last(runs, tmp_path):
    for run in runs.values():
        records = read_metrics(run)
        best, last = read_json(run / "eval" / "best.json"), read_json(run / "eval" / "last.json")
        assert best["epoch"] == best_epoch(records)["epoch"]
        assert last["epoch"] == records[-1]["epoch"] == 3
        for record, name in ((best, "best"), (last, "last")):
            assert set(EVAL_KEYS) <= set(record)
            assert record["checkpoint"] == str(run / f"{name}.pt") and record["n_examples"] == 32
            assert record["n_examples_by_attack"] == {"clean": 32, "pgd20": 32}
            assert record["seed_by_attack"] == {"clean": 0, "pgd20": 0}
            for key in ("clean_acc", "pgd20_acc"):
                assert 0.0 <= record[key] <= 1.0
            assert "cw_acc" not in record
        if best["epoch"] == last["epoch"]:  # the same weights: evaluated once, the same numbers
            assert (best["clean_acc"], best["pgd20_acc"]) == (last["clean_acc"], last["pgd20_acc"])

    # Evaluating the checkpoint file itself still works as before and gives the same numbers.
    run = runs["pgd-at", 0]
    output = tmp_path / "last.json"
    result = ok("evaluate", run / "last.pt", "--attack", "clean", "--attack", "pgd20", "--n-examples", 32,
                "--device", "cpu", "--output", output)
    assert f"wrote {output}" in result.stdout
    single, folder = read_json(output), read_json(run / "eval" / "last.json")
    assert set(EVAL_KEYS) <= set(single)
    assert {k: single[k] for k in EVAL_KEYS if k != "checkpoint"} == {k: folder[k] for k in EVAL_KEYS if k != "checkpoint"}


def test_second_evaluate_merges_into_the_existing_files(runs, tmp_path):
    run = copy_run(runs["pgd-at", 1], tmp_path / "run", checkpoints=True)
    best_before = (run / "eval" / "best.json").read_text()
    last_before = read_json(run / "eval" / "last.json")
    result = ok("evaluate", run, "--checkpoints", "last", "--attack", "cw", "--n-examples", 16, "--seed", 3,
                "--device", "cpu")
    assert "best" not in result.stdout.replace(str(run), "")  # only last.pt was evaluated
    assert (run / "eval" / "best.json").read_text() == best_before
    last = read_json(run / "eval" / "last.json")
    assert last["clean_acc"] == last_before["clean_acc"] and last["pgd20_acc"] == last_before["pgd20_acc"]
    assert 0.0 <= last["cw_acc"] <= 1.0
    assert last["n_examples_by_attack"] == {"clean": 32, "pgd20": 32, "cw": 16}
    assert last["seed_by_attack"] == {"clean": 0, "pgd20": 0, "cw": 3}
    assert last["n_examples"] == 16 and last["seed"] == 3  # the last call's settings
    assert "overwriting" not in result.output

    # Results for another checkpoint (here: another epoch) or another eps are replaced, with a note.
    stale = dict(last, epoch=1)
    (run / "eval" / "last.json").write_text(json.dumps(stale))
    result = ok("evaluate", run, "--checkpoints", "last", "--attack", "clean", "--n-examples", 8, "--device", "cpu")
    assert "held results for epoch 1 (now 3); overwriting it" in result.stderr
    last = read_json(run / "eval" / "last.json")
    assert last["epoch"] == 3 and last["n_examples_by_attack"] == {"clean": 8}
    assert "pgd20_acc" not in last and "cw_acc" not in last
    result = ok("evaluate", run, "--checkpoints", "last", "--attack", "pgd20", "--n-examples", 8, "--eps", "0.1",
                "--device", "cpu")
    assert "overwriting it" in result.stderr and "eps" in result.stderr
    last = read_json(run / "eval" / "last.json")
    assert set(last["n_examples_by_attack"]) == {"pgd20"} and last["eps"] == pytest.approx(0.1)
    assert not list((run / "eval").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_evaluate_run_folder_bad_inputs(runs, tmp_path):
    run = runs["pgd-at", 0]
    assert_one_line_error(invoke("evaluate", run, "--output", tmp_path / "x.json"),
                          "--output", "run folder", str(run / "eval"))
    assert_one_line_error(invoke("evaluate", run, "--attack", "autoattack", "--model-card", tmp_path / "c.json"),
                          "--model-card", "run folder", str(run / "eval"))
    assert_one_line_error(invoke("evaluate", run / "last.pt", "--checkpoints", "last"),
                          "--checkpoints", "run folder", str(run / "last.pt"))
    assert_one_line_error(invoke("evaluate", run, "--checkpoints", "best,final"), "final", "best", "last")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke("evaluate", empty), str(empty), "not a run folder", "last.pt")
    no_best = copy_run(run, tmp_path / "no-best", checkpoints=True)
    (no_best / "best.pt").unlink()
    assert_one_line_error(invoke("evaluate", no_best, "--attack", "clean", "--n-examples", 4),
                          str(no_best / "best.pt"), "not found")
    ok("evaluate", no_best, "--checkpoints", "last", "--attack", "clean", "--n-examples", 4, "--device", "cpu")
    (no_best / "eval" / "last.json").write_text("{not json")
    assert_one_line_error(invoke("evaluate", no_best, "--checkpoints", "last", "--attack", "clean"),
                          str(no_best / "eval" / "last.json"), "not valid JSON")


# --------------------------------------------------------------------------- report
def expected_run_values(run):
    """Per-metric fractions of one run, recomputed from its files (None when absent)."""
    records = read_metrics(run)
    best, final = best_epoch(records), records[-1]
    evals = {"best": read_json(run / "eval" / "best.json"), "final": read_json(run / "eval" / "last.json")}
    values = {"epochs": final["epoch"], "best_epoch": best["epoch"],
              "best_robust_per_epoch": best["test_robust_acc"], "final_robust_per_epoch": final["test_robust_acc"],
              "gap_robust_per_epoch": best["test_robust_acc"] - final["test_robust_acc"],
              "final_train_robust": final["train_robust_acc"]}
    for which in ("best", "final"):
        for attack in ("clean", "pgd20", "cw", "autoattack"):
            values[f"{which}_{attack}"] = evals[which].get(f"{attack}_acc")
    for attack in ("pgd20", "cw", "autoattack"):
        b, f = values[f"best_{attack}"], values[f"final_{attack}"]
        values[f"gap_{attack}"] = None if b is None or f is None else b - f
    return values


def test_report_json_equals_values_recomputed_from_the_files(runs):
    result = ok("report", *runs.values(), "--format", "json", "--paired", "pgd-at:pgd-at-te")
    report = json.loads(result.stdout)
    assert report["dataset"] == "mnist"
    assert [g["label"] for g in report["groups"]] == list(METHODS)
    assert report["metrics"]["best_robust_per_epoch"] == "best PGD-1 (per epoch)"
    expected = {key: expected_run_values(run) for key, run in runs.items()}
    for group in report["groups"]:
        method = group["label"]
        assert group["seeds"] == list(SEEDS) and group["n_seeds"] == 2
        assert group["runs"] == [str(runs[method, s]) for s in SEEDS]
        assert "seed" not in group["settings"] and "data_dir" not in group["settings"]
        for key, stats in group["metrics"].items():
            values = [expected[method, s][key] for s in SEEDS]
            if values[0] is None:  # not evaluated (cw, autoattack)
                assert stats["n"] == 0 and stats["mean"] is None and stats["values"] == []
                continue
            assert stats["seeds"] == list(SEEDS) and stats["n"] == 2
            assert stats["values"] == pytest.approx(values)
            assert stats["mean"] == pytest.approx(statistics.fmean(values))
            assert stats["std"] == pytest.approx(statistics.stdev(values))
            if key.split("_", 1)[-1] in ("clean", "pgd20"):  # an eval metric
                assert stats["n_examples"] == [32, 32], key
        metrics = group["metrics"]
        assert metrics["final_robust_per_epoch"]["n_examples"] == [32, 32]  # --test-size
        assert metrics["final_train_robust"]["n_examples"] == [16, 16]  # --eval-train-size
        for s, gap in zip(SEEDS, metrics["gap_pgd20"]["values"]):
            assert gap == pytest.approx(expected[method, s]["best_pgd20"] - expected[method, s]["final_pgd20"])

    (pair,) = report["paired"]
    assert (pair["base"], pair["other"], pair["seeds"], pair["n_pairs"]) == ("pgd-at", "pgd-at-te", [0, 1], 2)
    for key in ("best_clean", "final_pgd20", "gap_pgd20", "final_robust_per_epoch", "final_train_robust"):
        diffs = [expected["pgd-at-te", s][key] - expected["pgd-at", s][key] for s in SEEDS]
        stats = pair["metrics"][key]
        assert stats["values"] == pytest.approx(diffs) and stats["seeds"] == [0, 1]
        assert stats["mean"] == pytest.approx(statistics.fmean(diffs))
        assert stats["std"] == pytest.approx(statistics.stdev(diffs))
    assert pair["metrics"]["final_cw"]["n"] == 0


def test_report_markdown_and_csv(runs, tmp_path):
    runs_list = list(runs.values())
    markdown = ok("report", *runs_list, "--paired", "pgd-at:pgd-at-te").stdout
    json_report = json.loads(ok("report", *runs_list, "--format", "json").stdout)
    lines = markdown.split("\n\n")[0].splitlines()  # the first table
    header = lines[0]
    assert header.startswith("| method | seeds | epochs | best epoch | best clean | best PGD-20 |")
    assert "CW" not in header and "AutoAttack" not in header  # measured by none of the runs
    assert "best PGD-1 (per epoch)" in header and "final train PGD-1 (per epoch)" in header
    rows = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert list(rows) == list(METHODS)  # one row per group
    for method, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2" and cells[2] == "3"  # seeds, epochs
        stats = next(g for g in json_report["groups"] if g["label"] == method)["metrics"]["best_clean"]
        assert cells[4] == f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
    assert "Test points per eval metric" in markdown and "clean 32; PGD-20 32" in markdown
    assert "| pgd-at-te - pgd-at | 2 |" in markdown  # the paired table

    output = tmp_path / "table.csv"
    result = ok("report", *runs_list, "--format", "csv", "--paired", "pgd-at:pgd-at-te", "--output", output)
    assert result.stdout.strip() == f"wrote {output}"
    table = list(csv.DictReader(io.StringIO(output.read_text())))
    assert [(r["kind"], r["label"]) for r in table] == [("group", "pgd-at"), ("group", "pgd-at-te"),
                                                         ("paired", "pgd-at-te - pgd-at")]
    for row, group in zip(table, json_report["groups"]):
        assert row["n"] == "2" and row["seeds"] == "0 1"
        for key in ("final_pgd20", "gap_robust_per_epoch", "final_train_robust"):
            stats = group["metrics"][key]
            assert row[f"{key}_mean"] == f"{100 * stats['mean']:.1f}"
            assert row[f"{key}_std"] == f"{100 * stats['std']:.1f}"
        assert row["final_pgd20_n_examples"] == "32" and row["final_cw_mean"] == ""


def test_report_labels_stale_evals_and_partial_metrics(runs, tmp_path):
    """Groups of one method get their differing settings in the label; stale eval files are left out."""
    base = runs["pgd-at", 0]
    noisy = copy_run(base, tmp_path / "noisy")
    document = read_json(noisy / "config.json")
    document["config"]["label_noise"] = 0.2
    (noisy / "config.json").write_text(json.dumps(document))
    extended = copy_run(runs["pgd-at", 1], tmp_path / "extended")  # trained on after its evaluation
    with open(extended / "metrics.jsonl", "a") as handle:
        record = dict(read_metrics(extended)[-1], epoch=4, test_robust_acc=0.0)
        handle.write(json.dumps(record) + "\n")
    result = ok("report", base, extended, noisy, "--format", "json")
    report = json.loads(result.stdout)
    assert [g["label"] for g in report["groups"]] == ["pgd-at (label_noise=0)", "pgd-at (label_noise=0.2)"]
    assert "eval/last.json is for epoch 3 but the run's last epoch is 4" in result.stderr
    final_clean = report["groups"][0]["metrics"]["final_clean"]
    assert final_clean["seeds"] == [0] and final_clean["n"] == 1 and final_clean["std"] is None
    markdown = ok("report", base, extended, noisy).stdout
    assert "(n=1)" in markdown and "Warning: " in markdown


@pytest.mark.parametrize("case", ["not-a-run", "missing", "mixed-datasets", "empty-metrics", "bad-metrics",
                                  "bad-eval-json", "bad-config", "same-seed-twice", "unwritable-output",
                                  "unknown-paired-label", "paired-no-common-seed"])
def test_report_bad_inputs(runs, tmp_path, case):
    good = [runs["pgd-at", 0], runs["pgd-at-te", 0]]
    copy = copy_run(runs["pgd-at", 1], tmp_path / "copy")
    args, words = [*good, copy], []
    if case == "not-a-run":
        (tmp_path / "plain").mkdir()
        args, words = [*good, tmp_path / "plain"], [str(tmp_path / "plain"), "not a run folder", "config.json"]
    elif case == "missing":
        args, words = [*good, tmp_path / "nowhere"], [str(tmp_path / "nowhere"), "no such run folder"]
    elif case == "mixed-datasets":
        document = read_json(copy / "config.json")
        document["config"]["dataset"] = "fashion-mnist"
        (copy / "config.json").write_text(json.dumps(document))
        words = ["different data sets", "mnist", "fashion-mnist", str(copy)]
    elif case == "empty-metrics":  # alone: nothing to report (beside other runs it is left out)
        (copy / "metrics.jsonl").write_text("")
        args, words = [copy], [str(copy), "not finished an epoch"]
    elif case == "bad-metrics":
        (copy / "metrics.jsonl").write_text('{"epoch": 1, "test_clean_acc": 0.5, "test_robust_acc"\n')
        words = [str(copy / "metrics.jsonl"), "not valid JSON", "line 1"]
    elif case == "bad-eval-json":
        (copy / "eval" / "best.json").write_text("{")
        words = [str(copy / "eval" / "best.json"), "not valid JSON"]
    elif case == "bad-config":
        (copy / "config.json").write_text('{"config": ')
        words = [str(copy / "config.json"), "not valid JSON"]
    elif case == "same-seed-twice":
        args, words = [*good, runs["pgd-at", 1], copy], [str(copy), "same settings and seed (1)"]
    elif case == "unwritable-output":
        args, words = [*good, "--output", copy / "config.json" / "table.md"], ["cannot write", "table.md"]
    elif case == "unknown-paired-label":
        args, words = [*good, "--paired", "pgd-at:trades-te"], ["trades-te", "pgd-at, pgd-at-te"]
    elif case == "paired-no-common-seed":
        args, words = [runs["pgd-at", 0], runs["pgd-at-te", 1], "--paired", "pgd-at:pgd-at-te"], ["no seed in common"]
    assert_one_line_error(invoke("report", *args), *words)


# --------------------------------------------------------------------------- plot --by-method
def test_plot_by_method_groups_seeds(runs, tmp_path):
    output = tmp_path / "by-method.png"
    result = ok("plot", *runs.values(), "--output", output, "--by-method")
    assert f"wrote {output}" in result.stdout
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from at_memorization.report import group_runs, read_runs

    groups = group_runs(read_runs(runs.values()))
    assert [(g.label, g.seeds) for g in groups] == [(m, list(SEEDS)) for m in METHODS]
    assert_one_line_error(invoke("plot", tmp_path, "--output", tmp_path / "x.png", "--by-method"), "not a run folder")


# --------------------------------------------------------------------------- what report pools and leaves out
def test_report_pools_old_configs_and_explicit_defaults(runs, tmp_path):
    """A config.json written before --drop-rate existed, and a method setting given at its default
    value, are the same settings as the defaults: one group, not two."""
    old = copy_run(runs["pgd-at-te", 1], tmp_path / "old")
    document = read_json(old / "config.json")
    del document["config"]["drop_rate"]
    document["config"]["method_args"] = {"te_weight": document["method"]["te_weight"]}
    (old / "config.json").write_text(json.dumps(document))
    report = json.loads(ok("report", runs["pgd-at-te", 0], old, "--format", "json").stdout)
    assert [(g["label"], g["seeds"]) for g in report["groups"]] == [("pgd-at-te", [0, 1])]
    other = copy_run(runs["pgd-at-te", 1], tmp_path / "other")
    document = read_json(other / "config.json")
    document["method"]["te_weight"] = 30.0
    (other / "config.json").write_text(json.dumps(document))
    report = json.loads(ok("report", runs["pgd-at-te", 0], other, "--format", "json").stdout)
    assert [g["label"] for g in report["groups"]] == ["pgd-at-te (te_weight=300)", "pgd-at-te (te_weight=30)"]


def test_report_warns_about_unfinished_runs_and_files(runs, tmp_path):
    unfinished = copy_run(runs["pgd-at-te", 1], tmp_path / "unfinished")
    document = read_json(unfinished / "config.json")
    document["config"]["epochs"] = 5  # as if it were still training at epoch 3 of 5
    (unfinished / "config.json").write_text(json.dumps(document))
    log = tmp_path / "run.log"
    log.write_text("not a run")
    result = ok("report", runs["pgd-at-te", 0], unfinished, log, "--format", "json")
    assert "has 3 of 5 epochs (still training or stopped)" in result.stderr
    assert "1 file(s) given are not run folders" in result.stderr and str(log) in result.stderr
    assert [g["label"] for g in json.loads(result.stdout)["groups"]] == ["pgd-at-te (epochs=3)", "pgd-at-te (epochs=5)"]

    # A pair whose runs stopped at different epochs is left out of the paired differences.
    shorter = copy_run(runs["pgd-at", 1], tmp_path / "shorter")
    lines = (shorter / "metrics.jsonl").read_text().splitlines()
    (shorter / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    shutil.rmtree(shorter / "eval")
    result = ok("report", runs["pgd-at", 0], shorter, runs["pgd-at-te", 0], runs["pgd-at-te", 1], "--format", "json",
                "--paired", "pgd-at:pgd-at-te")
    assert "seed 1 left out" in result.stderr and "at epoch 2" in result.stderr
    (pair,) = json.loads(result.stdout)["paired"]
    assert pair["seeds"] == [0] and pair["n_pairs"] == 1
    assert_one_line_error(invoke("report", shorter, runs["pgd-at-te", 1], "--paired", "pgd-at:pgd-at-te"),
                          "no seed where both runs reached the same epoch")
