"""The training package's seams: ``state.dump``/``state.restore`` are a mirror pair, a resume reads
``last.pt`` once, and no module under ``training/`` imports the loop."""

import ast
import dataclasses
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


def test_the_python_resume_reads_last_pt_once(mnist_dir, tmp_path, monkeypatch):
    from at_memorization.training import open_resumable, settings_to_resume

    run = tmp_path / "run"
    Trainer(_tiny(mnist_dir), run, device="cpu").fit()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda file, *a, **k: loads.append(Path(str(file)).name) or real_load(file, *a, **k))
    resumable = open_resumable(run)
    config, changes = settings_to_resume(resumable, {"epochs": 2})
    assert changes == {"epochs": [1, 2]}
    history = Trainer(config, run, device="cpu", resume=True, overrides={"epochs": 2}, resumable=resumable).fit()
    assert [r["epoch"] for r in history] == [1, 2]
    assert loads.count("last.pt") == 1, loads


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


def _tiny(mnist_dir, **settings) -> RunConfig:
    values = dict(method="pgd-at", dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", epochs=1,
                  batch_size=32, train_size=64, test_size=16, steps=1, eval_steps=1, eps=0.1, step_size=0.05)
    return RunConfig(**{**values, **settings})


def test_a_resume_compares_settings_left_to_none_too(mnist_dir, tmp_path):
    # A whole config given to the Trainer: None is a value (all test points), not "not given".
    from at_memorization.training import TrainingError

    from at_memorization.training import resume_config

    run = tmp_path / "run"
    Trainer(_tiny(mnist_dir), run, device="cpu").fit()
    config, _ = resume_config(run, {"epochs": 2})
    with pytest.raises(TrainingError, match="differs from the saved run in 'test_size' \\(saved 16, given None\\)"):
        Trainer(dataclasses.replace(config, test_size=None), run, device="cpu", resume=True, overrides={"epochs": 2})


@pytest.mark.parametrize("fallback", [False, True])
def test_a_checkpoint_written_between_the_read_and_the_lock_is_never_overwritten(mnist_dir, tmp_path, fallback):
    # Process P reads the run, process Q writes it before P holds the lock: P must not resume from
    # what it read (it would overwrite Q's newer checkpoint). Also after a fallback to last-prev.pt,
    # where the file P read is not the one Q rewrites.
    from at_memorization.training import TrainingError, open_resumable, settings_to_resume

    run = tmp_path / "run"
    Trainer(_tiny(mnist_dir, epochs=2), run, device="cpu").fit()
    if fallback:
        (run / "last.pt").write_bytes(b"truncated")
    read = open_resumable(run)  # P
    assert read.path.name == ("last-prev.pt" if fallback else "last.pt")
    config, _ = settings_to_resume(read, {"epochs": 3})
    q_state = torch.load(run / "last-prev.pt", weights_only=True)
    torch.save(q_state, run / "last.pt")  # Q's write (any new version of the file)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(TrainingError, match="written by another process while this one was starting"):
        Trainer(config, run, device="cpu", resume=True, overrides={"epochs": 3}, resumable=read)
    assert (run / "last.pt").read_bytes() == before
    assert not (run / ".lock").exists()  # released
    Trainer(config, run, device="cpu", resume=True, overrides={"epochs": 3}).fit()  # the same call again works


def test_a_checkpoint_read_from_another_folder_is_refused(mnist_dir, tmp_path):
    from at_memorization.training import TrainingError, open_resumable

    Trainer(_tiny(mnist_dir), tmp_path / "a", device="cpu").fit()
    with pytest.raises(TrainingError, match="not in"):
        Trainer(_tiny(mnist_dir), tmp_path / "b", device="cpu", resume=True, resumable=open_resumable(tmp_path / "a"))


