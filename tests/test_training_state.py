"""The training package's seams: ``state.dump``/``state.restore`` are a mirror pair, a resume reads
``last.pt`` once, and no module under ``training/`` imports the loop."""

import ast
from pathlib import Path

import pytest
import torch

from cli_testing import invoke, tiny_train_args
from at_memorization.data import load_data
from at_memorization.randomness import capture_rng
from at_memorization.training import Callbacks, RunConfig, Trainer
from at_memorization.training.state import Progress, RunInfo, dump, restore

PACKAGE = Path(__file__).resolve().parents[1] / "at_memorization" / "training"


def _equal(a, b, where="state") -> None:
    """Deep equality of checkpoint values, tensors compared exactly (dtype, shape and values)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _trainer(mnist_dir, out, data, **settings):
    config = RunConfig(method="pgd-at-te", dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", epochs=4,
                       batch_size=32, steps=1, eps=0.1, step_size=0.05, lr=0.05, **settings)
    return Trainer(config, out, device="cpu", data=data, callbacks=Callbacks())


def test_dump_then_restore_round_trips_every_part(mnist_dir, tmp_path):
    data = load_data("mnist", mnist_dir, train_size=96, test_size=32)
    trainer = _trainer(mnist_dir, tmp_path / "a", data)
    try:
        record = trainer.train_epoch(1)  # moves the weights, the optimizer's momentum and TE's ensemble
        trainer.train_epoch(2)
    finally:
        trainer.close()
    partial = {"epoch": 3, "step": 1, "augment_rng": torch.Generator().manual_seed(5).get_state(),
               "train_seconds": 1.5, "sums": {"train_loss": torch.tensor(2.5)}, "track": None}
    progress = Progress(2, [record, dict(record, epoch=2)], {"epoch": 2, "test_robust_acc": 0.5,
                                                              "test_clean_acc": 0.75}, partial)
    rng = [capture_rng()]
    state = dump(trainer.parts, progress, trainer.info, rng)
    assert state["method"]["state"], "TE's ensemble is part of the state"

    other = _trainer(mnist_dir, tmp_path / "b", data)  # fresh parts: other weights, no momentum, empty ensemble
    try:
        torch.manual_seed(1234)  # the restore must bring back the saved streams, not keep these
        restored = restore(other.parts, state, other.config, other.ctx, "state")
        assert capture_rng()["torch"].equal(rng[0]["torch"])
        _equal(restored.history, progress.history, "history")
        assert (restored.epoch, restored.best, restored.next_epoch) == (2, progress.best, 3)
        _equal(restored.partial, partial, "partial")
        # the mirror: what the restored parts dump is what was restored, value for value
        _equal(dump(other.parts, restored, other.info, rng), state)
    finally:
        other.close()


def test_restore_applies_the_settings_the_run_continues_with(mnist_dir, tmp_path):
    # An --override of momentum or weight decay must reach the optimizer, whose saved state has the old ones.
    data = load_data("mnist", mnist_dir, train_size=64, test_size=32)
    trainer = _trainer(mnist_dir, tmp_path / "a", data)
    trainer.close()
    state = dump(trainer.parts, Progress(), trainer.info, [capture_rng()])
    changed = _trainer(mnist_dir, tmp_path / "b", data, momentum=0.5, weight_decay=0.0)
    changed.close()
    restore(changed.parts, state, changed.config, changed.ctx)
    assert [(g["momentum"], g["weight_decay"]) for g in changed.optimizer.param_groups] == [(0.5, 0.0)]
    assert isinstance(changed.info, RunInfo)


def test_a_resume_reads_last_pt_once(mnist_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert invoke("train", *tiny_train_args(mnist_dir, out, epochs=1)).exit_code == 0
    loads = []
    real_load = torch.load

    def counting_load(file, *args, **kwargs):
        loads.append(Path(str(file)).name)
        return real_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    result = invoke("train", "--resume", "--out", str(out), "--override", "epochs=2", "--quiet")
    assert result.exit_code == 0, result.output
    assert loads.count("last.pt") == 1, loads
    assert "last-prev.pt" not in loads  # the fallback is read only when last.pt is unusable


def test_no_module_of_the_training_package_imports_the_loop():
    for path in PACKAGE.glob("*.py"):
        if path.name in ("loop.py", "__init__.py"):
            continue
        tree = ast.parse(path.read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not [m for m in imported if m.endswith("loop")], path.name


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py")))
def test_no_class_of_the_training_package_is_over_350_lines(module):
    source = (PACKAGE / module).read_text()
    if module == "loop.py":
        assert len(source.splitlines()) < 350
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= 350, node.name
