"""Runs that nothing can silently corrupt (issue 13): the run lock, data fingerprints, the TE schedule,
lost per-sample tracking, graceful SIGTERM/SIGINT with a bit-identical resume, last.pt rotation and
fallback, deliberate changes on resume, stale temporary files, --out checks and the --train-size notice.

Each test reproduces a failure that the package had before (it exited 0, or lost data, or printed a
traceback): the comment above each says what happened.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_testing import assert_one_line_error, invoke, subprocess_env, tiny_train_args
from subprocess_guard import communicate_with_hang_guard, run_with_hang_guard, wait_while_busy

from at_memorization import checkpoint as ckpt
from at_memorization.training import Callbacks, RunConfig, Trainer, TrainingInterrupted


def _args(mnist_dir, out, *extra, epochs=2, train_size=128):
    return ["train", *tiny_train_args(mnist_dir, out, *extra, epochs=epochs, train_size=train_size, test_size=32,
                                      eps=0.1, step_size=0.05, steps=2, lr=0.05, milestones=[1], seed=3)]


def _cli(*args, silence_s=300):
    return run_with_hang_guard([sys.executable, "-m", "at_memorization", *map(str, args)], env=subprocess_env(),
                               silence_s=silence_s, cwd=Path(__file__).parent)


_invoke = invoke


def _config(mnist_dir, **overrides) -> RunConfig:
    settings = dict(method="pgd-at", dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", epochs=3,
                    batch_size=32, lr=0.05, milestones=[2], eps=0.1, step_size=0.05, steps=1, eval_steps=1,
                    train_size=128, test_size=32, seed=1)
    settings.update(overrides)
    return RunConfig(**settings)


def _metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("train_seconds")
    return records


def _same_state(a: Path, b: Path):
    x, y = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert x["epoch"] == y["epoch"] and "partial" not in x and "partial" not in y
    for key in x["model"]:
        assert torch.equal(x["model"][key], y["model"][key]), key
    buffers = [(s["momentum_buffer"], t["momentum_buffer"])
               for s, t in zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values())]
    assert buffers and all(torch.equal(s, t) for s, t in buffers)


def _stop_after_epoch(trainer: Trainer, epoch: int) -> Trainer:
    """Ask the trainer to stop once ``epoch`` is done (what a signal between epochs does)."""
    previous = trainer.callbacks.epoch_end

    def epoch_end(record):
        previous(record)
        if record["epoch"] == epoch:
            trainer.request_stop("test")

    trainer.callbacks.epoch_end = epoch_end
    return trainer


def _killed_run(mnist_dir, run, tmp_path, *extra, at="2:1", epochs=2):
    """A run SIGKILLed at epoch:step (as by the OOM killer): last.pt holds the epoch before."""
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    killed = _driven(driver, _args(mnist_dir, run, *extra, epochs=epochs), signal_at=f"SIGKILL:{at}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr


# --------------------------------------------------------------------------- 1. the run lock
def test_second_process_on_a_busy_run_folder_stops_at_once_naming_the_holder(mnist_dir, tmp_path):
    # Before: both processes exited 0 and metrics.jsonl interleaved their epochs (1,1,2,2,...).
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "at_memorization",
                              *_args(mnist_dir, run, epochs=200, train_size=512)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                             cwd=Path(__file__).parent)
    try:
        # No wall-clock deadline: the wait ends when the lock appears, the first process exits, or it
        # used no CPU time for 300 s (hung); a slow start on a loaded machine only makes it longer.
        wait_while_busy((run / ".lock").exists, first)
        assert (run / ".lock").exists(), "the first process never took the lock"
        for extra in ([], ["--resume"]):
            second = _cli(*_args(mnist_dir, run, *extra, epochs=200, train_size=512))
            message = assert_one_line_error(second, "is in use by PID", str(first.pid), "this host")
            assert str(run / ".lock") in message
        assert first.poll() is None  # the first run goes on, undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = communicate_with_hang_guard(first)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert not (run / ".lock").exists()  # released on the way out
    epochs = [r["epoch"] for r in _metrics(run)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer: no interleaving


def test_a_lock_left_by_a_dead_process_does_not_block_resume(mnist_dir, tmp_path):
    run = tmp_path / "run"
    _killed_run(mnist_dir, run, tmp_path)  # a real holder, killed: its lock stays behind
    dead_pid = json.loads((run / ".lock").read_text())["pid"]
    result = _cli(*_args(mnist_dir, run, "--resume", epochs=2))
    assert result.returncode == 0, result.stderr
    assert f"took over the lock of {run} from PID {dead_pid}, which is no longer running" in result.stderr
    assert [r["epoch"] for r in _metrics(run)] == [1, 2] and not (run / ".lock").exists()


def test_a_lock_held_on_another_host_blocks_with_advice(mnist_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 1234, "host": "gpu-node-7", "started": "2026-11-26T01:00:00"}))
    assert_one_line_error(_invoke(*_args(mnist_dir, run)), "in use by PID 1234 on host gpu-node-7", "delete")


# --------------------------------------------------------------------------- 2. data fingerprint
def _mnist_copy_with_changed_labels(mnist_dir: Path, target: Path, changed: int) -> Path:
    target.mkdir()
    for name in os.listdir(mnist_dir):
        (target / name).write_bytes((mnist_dir / name).read_bytes())
    path = target / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    labels = np.frombuffer(bytes(raw[8:]), dtype=np.uint8).copy()
    labels[:changed] = (labels[:changed] + 1) % 10
    raw[8:] = labels.tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    return target


def test_resume_on_different_training_data_is_refused_unless_deliberate(mnist_dir, tmp_path):
    # Before: --resume with a --data-dir whose labels differed continued silently.
    run = tmp_path / "run"
    _killed_run(mnist_dir, run, tmp_path)
    saved = json.loads((run / "config.json").read_text())["data_fingerprint"]
    assert len(saved) == 64 and ckpt.load_checkpoint(run / "last.pt")["data_fingerprint"] == saved
    other = _mnist_copy_with_changed_labels(mnist_dir, tmp_path / "other", changed=100)
    args = _args(other, run, "--resume", epochs=2)
    assert_one_line_error(_invoke(*args), "training data differ", saved[:12], "--allow-data-change")
    assert [r["epoch"] for r in _metrics(run)] == [1]
    result = _invoke(*args, "--allow-data-change")
    assert result.exit_code == 0, result.output
    event = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert event["event"] == "data-change" and event["fingerprint"][0] == saved
    # the same data in another folder (data_dir may change on resume) is accepted without a word
    run2 = tmp_path / "run2"
    _killed_run(mnist_dir, run2, tmp_path)
    copy = _mnist_copy_with_changed_labels(mnist_dir, tmp_path / "copy", changed=0)
    assert _invoke(*_args(copy, run2, "--resume", epochs=2)).exit_code == 0


# --------------------------------------------------------------------------- 3. TE schedule
def test_te_that_would_never_switch_on_is_an_error(mnist_dir, tmp_path):
    # Before: trained plain PGD-AT and exited 0.
    result = _invoke(*_args(mnist_dir, tmp_path / "run", "--method", "pgd-at-te", "--te-start", 5, "--te-end", 9))
    assert_one_line_error(result, "TE starts at epoch 5", "2 epochs", "never switch on")
    assert not (tmp_path / "run").exists()


def test_te_that_peaks_after_the_last_epoch_is_a_warning(mnist_dir, tmp_path):
    result = _cli(*_args(mnist_dir, tmp_path / "run", "--method", "pgd-at-te", "--te-start", 1, "--te-end", 9))
    assert result.returncode == 0, result.stderr
    assert "warning: TE's weight peaks at epoch 9 (--te-end) but the run has 2 epochs" in result.stderr


# --------------------------------------------------------------------------- 4. lost tracking
def test_lost_tracking_file_marks_epochs_unrecorded_and_memorization_refuses(mnist_dir, tmp_path):
    # Before: deleting tracking.pt and resuming gave all-zero rows for the earlier epochs, silently.
    from at_memorization.user_errors import AnalysisError
    from at_memorization.analysis.memorization import memorization_report

    run, logs = tmp_path / "run", []
    config = _config(mnist_dir, track_samples=True)
    trainer = _stop_after_epoch(Trainer(config, run, callbacks=Callbacks(log=logs.append)), 2)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert torch.load(run / "tracking.pt", weights_only=True)["recorded"].tolist() == [1, 1, 0]
    (run / "tracking.pt").unlink()
    Trainer(config, run, resume=True, callbacks=Callbacks(log=logs.append)).fit()
    assert any("tracking.pt is missing" in line and "epochs 1-2 are lost" in line for line in logs)
    tracked = torch.load(run / "tracking.pt", weights_only=True)
    assert tracked["recorded"].tolist() == [0, 0, 1]
    with pytest.raises(AnalysisError, match=r"no per-sample records for epoch\(s\) 1, 2"):
        memorization_report(run)


# --------------------------------------------------------------------------- 6. SIGTERM / SIGINT
SIGNAL_DRIVER = textwrap.dedent('''
    """Run `at-mem` and send itself a real signal at a chosen step (AT_MEM_TEST_SIGNAL=NAME:epoch:step)."""
    import os, signal, sys

    from at_memorization import training
    from at_memorization.cli import main

    name, epoch, step = (os.environ.get("AT_MEM_TEST_SIGNAL") or "none:0:0").split(":")
    where, now = [int(epoch), int(step)], {"epoch": 0, "step": 0}

    original_epoch = training.Trainer.train_epoch
    def train_epoch(self, epoch):
        now.update(epoch=epoch, step=0)
        return original_epoch(self, epoch)
    training.Trainer.train_epoch = train_epoch

    original_prepare = training.Trainer.prepare_batch
    def prepare(self, *args):
        now["step"] += 1
        if name != "none" and [now["epoch"], now["step"]] == where:
            os.kill(os.getpid(), getattr(signal, name))  # arrives during this step
        return original_prepare(self, *args)
    training.Trainer.prepare_batch = prepare
    main(sys.argv[1:], prog_name="at-mem")
''')


def _driven(driver, args, signal_at=None):
    env = subprocess_env()
    if signal_at:
        env["AT_MEM_TEST_SIGNAL"] = signal_at
    return run_with_hang_guard([sys.executable, str(driver), *args], env=env)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_and_resumes_bit_identically(name, mnist_dir, tmp_path):
    # Before: SIGTERM exited 143 with no message and lost the epoch; SIGINT printed "Aborted!".
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ("--track-samples", "--label-noise", "0.2", "--augment")
    assert _driven(driver, _args(mnist_dir, full, *extra, epochs=3)).returncode == 0
    stopped = _driven(driver, _args(mnist_dir, cut, *extra, epochs=3), signal_at=f"{name}:2:2")
    assert stopped.returncode == 128 + getattr(signal, name), stopped.stderr
    assert (f"stopped by {name} at epoch 2, after step 2 of 4; saved {cut / 'last.pt'}; continue with: at-mem train "
            f"--resume --out {cut}") in stopped.stderr
    state = ckpt.load_checkpoint(cut / "last.pt")
    assert state["epoch"] == 1 and state["partial"]["epoch"] == 2 and state["partial"]["step"] == 2
    assert not (cut / ".lock").exists()
    resumed = _driven(driver, _args(mnist_dir, cut, *extra, "--resume", epochs=3))
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 2, step 2" in resumed.stderr
    _same_state(full / "last.pt", cut / "last.pt")
    assert _metrics(full) == _metrics(cut)
    a, b = (torch.load(r / "tracking.pt", weights_only=True) for r in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_every_steps_survives_a_kill_mid_epoch(mnist_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _driven(driver, _args(mnist_dir, full, epochs=2, train_size=192)).returncode == 0
    killed = _driven(driver, _args(mnist_dir, cut, "--checkpoint-every-steps", 2, epochs=2, train_size=192),
                     signal_at="SIGKILL:1:5")
    assert killed.returncode == -signal.SIGKILL
    state = ckpt.load_checkpoint(cut / "last.pt")
    assert state["partial"]["epoch"] == 1 and state["partial"]["step"] == 4  # the last multiple of 2 before step 5
    resumed = _driven(driver, _args(mnist_dir, cut, "--checkpoint-every-steps", 2, "--resume", epochs=2, train_size=192))
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 1, step 4" in resumed.stderr
    _same_state(full / "last.pt", cut / "last.pt")
    assert _metrics(full) == _metrics(cut)


# --------------------------------------------------------------------------- 7. last.pt rotation
def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(mnist_dir, tmp_path):
    # Before: --resume ended with a message cut mid-sentence and no way forward.
    full, run, logs = tmp_path / "full", tmp_path / "run", []
    Trainer(_config(mnist_dir), full).fit()
    trainer = _stop_after_epoch(Trainer(_config(mnist_dir), run), 2)
    with pytest.raises(TrainingInterrupted):
        trainer.fit()
    assert ckpt.load_checkpoint(run / "last-prev.pt")["epoch"] == 1
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    Trainer(_config(mnist_dir), run, resume=True, callbacks=Callbacks(log=logs.append)).fit()
    assert any(line.startswith("warning: ") and "resuming from the previous checkpoint" in line for line in logs)
    _same_state(full / "last.pt", run / "last.pt")  # epochs 2 and 3 redone, bit-identical
    assert _metrics(full) == _metrics(run)
    assert json.loads((run / "history.jsonl").read_text().splitlines()[0])["event"] == "fallback"


def test_both_last_checkpoints_unreadable_names_best_as_the_last_resort(mnist_dir, tmp_path):
    run = tmp_path / "run"
    assert _invoke(*_args(mnist_dir, run, epochs=2)).exit_code == 0
    for name in ("last.pt", "last-prev.pt"):
        (run / name).write_bytes(b"not a checkpoint")
    message = assert_one_line_error(_invoke(*_args(mnist_dir, run, "--resume", epochs=2)), "no usable checkpoint")
    assert str(run / "best.pt") in message and "copy it to" in message


# --------------------------------------------------------------------------- 8. overrides, validation
def test_resume_with_a_recorded_override(mnist_dir, tmp_path):
    # Before: "try a lower --lr", but `--resume --lr 0.05` was refused (config differs).
    run = tmp_path / "run"
    _killed_run(mnist_dir, run, tmp_path)
    assert_one_line_error(_invoke(*_args(mnist_dir, run, "--resume", "--lr", 0.01, epochs=2)), "differs", "'lr'",
                    "--override lr=VALUE")
    result = _invoke(*_args(mnist_dir, run, "--resume", "--override", "lr=0.01", epochs=2))
    assert result.exit_code == 0, result.output
    assert [r["lr"] for r in _metrics(run)] == [0.05, 0.01 * 0.1]  # epoch 2 is after milestone 1
    event = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert event["event"] == "override" and event["changes"] == {"lr": [0.05, 0.01]} and event["epoch"] == 2


@pytest.mark.parametrize("override,words", [
    ("seed=4", ["--override seed", "cannot change on resume"]),
    ("lr", ["expected KEY=VALUE"]),
    ("lr=fast", ["--lr: 'fast' is not a number"]),
    ("colour=red", ["no such setting"]),
])
def test_bad_overrides_are_one_line_errors(override, words, mnist_dir, tmp_path):
    run = tmp_path / "run"
    _killed_run(mnist_dir, run, tmp_path)
    assert_one_line_error(_invoke(*_args(mnist_dir, run, "--resume", "--override", override, epochs=2)), *words)


def test_override_without_resume_is_refused(mnist_dir, tmp_path):
    assert_one_line_error(_invoke(*_args(mnist_dir, tmp_path / "run", "--override", "lr=0.01")), "--resume only")


@pytest.mark.parametrize("flags,words", [
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--method", "trades", "--beta", "nan"], ["--beta must be a finite number"]),
    (["--method", "trades", "--beta", "-6"], ["--beta must be >= 0, got -6"]),
    (["--method", "pgd-at-te", "--te-weight", "nan"], ["--te-weight must be a finite number"]),
    (["--method", "pgd-at-te", "--te-weight", "-1"], ["--te-weight must be >= 0"]),
])
def test_non_finite_or_negative_settings_fail_up_front(flags, words, mnist_dir, tmp_path):
    assert_one_line_error(_invoke(*_args(mnist_dir, tmp_path / "run", *flags)), *words)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 9. stale temporaries
def test_stale_temporary_files_are_removed_by_a_fresh_run(mnist_dir, tmp_path):
    # Before: a .last.pt.*.tmp left by a kill before the first checkpoint survived a later fresh run.
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".last.pt.x1y2z3.tmp"
    stale.write_bytes(b"partial write")
    assert _invoke(*_args(mnist_dir, run, epochs=1)).exit_code == 0
    assert not stale.exists() and not list(run.glob(".*.tmp"))


# --------------------------------------------------------------------------- 11. --out checks
def test_out_that_is_a_file_or_under_a_file_fails_before_loading_data(tmp_path):
    # Before: a traceback after the data had loaded. A missing --data-dir proves no loading happened.
    afile = tmp_path / "afile"
    afile.write_text("x")
    missing = tmp_path / "no-data"
    assert_one_line_error(_invoke(*_args(missing, afile)), "is a file, not a folder")
    assert_one_line_error(_invoke(*_args(missing, afile / "run")), "is a file, so no folder can be made under it")


def test_evaluate_output_that_cannot_be_written_fails_before_evaluating(mnist_dir, tmp_path):
    run = tmp_path / "run"
    assert _invoke(*_args(mnist_dir, run, epochs=1)).exit_code == 0
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = _invoke("evaluate", run / "last.pt", "--attack", "clean", "--n-examples", 16, "--device", "cpu",
                     "--output", afile / "eval.json")
    assert_one_line_error(result, "--output", "is a file")
    assert "clean_acc" not in result.output  # nothing was evaluated


# --------------------------------------------------------------------------- 14. --train-size notice
def test_train_size_beyond_the_data_says_all_points_are_used(mnist_dir, tmp_path):
    logs = []
    trainer = Trainer(_config(mnist_dir, epochs=1, train_size=128, test_size=20_000), tmp_path / "run",
                      callbacks=Callbacks(log=logs.append))
    trainer.close()
    assert "--test-size 20000: the data has 10000 points; all 10000 are used" in logs


# --------------------------------------------------------------------------- 13. write failures
def test_a_write_failure_names_the_real_cause_and_how_to_resume(mnist_dir, tmp_path):
    # Before: PyTorch's "PytorchStreamWriter failed writing file data/0: file write failed" traceback.
    import resource

    run = tmp_path / "run"
    assert _invoke(*_args(mnist_dir, run)).exit_code == 0  # to learn the checkpoint's size
    size = (run / "last.pt").stat().st_size
    shutil_run = tmp_path / "limited"

    def limit():  # files may grow to half a checkpoint: init.pt fits, best.pt/last.pt do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2 + (run / "init.pt").stat().st_size // 2,) * 2)

    result = run_with_hang_guard([sys.executable, "-m", "at_memorization", *_args(mnist_dir, shutil_run)],
                                 env=subprocess_env(), preexec_fn=limit, cwd=Path(__file__).parent)
    message = assert_one_line_error(result, "cannot write", "File too large [Errno 27]", "once fixed")
    assert "PytorchStreamWriter" not in result.stderr
    assert "no checkpoint was written yet" in message
    assert not list(shutil_run.glob(".*.tmp")) and not (shutil_run / ".lock").exists()