def test_the_history_events_of_a_resume_keep_their_order(mnist_dir, tmp_path):
    import json

    run = tmp_path / "run"
    Trainer(_tiny(mnist_dir, track_samples=True), run, device="cpu").fit()
    (run / "tracking.pt").unlink()
    (run / "config.json").write_text("{")
    from at_memorization.training import resume_config

    config, _ = resume_config(run, {"epochs": 2})
    Trainer(config, run, device="cpu", resume=True, overrides={"epochs": 2}).fit()
    events = [json.loads(line)["event"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert events == ["override", "tracking-lost", "config-repaired", "resumed"]


def _full_and_cut(config: RunConfig, tmp_path) -> None:
    """``config`` trained to the end into tmp_path/full, and into tmp_path/cut stopped after epoch 1."""
    from at_memorization.training import TrainingInterrupted

    Trainer(config, tmp_path / "full", device="cpu").fit()
    callbacks = Callbacks()
    cut = Trainer(config, tmp_path / "cut", device="cpu", callbacks=callbacks)
    callbacks.epoch_end = lambda record: cut.request_stop("test") if record["epoch"] == 1 else None
    with pytest.raises(TrainingInterrupted):
        cut.fit()


def test_a_resume_computes_with_the_thread_count_the_run_started_with(mnist_dir, tmp_path):
    # Issue 33, item 2: on a CPU the thread count changes how sums are split, so a run resumed in a
    # process with more threads (a study rerun with fewer tasks left than --jobs) must keep its own.
    import json

    from at_memorization.training import TrainingError

    before = torch.get_num_threads()
    config = _tiny(mnist_dir, epochs=3, train_size=128, milestones=[2])
    try:
        torch.set_num_threads(1)
        _full_and_cut(config, tmp_path)
        torch.set_num_threads(2)  # the resuming process has other threads
        logged = []
        resumed = Trainer(config, tmp_path / "cut", device="cpu", resume=True, callbacks=Callbacks(log=logged.append))
        assert resumed.config.threads == 1 and torch.get_num_threads() == 1
        assert any("computing with 1 thread as this run started" in line for line in logged), logged
        resumed.fit()
        torch.set_num_threads(2)
        with pytest.raises(TrainingError, match="'threads' \\(saved 1, given 2\\).*--override threads"):
            Trainer(dataclasses.replace(config, threads=2), tmp_path / "cut", device="cpu", resume=True)
    finally:
        torch.set_num_threads(before)
    for run in ("full", "cut"):
        assert json.loads((tmp_path / run / "config.json").read_text())["config"]["threads"] == 1
    events = [json.loads(line) for line in (tmp_path / "cut" / "history.jsonl").read_text().splitlines()]
    assert [e["threads"] for e in events if e["event"] == "resumed"] == [1]
    full, again = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("full", "cut"))
    _equal(full["model"], again["model"], "model")
    assert full["config"] == again["config"]  # the settings recorded alike, thread count included


def test_a_resumed_checkpoint_records_the_settings_an_uninterrupted_one_does(mnist_dir, tmp_path):
    # Issue 33, item 7: a resumed run's checkpoints held the method's settings resolved in
    # config.method_args where an uninterrupted run's held them as given, so they differed byte for byte.
    config = _tiny(mnist_dir, method="pgd-at-te", epochs=2, milestones=[1])
    _full_and_cut(config, tmp_path)
    Trainer(config, tmp_path / "cut", device="cpu", resume=True).fit()
    full, again = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("full", "cut"))
    assert full["config"] == again["config"]
    assert full["config"]["method_args"] == full["method"]["config"] == {"te_momentum": 0.9, "te_weight": 300.0,
                                                                         "te_start": 1, "te_end": 2}
    _equal(full["model"], again["model"], "model")


def test_an_override_resume_stopped_before_its_first_checkpoint_leaves_no_record_of_the_override(mnist_dir,
                                                                                                  tmp_path):
    # Issue 33, item 7: the override was written to config.json and history.jsonl when training began,
    # so a resume killed before its first checkpoint left records that no checkpoint had.
    import json

    from at_memorization.training import resume_config

    run = tmp_path / "run"
    Trainer(_tiny(mnist_dir), run, device="cpu").fit()
    files = {name: (run / name).read_bytes() for name in ("config.json", "last.pt")}
    config, _ = resume_config(run, {"epochs": 2, "lr": 0.01})

    class Killed(Exception):
        pass

    def die():
        raise Killed  # as a SIGKILL in the middle of the first step: nothing after it runs

    with pytest.raises(Killed):
        Trainer(config, run, device="cpu", resume=True, overrides={"epochs": 2, "lr": 0.01},
                callbacks=Callbacks(step=die)).fit()
    assert {name: (run / name).read_bytes() for name in files} == files
    assert not (run / "history.jsonl").exists()
    # the next resume continues with what the checkpoint holds, and the override, given again, is recorded
    # once, with the checkpoint that has it
    config, _ = resume_config(run, {"epochs": 2, "lr": 0.01})
    Trainer(config, run, device="cpu", resume=True, overrides={"epochs": 2, "lr": 0.01}).fit()
    events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["override", "resumed"]
    assert events[0]["changes"] == {"epochs": [1, 2], "lr": [0.1, 0.01]}
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 0.01


def test_a_finished_run_with_a_cut_config_json_gets_it_rewritten_from_its_checkpoint(mnist_dir, tmp_path):
    # Issue 33, item 7: "rewriting it from last.pt" was printed, and nothing was rewritten.
    import json

    run = tmp_path / "run"
    assert invoke("train", *tiny_train_args(mnist_dir, run)).exit_code == 0
    whole = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text((run / "config.json").read_text()[:40])
    result = invoke("train", "--out", run, "--resume", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "rewriting it from" in result.output and "already finished" in result.output
    repaired = json.loads((run / "config.json").read_text())
    assert repaired["config"] == whole["config"] and repaired["method"] == whole["method"]


def test_the_divergence_advice_never_sends_a_user_back_to_weights_that_diverged_already(mnist_dir, tmp_path):
    # Issue 33, item 7: the advice named a "finite" checkpoint whose weights were 3.7e18, so every
    # lower learning rate it suggested diverged again.
    from at_memorization.checkpoint import save_atomic
    from at_memorization.runfolder import RunFolder
    from at_memorization.training import guard

    run = tmp_path / "run"
    Trainer(_tiny(mnist_dir), run, device="cpu").fit()
    config = _tiny(mnist_dir)

    def advice() -> str:
        folder = RunFolder(run)
        folder.load_resumable()  # as a resume does: last_good is the checkpoint checked to be finite
        return str(guard.diverged("at epoch 2", folder, config, {}))

    sane = advice()
    assert "the last good checkpoint is" in sane and "--override lr=0.01" in sane, sane
    state = torch.load(run / "last.pt", weights_only=True)
    state["model"] = {k: v * 3.7e18 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_atomic(state, run / "last.pt")
    blown = advice()
    assert "diverged already" in blown and "times the initial norm" in blown, blown
    assert "--resume" not in blown and "its settings with --lr 0.01, in another --out" in blown, blown
    assert "\n" not in blown
