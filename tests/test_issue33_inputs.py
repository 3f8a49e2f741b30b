"""Issue 33, item 8 (and the tracking.pt bullet of item 7): inputs that gave a traceback, or a wrong
answer with exit status 0, each get one `Error: ...` line and a non-zero exit, and nothing in a
malicious file is executed.

Most tests need no training: a run folder is hand-made where the command reads only its files. The
folders a test makes read-only are made so with chmod (or, run as root, which chmod does not stop,
with ``chattr +i``; the test is skipped where neither works).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_testing import assert_one_line_error, invoke, one_line, tiny_mnist_plan_settings, tiny_train_args

from at_memorization.checkpoint import CheckpointError, load_initial_weights
from at_memorization.plan import PlanError, read_plan
from at_memorization.runlock import RunLock
from at_memorization.runtime import DeviceError, resolve_device
from at_memorization.settings import RunConfig, SettingError

SEED_BOUNDS = "--seed must be in [0, 4294967295]"
NOT_UTF8 = b"\xff\xfe{\"epoch\": 2}\n"  # bytes no UTF-8 text holds (the trainer writes ASCII)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` refuses new files and deletions inside the block (chmod; chattr +i for root)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    else:
        try:
            subprocess.run(["chattr", "+i", str(folder)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("running as root without chattr: no folder can be made read-only")
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)  # noqa: E731
    try:
        yield folder
    finally:
        undo()


def tiny_plan(folder: Path, data_dir: Path, seeds: str = "[0]") -> Path:
    """A one-run plan of the tiny MNIST settings (its run: ``pgd-at-s0``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.toml"
    path.write_text(f'name = "tiny"\nmethods = ["pgd-at"]\nseeds = {seeds}\ndevice = "cpu"\n\n'
                    + tiny_mnist_plan_settings(data_dir)
                    + '\n[[evaluate]]\ncheckpoints = ["last"]\nattacks = ["clean"]\nn_examples = 16\n')
    return path


def study_of(plan: Path, out: Path) -> Path:
    """A study folder of ``plan`` that nothing has run in yet."""
    out.mkdir(parents=True)
    shutil.copyfile(plan, out / "plan.toml")
    return out


def metrics_line(epoch: int) -> str:
    return json.dumps({"epoch": epoch, "train_loss": 1.0, "test_clean_acc": 0.5, "test_robust_acc": 0.25}) + "\n"


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """A finished one-epoch tiny MNIST run (init.pt, last.pt, ...)."""
    out = tmp_path_factory.mktemp("issue33-inputs") / "run"
    result = invoke("train", *tiny_train_args(mnist_dir, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the trained run, free to corrupt."""
    return shutil.copytree(trained_run, tmp_path / "run")


# --------------------------------------------------------------------------- --seed
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_by_train_evaluate_and_the_analyses(seed, mnist_dir, tmp_path):
    # Before: NumPy's "Seed must be between 0 and 2**32 - 1" traceback, after the data had loaded.
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", *tiny_train_args(mnist_dir, out, seed=seed)), SEED_BOUNDS, f"got {seed}")
    assert not out.exists()
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not read: the seed is checked first")
    assert_one_line_error(invoke("evaluate", checkpoint, "--seed", seed, "--device", "cpu"), SEED_BOUNDS)
    for command in ("measures", "gradient-stability"):
        assert_one_line_error(invoke(command, checkpoint, "--output", tmp_path / "out.json", "--seed", seed),
                              SEED_BOUNDS)
    one_line(lambda: RunConfig(seed=seed).validate(), SettingError, SEED_BOUNDS)  # the library checks it too
    RunConfig(seed=2**32 - 1).validate()  # the largest seed NumPy takes is fine


def test_a_plan_seed_out_of_range_fails_the_plan_check(mnist_dir, tmp_path):
    plan = tiny_plan(tmp_path, mnist_dir, seeds="[0, -1]")
    one_line(lambda: read_plan(plan), PlanError, str(plan), "seeds", SEED_BOUNDS, "got -1")
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(invoke("reproduce", plan, "--out", tmp_path / "study", *extra), "seeds", SEED_BOUNDS,
                              exit_code=1)
    assert not (tmp_path / "study").exists()


# --------------------------------------------------------------------------- a metrics.jsonl that is not text
def test_a_metrics_file_that_is_not_utf8_is_one_line_for_report_plot_and_reproduce(mnist_dir, tmp_path):
    # Before: UnicodeDecodeError tracebacks (reproduce even with --dry-run; report; plot --by-method).
    plan = tiny_plan(tmp_path, mnist_dir)
    out = study_of(plan, tmp_path / "study")
    run = out / "runs" / "pgd-at-s0"
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics_line(1).encode() + NOT_UTF8)
    words = (str(metrics), "cannot read (not UTF-8 text: byte 0xff at offset")
    for command in (["report", run], ["plot", run, "--output", tmp_path / "a.png"],
                    ["plot", run, "--by-method", "--output", tmp_path / "b.png"],
                    ["reproduce", plan, "--out", out, "--dry-run"], ["reproduce", plan, "--out", out]):
        assert_one_line_error(invoke(*command), *words)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    assert not (out / "status.json").exists() and not (out / "logs").exists()  # nothing started


# --------------------------------------------------------------------------- status.json, DIR/logs
def test_a_study_folder_made_read_only_while_a_call_holds_it_is_one_line_naming_status_json(
        mnist_dir, tmp_path, monkeypatch):
    # Before: 79 lines, status.json's WriteError chained to the PermissionError of removing DIR/.lock.
    plan = tiny_plan(tmp_path, mnist_dir)
    out = study_of(plan, tmp_path / "study")
    for folder in ("runs", "logs", "settings"):
        (out / folder).mkdir()
    acquire = RunLock.acquire
    stack = contextlib.ExitStack()

    def acquire_then_read_only(lock):
        held = acquire(lock)
        stack.enter_context(read_only(out))  # e.g. `chmod a-w DIR` while the call runs
        return held

    monkeypatch.setattr(RunLock, "acquire", acquire_then_read_only)
    with stack:
        result = invoke("reproduce", plan, "--out", out)
    assert_one_line_error(result, f"cannot write {out / 'status.json'}", exit_code=1)
    assert not any((out / "logs").iterdir())  # no task started


def test_a_read_only_study_folder_is_one_line_before_anything_runs(mnist_dir, tmp_path):
    # Before: the PermissionError traceback of creating the lock's temporary file.
    plan = tiny_plan(tmp_path, mnist_dir)
    out = study_of(plan, tmp_path / "study")
    with read_only(out):
        result = invoke("reproduce", plan, "--out", out)
    assert_one_line_error(result, f"--out {out}: cannot write in it", exit_code=1)
    assert sorted(p.name for p in out.iterdir()) == ["plan.toml"]


def test_a_file_where_the_study_keeps_its_logs_is_one_line_before_any_task_starts(mnist_dir, tmp_path):
    # Before: a FileExistsError traceback from the loop, after status.json recorded a started call.
    plan = tiny_plan(tmp_path, mnist_dir)
    out = study_of(plan, tmp_path / "study")
    (out / "logs").write_text("mine")
    assert_one_line_error(invoke("reproduce", plan, "--out", out), f"--out {out / 'logs'} is a file, not a folder",
                          exit_code=1)
    assert (out / "logs").read_text() == "mine" and not (out / "status.json").exists()


# --------------------------------------------------------------------------- init.pt (measures)
class _Payload:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_measures_refuses_a_truncated_malicious_or_foreign_init_pt_in_one_line(run, tmp_path):
    # Before: torch's tracebacks (a truncated file; a raw pickle, with torch's warning); nothing ran then either.
    init = run / "init.pt"
    intact = init.read_bytes()
    marker = tmp_path / "pwned"
    first = next(iter(load_initial_weights(init)))

    def measures():
        return invoke("measures", run, "--output", tmp_path / "m.json", "--n-points", 8, "--gap-points", 8,
                      "--draws", 1, "--awp-steps", 1, "--device", "cpu")

    init.write_bytes(intact[: len(intact) // 2])
    assert_one_line_error(measures(), str(init), "unreadable weights file")
    torch.save({first: _Payload(marker)}, init)
    assert_one_line_error(measures(), str(init), "refused", "posix.system")
    init.write_bytes(pickle.dumps(_Payload(marker)))  # a raw pickle, not torch.save's format
    assert_one_line_error(measures(), str(init), "unreadable weights file")
    torch.save([1, 2], init)
    assert_one_line_error(measures(), str(init), "not a weights file (a list")
    torch.save({first: torch.zeros(3)}, init)
    assert_one_line_error(measures(), str(init), f"parameter {first!r} has shape [3]", "belongs to another model")
    assert not marker.exists()
    assert not (tmp_path / "m.json").exists()
    one_line(lambda: load_initial_weights(tmp_path / "absent.pt"), CheckpointError, "no such weights file")


# --------------------------------------------------------------------------- tracking.pt (memorization)
def tracked_run(path: Path, adv_correct) -> Path:
    """A hand-made tracked run of 2 epochs x 4 samples whose tracking.pt holds ``adv_correct``."""
    path.mkdir()
    (path / "metrics.jsonl").write_text(metrics_line(1) + metrics_line(2))
    torch.save({"adv_correct": adv_correct, "adv_loss": torch.ones(2, 4, dtype=torch.float16)}, path / "tracking.pt")
    return path


@pytest.mark.parametrize("adv_correct, words", [
    # Before: exit 0 and "every sample fitted" (NaN and 2 read as true).
    (torch.full((2, 4), float("nan")), ["'adv_correct' is torch.float32, expected torch.uint8"]),
    (torch.full((2, 4), 2, dtype=torch.uint8), ["'adv_correct' holds values other than 0 and 1"]),
    # Before: AttributeError tracebacks ('list' object has no attribute 'dim').
    ([[1, 0, 1, 0], [1, 1, 1, 1]], ["'adv_correct' is a list, not a tensor"]),
    (torch.ones(4, dtype=torch.uint8), ["'adv_correct' has shape [4]"]),
], ids=["float-nan", "not-0-or-1", "list", "one-dimensional"])
def test_memorization_refuses_a_tracking_file_that_is_not_flags(adv_correct, words, tmp_path):
    run = tracked_run(tmp_path / "run", adv_correct)
    result = invoke("memorization", run, "--output", tmp_path / "m.json")
    assert_one_line_error(result, str(run / "tracking.pt"), *words)
    assert not (tmp_path / "m.json").exists()


def test_memorization_names_a_tracking_file_that_is_no_dict_and_reads_intact_flags(tmp_path):
    # (A top-level list was one line before, in other words; a dict holding a list was the traceback.)
    run = tracked_run(tmp_path / "run", torch.ones(2, 4, dtype=torch.uint8))
    torch.save([torch.ones(2, 4)], run / "tracking.pt")
    assert_one_line_error(invoke("memorization", run, "--output", tmp_path / "m.json"),
                          "not a tracking file (a list")
    torch.save({"adv_correct": torch.ones(2, 4, dtype=torch.uint8), "adv_loss": torch.ones(2, 4, dtype=torch.float16)},
               run / "tracking.pt")
    assert invoke("memorization", run, "--output", tmp_path / "m.json").exit_code == 0  # intact flags: a report


# --------------------------------------------------------------------------- --logger tensorboard, --device mps
def test_an_unwritable_tensorboard_folder_is_refused_before_the_run_starts(mnist_dir, tmp_path):
    # Before: a warning, then the writer thread's traceback, and a run without its event files.
    # Refused, as an --out that cannot be written is: the user asked for the curves, and a warning in
    # a long unattended run's log is easily missed.
    out = tmp_path / "run"
    out.mkdir()
    (out / "tensorboard").write_text("mine")
    result = invoke("train", *tiny_train_args(mnist_dir, out, "--logger", "tensorboard"))
    assert_one_line_error(result, "--logger tensorboard:", f"{out / 'tensorboard'} is a file, not a folder")
    (out / "tensorboard").unlink()
    (out / "tensorboard").mkdir()
    with read_only(out / "tensorboard"):
        result = invoke("train", *tiny_train_args(mnist_dir, out, "--logger", "tensorboard"))
    assert_one_line_error(result, "--logger tensorboard:", f"cannot write in {out / 'tensorboard'}")
    assert [p.name for p in out.iterdir()] == ["tensorboard"]  # refused before the run wrote anything


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_on_a_machine_without_it_is_one_line(mnist_dir, tmp_path):
    # Before: "PyTorch is not linked with support for mps devices", a traceback after the data loaded.
    out = tmp_path / "run"
    assert_one_line_error(invoke("train", *tiny_train_args(mnist_dir, out, device="mps")),
                          "device mps requested but MPS is not available here (use --device cpu)")
    assert not out.exists()
    one_line(lambda: resolve_device("mps:0", use_cpu="device='cpu'"), DeviceError, "MPS is not available",
             "device='cpu'")


# --------------------------------------------------------------------------- plots
def test_a_plot_that_cannot_be_written_is_one_line(tmp_path):
    # Before: the OSError traceback of matplotlib's savefig (e.g. "File too large" in a study's outputs).
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(metrics_line(1))
    (tmp_path / "taken").write_text("mine")
    assert_one_line_error(invoke("plot", run, "--output", tmp_path / "taken" / "curves.png"),
                          f"cannot write {tmp_path / 'taken' / 'curves.png'}")
    result = invoke("plot", run, "--output", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
