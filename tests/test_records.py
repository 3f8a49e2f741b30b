"""The rules over run records, stated once (issue 28): the best epoch, the eval-record merge, and
every run-folder file name through ``RunFolder``."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from at_memorization import runfolder
from at_memorization.records import (ATTACK_NAMES, CHECKPOINT_NAMES, NoEvaluatedEpoch, best_record, eval_record,
                                     evaluated, final_record, improves, merge_eval_records)
from at_memorization.runfolder import RunFolder, RunFolderError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("at_memorization", "plugins")


def epoch(number, robust=None, clean=None, **extra):
    record = {"epoch": number, **extra}
    if robust is not None:
        record.update(test_robust_acc=robust, test_clean_acc=clean)
    return record


# --------------------------------------------------------------------------- the best epoch
def test_improves_is_robust_first_then_clean_and_strict():
    best = {"test_robust_acc": 0.5, "test_clean_acc": 0.8}
    assert improves({"test_robust_acc": 0.6, "test_clean_acc": 0.1}, best)  # robust decides
    assert not improves({"test_robust_acc": 0.4, "test_clean_acc": 0.99}, best)  # clean does not outweigh it
    assert improves({"test_robust_acc": 0.5, "test_clean_acc": 0.81}, best)  # a robust tie: clean decides
    assert not improves({"test_robust_acc": 0.5, "test_clean_acc": 0.8}, best)  # an exact tie keeps the earlier
    # The trainer starts from a sentinel below every accuracy, so its first evaluated epoch is the best.
    assert improves({"test_robust_acc": 0.0, "test_clean_acc": 0.0}, {"test_robust_acc": -1.0, "test_clean_acc": -1.0})


def test_best_record_ties_go_to_the_earliest_epoch_and_unevaluated_epochs_are_skipped():
    records = [epoch(1, 0.3, 0.7), epoch(2), epoch(3, 0.5, 0.6), epoch(4, 0.5, 0.7), epoch(5, 0.5, 0.7),
               epoch(6, 0.45, 0.9), epoch(7)]
    assert best_record(records)["epoch"] == 4  # 3 loses on clean; 5 ties 4 exactly
    assert [r["epoch"] for r in evaluated(records)] == [1, 3, 4, 5, 6]
    assert final_record(records)["epoch"] == 6  # the last evaluated epoch, not the last epoch


def test_best_record_is_the_epoch_the_trainer_keeps_as_best():
    """The trainer keeps best.pt by folding ``improves`` over its epochs; the readers of metrics.jsonl
    must land on the same epoch, on many runs full of ties (accuracies on a coarse grid)."""
    rng = random.Random(0)
    for _ in range(200):
        records = [epoch(e, rng.choice((0.1, 0.2, 0.3)), rng.choice((0.5, 0.6))) if rng.random() < 0.8 else epoch(e)
                   for e in range(1, rng.randint(2, 12))]
        if not any("test_robust_acc" in r for r in records):
            continue
        kept = {"epoch": 0, "test_robust_acc": -1.0, "test_clean_acc": -1.0}
        for record in records:
            if "test_robust_acc" in record and improves(record, kept):
                kept = record
        assert best_record(records)["epoch"] == kept["epoch"]


def test_no_evaluated_epoch_is_a_one_line_user_error():
    from at_memorization.user_errors import UserError

    for records in ([epoch(1), epoch(2)], []):
        with pytest.raises(NoEvaluatedEpoch, match="no evaluated epoch") as raised:
            best_record(records)
        assert isinstance(raised.value, UserError) and "\n" not in str(raised.value)
    with pytest.raises(NoEvaluatedEpoch, match="epochs 1-2"):
        final_record([epoch(1), epoch(2)])


# --------------------------------------------------------------------------- eval records
def test_merge_keeps_a_requested_clean_accuracy_over_autoattacks_by_product():
    """RobustBench's benchmark returns a clean accuracy too: it must not replace one measured on more points."""
    info = {"epoch": 3, "dataset": "cifar10", "model": "preactresnet18", "method": "pgd-at"}
    first = eval_record("r/last.pt", info, {"clean_acc": 0.8, "pgd20_acc": 0.5}, n_examples=1000, eps=8 / 255,
                        norm="Linf", seed=0, device="cpu")
    second = eval_record("r/last.pt", info, {"clean_acc": 0.7, "autoattack_acc": 0.4,
                                             "autoattack_protocol": "robustbench.eval.benchmark"},
                         n_examples=500, eps=8 / 255, norm="Linf", seed=0, device="cpu")
    merged, replaced = merge_eval_records(first, second, requested=("autoattack",))
    assert replaced is None
    assert (merged["clean_acc"], merged["pgd20_acc"], merged["autoattack_acc"]) == (0.8, 0.5, 0.4)
    assert merged["autoattack_protocol"] == "robustbench.eval.benchmark"
    assert merged["n_examples_by_attack"] == {"clean": 1000, "pgd20": 1000, "autoattack": 500}
    merged, _ = merge_eval_records(first, second, requested=("clean", "autoattack"))
    assert merged["clean_acc"] == 0.7 and merged["n_examples_by_attack"]["clean"] == 500
    merged, replaced = merge_eval_records(first, dict(second, eps=0.5), requested=("autoattack",))
    assert "eps" in replaced and "pgd20_acc" not in merged
    merged, replaced = merge_eval_records(["not", "a", "record"], first)
    assert replaced == "it is not a JSON object" and merged == first


