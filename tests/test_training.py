"""The trainer: schedules, a real tiny run, resume after SIGKILL (bit-exact), divergence, tracking."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from at_memorization import checkpoint as ckpt
from at_memorization.training import Callbacks, RunConfig, Trainer, TrainingError, learning_rate, with_threads
from at_memorization.settings import SettingError
from cli_testing import subprocess_env, tiny_train_args
from subprocess_guard import communicate_with_hang_guard, run_with_hang_guard

REQUIRED_KEYS = {"epoch", "lr", "train_loss", "train_seconds", "test_clean_acc", "test_robust_acc"}


# --------------------------------------------------------------------------- schedules
def test_step_schedule_follows_the_paper():
    config = RunConfig(lr=0.1, epochs=200, milestones=[100, 150])
    assert learning_rate(config, 1) == pytest.approx(0.1)
    assert learning_rate(config, 100) == pytest.approx(0.1)  # MultiStepLR([100, 150]) stepped per epoch
    assert learning_rate(config, 101) == pytest.approx(0.01)
    assert learning_rate(config, 150) == pytest.approx(0.01)
    assert learning_rate(config, 151) == pytest.approx(0.001)
    assert learning_rate(config, 200) == pytest.approx(0.001)
    reference = torch.optim.lr_scheduler.MultiStepLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), milestones=[100, 150])
    for epoch in range(1, 201):  # the paper's loop: train epoch `epoch`, then scheduler.step()
        assert learning_rate(config, epoch) == pytest.approx(reference.get_last_lr()[0]), epoch
        reference.optimizer.step()
        reference.step()


def test_cosine_schedule():
    config = RunConfig(lr=0.2, epochs=10, schedule="cosine")
    lrs = [learning_rate(config, e) for e in range(1, 11)]
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[5] == pytest.approx(0.1)  # epoch 6: half way
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    assert lrs[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))


@pytest.mark.parametrize("field, value, words", [
    ("eps", -0.1, "--eps must be >= 0"), ("label_noise", 1.5, "--label-noise must be in"), ("epochs", 0, "--epochs"),
    ("lr", 0.0, "--lr must be > 0"), ("schedule", "linear", "--schedule"), ("norm", "L1", "--norm"),
    ("input_noise_fraction", 2.0, "--input-noise-fraction"),
])
def test_config_validation(field, value, words):
    with pytest.raises(SettingError, match=words):
        RunConfig(**{field: value}).validate()


# --------------------------------------------------------------------------- in-process runs
def _config(mnist_dir, **overrides) -> RunConfig:
    settings = dict(method="pgd-at", dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", epochs=2,
                    batch_size=64, lr=0.05, milestones=[1], eps=0.1, step_size=0.05, steps=2, eval_steps=2,
                    train_size=256, test_size=64, seed=1)
    settings.update(overrides)
    return RunConfig(**settings)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_writes_everything(mnist_dir, tmp_path):
    events = []
    callbacks = Callbacks(log=events.append, epoch_begin=lambda e, n: events.append(("begin", e, n)),
                          epoch_end=lambda record: events.append(("end", record["epoch"])))
    config = _config(mnist_dir, track_samples=True, eval_train_size=32, label_noise=0.5)
    trainer = Trainer(config, tmp_path / "run", callbacks=callbacks)
    history = trainer.fit()
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "init.pt", "labels.pt", "config.json", "metrics.jsonl", "tracking.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp"))
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2] and records == history
    for record in records:
        assert REQUIRED_KEYS <= set(record)
        for key in ("test_clean_acc", "test_robust_acc", "train_clean_acc", "train_robust_acc"):
            assert 0.0 <= record[key] <= 1.0
        assert record["train_seconds"] > 0 and math.isfinite(record["train_loss"])
    assert [r["lr"] for r in records] == [pytest.approx(0.05), pytest.approx(0.005)]
    assert ("begin", 1, 4) in events and ("end", 2) in events  # 256 / 64 = 4 batches

    last = ckpt.load_checkpoint(run / "last.pt")
    # the settings as resolved, with the thread count computed with and the method's settings resolved
    recorded = {**with_threads(config.resolve()).to_dict(), "method_args": last["method"]["config"]}
    assert last["epoch"] == 2 and last["config"] == recorded and last["dataset"] == "mnist"
    assert last["history"] == records
    best = ckpt.load_checkpoint(run / "best.pt")
    assert best["epoch"] == last["best"]["epoch"]
    assert best["history"][-1]["test_robust_acc"] == max(r["test_robust_acc"] for r in records)

    labels = torch.load(run / "labels.pt", weights_only=True)
    assert labels["labels"].shape == labels["clean_labels"].shape == (256,)
    assert 0 < (labels["labels"] != labels["clean_labels"]).sum() < 256  # label noise 0.5 was applied
    assert torch.equal(labels["labels"], trainer.data.train.labels)
    assert os.path.getsize(run / "labels.pt") < 20_000  # the subset, not all 60,000 labels
    init = torch.load(run / "init.pt", weights_only=True)
    assert set(init) == set(last["model"]) and not torch.equal(init["features.0.weight"], last["model"]["features.0.weight"])
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["label_noise"] == 0.5

    tracking = torch.load(run / "tracking.pt", weights_only=True)
    assert tracking["adv_correct"].shape == (2, 256) and tracking["adv_loss"].shape == (2, 256)
    assert set(tracking["adv_correct"].unique().tolist()) <= {0, 1}
    assert (tracking["adv_loss"].float() > 0).all()  # every sample was seen in every epoch

    # The run directory is taken: a second run there must say so.
    with pytest.raises(TrainingError, match="already holds a run; use --resume"):
        Trainer(config, run)
    # Nothing to do when resuming a finished run.
    assert Trainer(config, run, resume=True).start_epoch == 3


def _crash_at(monkeypatch, epoch):
    original = Trainer.train_epoch

    def train_epoch(self, e):
        if e == epoch:
            raise KeyboardInterrupt("simulated crash")
        return original(self, e)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


@pytest.mark.parametrize("method, extra", [("pgd-at", {}), ("pgd-at-te", {"te_weight": 30.0})])
def test_resume_in_process_is_exact(mnist_dir, tmp_path, monkeypatch, method, extra):
    config = dict(method=method, method_args=extra, epochs=3, milestones=[3], train_size=128, batch_size=32)
    Trainer(_config(mnist_dir, **config), tmp_path / "full").fit()

    with monkeypatch.context() as patch:
        _crash_at(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            Trainer(_config(mnist_dir, **config), tmp_path / "cut").fit()
    assert [r["epoch"] for r in _metrics(tmp_path / "cut")] == [1]
    resumed = Trainer(_config(mnist_dir, **config), tmp_path / "cut", resume=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    if method == "pgd-at-te":
        state = ckpt.load_checkpoint(tmp_path / "cut" / "last.pt")["method"]["state"]
        tensors = [v for v in state["te"].values() if torch.is_tensor(v)]
        assert tensors and any(t.abs().sum() > 0 for t in tensors)  # the TE ensemble was saved and used


def _same(a, b) -> bool:
    """Exact equality of nested checkpoint values (tensors compared with torch.equal)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_run(full, cut):
    a, b = ckpt.load_checkpoint(full / "last.pt"), ckpt.load_checkpoint(cut / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _same(a["method"]["state"], b["method"]["state"])
    assert _same(a["rng"], b["rng"])
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b)) and momentum_a
    ra, rb = _metrics(full), _metrics(cut)
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        x.pop("train_seconds"), y.pop("train_seconds")
        assert x == y


def test_resume_with_a_different_configuration_fails(mnist_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(_config(mnist_dir, epochs=1), run).fit()
    with pytest.raises(TrainingError) as info:
        Trainer(_config(mnist_dir, epochs=1, eps=0.2), run, resume=True)
    message = str(info.value)
    assert "configuration differs" in message and "'eps'" in message and "\n" not in message
    with pytest.raises(TrainingError, match="nothing to resume"):
        Trainer(_config(mnist_dir), tmp_path / "empty", resume=True)


def test_resume_allows_a_moved_data_dir(mnist_dir, tmp_path):
    run = tmp_path / "run"
    Trainer(_config(mnist_dir, epochs=1, train_size=64, test_size=16), run).fit()
    moved = tmp_path / "moved"
    moved.symlink_to(mnist_dir)
    trainer = Trainer(_config(moved, epochs=1, train_size=64, test_size=16), run, resume=True)
    assert trainer.start_epoch == 2


@pytest.mark.parametrize("bad_epoch", [1, 2])
def test_nan_loss_stops_with_the_last_good_checkpoint(mnist_dir, tmp_path, monkeypatch, bad_epoch):
    from at_memorization.methods.pgd_at import PGDAT

    original = PGDAT.loss

    def poisoned(self, model, x, x_adv, y, index, epoch):
        loss, logs = original(self, model, x, x_adv, y, index, epoch)
        return (loss * float("nan"), logs) if epoch == bad_epoch else (loss, logs)

    monkeypatch.setattr(PGDAT, "loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        Trainer(_config(mnist_dir, epochs=3, train_size=64, test_size=16), run).fit()
    message = str(info.value)
    assert f"diverged at epoch {bad_epoch}" in message and "\n" not in message
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, bad_epoch))
    if bad_epoch == 1:
        assert "no checkpoint was written yet" in message and str(run / "init.pt") in message
        assert not (run / "last.pt").exists() and (run / "init.pt").is_file()
        return
    assert str(run / "last.pt") in message and "(epoch 1)" in message
    last = ckpt.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_absurd_learning_rate_diverges_cleanly(mnist_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as info:
        Trainer(_config(mnist_dir, epochs=2, lr=1e12, train_size=64, test_size=16, steps=1, eval_steps=1), run).fit()
    message = str(info.value)
    assert "diverged" in message and "\n" not in message
    if "diverged at epoch 1" in message:
        assert "init.pt" in message and not (run / "last.pt").exists() and "--lr 1e+11" in message
    elif "diverged already" in message:  # epoch 1's weights grew far past the initial ones: no resume offered
        assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
        assert "--resume" not in message and "start a new run with a lower learning rate" in message
    else:
        assert ckpt.load_checkpoint(run / "last.pt")["epoch"] == 1
        # the advice can be followed: resume with a lower lr, recorded in the run's history
        assert f"at-mem train --resume --out {run} --override lr=1e+11" in message
        config = _config(mnist_dir, epochs=2, lr=0.01, train_size=64, test_size=16, steps=1, eval_steps=1)
        trainer = Trainer(config, run, resume=True, overrides={"lr": 0.01})
        assert trainer.start_epoch == 2 and trainer.config.lr == 0.01
        trainer.close()
        # an event is recorded once it took effect (training went on), not when it was requested
        assert not (run / "history.jsonl").exists()
        try:  # epoch 1's momentum, built at lr 1e12, may still make this diverge: it trained all the same
            Trainer(config, run, resume=True, overrides={"lr": 0.01}).fit()
        except TrainingError as error:
            assert "diverged" in str(error)
        events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        assert {"event": "override", "epoch": 2, "changes": {"lr": [1e12, 0.01]}}.items() <= events[0].items()


# --------------------------------------------------------------------------- SIGKILL and resume, through the CLI
DRIVER = textwrap.dedent('''
    """Run `at-mem` and SIGKILL itself at a chosen moment (AT_MEM_TEST_KILL=kind:epoch[:step])."""
    import os, signal, sys

    from at_memorization import training
    from at_memorization.cli import main

    kind, *where = (os.environ.get("AT_MEM_TEST_KILL") or "none:0").split(":")
    where = [int(w) for w in where]
    now = {"epoch": 0, "step": 0}

    def die():
        sys.stdout.flush(); sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    original_epoch = training.Trainer.train_epoch
    def train_epoch(self, epoch):
        now.update(epoch=epoch, step=0)
        return original_epoch(self, epoch)
    training.Trainer.train_epoch = train_epoch

    original_prepare = training.Trainer.prepare_batch
    def prepare(self, *args):
        now["step"] += 1
        if kind == "step" and [now["epoch"], now["step"]] == where:
            die()
        return original_prepare(self, *args)
    training.Trainer.prepare_batch = prepare

    original_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith("last.pt") and now["epoch"] == where[0]:
            if kind == "before-rename":
                die()
            original_replace(src, dst)
            if kind == "after-rename":
                die()
            return
        original_replace(src, dst)
    os.replace = replace

    main(sys.argv[1:], prog_name="at-mem")
''')


def _train_args(mnist_dir, out):
    return ["train", *tiny_train_args(mnist_dir, out, epochs=3, train_size=128, test_size=32, eps=0.1, step_size=0.05,
                                      steps=2, eval_steps=2, lr=0.05, label_noise=0.1, track_samples=True, seed=3,
                                      device=None)]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(mnist_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    full, cut = tmp_path / "full", tmp_path / "cut"
    # The uninterrupted run goes on in the background while the interrupted one is killed and resumed.
    reference = subprocess.Popen([sys.executable, str(driver), *_train_args(mnist_dir, full)],
                                 env=subprocess_env(AT_MEM_TEST_KILL=None),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kills = [
        ("step:2:2", [1]),            # in the middle of epoch 2's training pass
        ("after-rename:2", [1]),      # last.pt of epoch 2 written, metrics.jsonl not yet
        ("before-rename:3", [1, 2]),  # last.pt of epoch 3 fully written to its temporary file, not renamed
    ]
    for i, (kill, epochs_logged) in enumerate(kills):
        args = _train_args(mnist_dir, cut) + (["--resume"] if i else [])
        result = run_with_hang_guard([sys.executable, str(driver), *args], env=subprocess_env(AT_MEM_TEST_KILL=kill))
        assert result.returncode == -9, (kill, result.stdout, result.stderr)
        assert [r["epoch"] for r in _metrics(cut)][:len(epochs_logged)] == epochs_logged
    assert list(cut.glob(".last.pt.*.tmp")), "the killed write should have left its temporary file"
    result = run_with_hang_guard([sys.executable, str(driver), *_train_args(mnist_dir, cut), "--resume"],
                                 env=subprocess_env(AT_MEM_TEST_KILL=None))
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    output, _ = communicate_with_hang_guard(reference)
    assert reference.returncode == 0, output

    _assert_same_run(full, cut)
    assert not list(cut.glob(".*.tmp"))
    for name in ("tracking.pt", "labels.pt"):
        a, b = torch.load(full / name, weights_only=True), torch.load(cut / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.load_checkpoint(full / "best.pt")["epoch"] == ckpt.load_checkpoint(cut / "best.pt")["epoch"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_run(mnist_dir, tmp_path):
    config = _config(mnist_dir, epochs=1, train_size=64, test_size=16, bf16=True, channels_last=True)
    history = Trainer(config, tmp_path / "run", device="cuda").fit()
    assert math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["test_robust_acc"] <= 1


def test_bare_cuda_device_is_given_an_index(monkeypatch):
    """`--device cuda` (the default on a GPU machine) crashed every run on the first real GPU (an
    H200): torch.cuda.set_device refuses a device without an index. Simulated on the CPU with
    torch's own index rule standing in for set_device."""
    from torch.cuda._utils import _get_device_index

    from at_memorization.runtime import DistributedContext

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(_get_device_index(device)))
    for requested, expected in (("cuda", 1), (None, 1), ("cuda:0", 0)):
        assert DistributedContext(requested).device == torch.device("cuda", expected)
    assert chosen == [1, 1, 0]


def test_update_hooks_are_called_around_loss_and_step(mnist_dir, tmp_path, monkeypatch):
    """Methods get before_loss (after the attack) and before_step (after backward, before the update):
    what AWP needs to perturb the weights for the loss and restore them before the step."""
    from at_memorization.methods.pgd_at import PGDAT

    calls, weights = [], {}

    def before_loss(self, model, x, x_adv, y, index, epoch):
        calls.append("before_loss")
        assert model.training and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        weight = next(model.parameters())
        weights["original"] = weight.detach().clone()
        with torch.no_grad():
            weight.add_(1.0)  # perturb: the loss and its gradients are computed here

    def before_step(self, model, optimizer, epoch):
        calls.append("before_step")
        weight = next(model.parameters())
        assert weight.grad is not None  # after backward
        with torch.no_grad():
            weight.sub_(1.0)  # restore before the update
        weights["restored"] = weight.detach().clone()

    monkeypatch.setattr(PGDAT, "before_loss", before_loss)
    monkeypatch.setattr(PGDAT, "before_step", before_step)
    trainer = Trainer(_config(mnist_dir, epochs=1, train_size=64, batch_size=64, steps=1, eval_steps=1), tmp_path / "r")
    trainer.train_epoch(1)
    trainer.close()
    assert calls == ["before_loss", "before_step"]
    assert torch.allclose(weights["original"], weights["restored"], atol=1e-6)  # w + 1 - 1, up to rounding