def test_the_attack_and_checkpoint_names_are_the_ones_the_cli_and_the_plan_accept(tmp_path):
    from at_memorization.cli import main

    evaluate = main.get_command(None, "evaluate")
    choices = next(p for p in evaluate.params if p.name == "attacks").type.choices
    assert tuple(choices) == (*ATTACK_NAMES, "all")
    plan = tmp_path / "plan.toml"
    plan.write_text('name = "p"\nmethods = ["pgd-at"]\nseeds = [0]\n[[evaluate]]\nattacks = ["all"]\n')
    from at_memorization.plan import read_plan

    spec = read_plan(plan).evaluations[0]
    assert (spec.attacks, spec.checkpoints) == (ATTACK_NAMES, CHECKPOINT_NAMES)


# --------------------------------------------------------------------------- the run folder's names
def test_run_folder_names_its_checkpoints_and_eval_records(tmp_path):
    folder = RunFolder(tmp_path)
    assert {folder.checkpoint(name) for name in CHECKPOINT_NAMES} == {folder.best, folder.last}
    assert [p.parent for p in map(folder.eval_path, CHECKPOINT_NAMES)] == [folder.eval_dir] * len(CHECKPOINT_NAMES)
    with pytest.raises(ValueError, match="unknown checkpoint name 'init'"):
        folder.checkpoint("init")
    assert folder.read_eval("best") is None
    folder.write_eval("best", {"epoch": 2, "clean_acc": 0.5})
    assert folder.read_eval("best") == {"epoch": 2, "clean_acc": 0.5}
    assert folder.eval_path("best") in folder.report_files()
    folder.eval_path("last").write_text("{")
    with pytest.raises(RunFolderError, match="not valid JSON"):
        folder.read_eval("last")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def file_name_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of each string that names a run folder's file: equal to or ending with one of
    its names, a path under its eval folder, ``X / "eval"``, or a checkpoint name built as ``f"{x}.pt"``."""
    names = [runfolder.CONFIG, runfolder.METRICS, runfolder.HISTORY, runfolder.LAST, runfolder.PREVIOUS,
             runfolder.BEST, runfolder.INIT, runfolder.LABELS, runfolder.TRACKING,
             *(f"{name}.json" for name in CHECKPOINT_NAMES)]
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if any(text == name or text.endswith(name) for name in names) or text.startswith(runfolder.EVAL_DIR + "/"):
                found.append((node.lineno, text))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value == runfolder.EVAL_DIR:
            found.append((node.lineno, f'/ "{runfolder.EVAL_DIR}"'))
        elif isinstance(node, ast.JoinedStr) and any(isinstance(part, ast.Constant) and part.value == ".pt"
                                                     for part in node.values):
            found.append((node.lineno, 'f"{...}.pt"'))
    return found


def test_the_scan_finds_each_way_of_naming_a_file():
    source = '''
"""Docstrings may name config.json."""
a = "metrics.jsonl"
b = run / "eval" / "x"
c = f"{run / 'eval'}/best.json"
d = f"{name}.pt"
e = "eval/last.json"
f = "an eval mode"
'''
    assert sorted(line for line, _ in file_name_literals(source)) == [3, 4, 5, 5, 6, 7]


def test_no_run_folder_file_name_is_written_outside_runfolder():
    """Every name of a run folder's file goes through RunFolder (runlock.py owns the lock's name)."""
    offending = []
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "runfolder.py" and path.parent.name == "at_memorization":
                continue
            offending += [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                          for line, text in file_name_literals(path.read_text())]
    assert not offending, "run-folder file names outside runfolder.py:\n" + "\n".join(offending)


def test_the_evaluation_attacks_are_the_records_names():
    # evaluate dispatches on the names (clean and AutoAttack by name, the others through ATTACKS):
    # every name has a way to be measured, and no factory measures an attack the records do not name.
    from at_memorization.evaluation import ATTACKS
    from at_memorization.records import ATTACK_NAMES, ROBUST_ATTACK_NAMES

    assert set(ATTACKS) | {"clean", "autoattack"} == set(ATTACK_NAMES)
    assert set(ATTACKS) < set(ROBUST_ATTACK_NAMES)
