"""One declaration per run setting, one owner of the run folder (issue 18).

Each test names the item of issue 18 it covers and reproduces what the package did before: the
good checkpoint destroyed by a fallback, NaN checkpoints and false advice after a divergence,
silently coerced values, tracebacks, work done before a refused override, history events for
what did not happen, the README's way to extend a tracked run failing, wrong exit codes, wrong
wording for a malicious checkpoint, and a truncated config.json passing --resume. (Item 3, the lock
race, is tests/test_runlock_race.py; item 12, the busy-machine timeouts, tests/subprocess_guard.py.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch
from cli_testing import assert_one_line_error, invoke, subprocess_env, tiny_train_args

from at_memorization import checkpoint as ckpt
from at_memorization.runfolder import RunFolder
from at_memorization.settings import RUN_SETTINGS, SETTINGS_BY_NAME, RunConfig, SettingError, read_settings


def _args(mnist_dir, out, *extra, epochs=2):
    return ["train", *tiny_train_args(mnist_dir, out, *extra, epochs=epochs, train_size=96, test_size=32, eps=0.1,
                                      step_size=0.05, lr=0.05, seed=3)]


def _cli(*args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "at_memorization", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), preexec_fn=preexec_fn, cwd=Path(__file__).parent)


def _finite(path: Path) -> bool:
    state = ckpt.load_checkpoint(path)
    return all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())


def _events(run: Path) -> list[str]:
    return [e["event"] for e in RunFolder(run).read_history()]


@pytest.fixture(scope="module")
def finished_run(mnist_dir, tmp_path_factory) -> Path:
    """A finished 3-epoch run with --track-samples (copied by the tests that change it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = invoke(*_args(mnist_dir, run, "--track-samples", epochs=3))
    assert result.exit_code == 0, result.output
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# --------------------------------------------------------------------------- 1. the fallback keeps the good checkpoint
def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # checkpoints of smallcnn are larger


def test_a_failed_write_after_a_fallback_keeps_the_good_checkpoint(finished_run, tmp_path):
    # Before: last.pt truncated, then --resume --checkpoint-every-steps 1 under a file-size limit: the
    # rotation linked the unreadable last.pt over the good last-prev.pt, and nothing could resume.
    run = _copy(finished_run, tmp_path)
    good_epoch = ckpt.load_checkpoint(run / "last-prev.pt")["epoch"]
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    failed = _cli("train", "--resume", "--out", run, "--override", "epochs=4", "--checkpoint-every-steps", 1,
                  "--quiet", "--device", "cpu", preexec_fn=_limit_file_size)
    message = assert_one_line_error(failed, "File too large", "nothing is lost")
    assert str(run / "last-prev.pt") in message  # the file that really holds the last complete checkpoint
    assert ckpt.load_checkpoint(run / "last-prev.pt")["epoch"] == good_epoch
    resumed = _cli("train", "--resume", "--out", run, "--override", "epochs=4", "--quiet", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in RunFolder(run).read_metrics()] == [1, 2, 3, 4]


def test_the_rotation_never_replaces_a_good_previous_with_an_unreadable_last(tmp_path):
    folder = RunFolder(tmp_path)
    state = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "model": {"w": torch.ones(3)},
             "model_name": "m", "num_classes": 2, "dataset": "mnist", "epoch": 1}
    folder.save_last(state, "epoch 1")
    folder.save_last({**state, "epoch": 2}, "epoch 2")
    folder.last.write_bytes(b"garbage")
    reader = RunFolder(tmp_path)
    path, loaded, passed_over = reader.load_resumable()
    assert path == folder.previous and loaded["epoch"] == 1 and "last.pt" in passed_over
    reader.save_last({**state, "epoch": 3}, "epoch 3")  # last.pt was bad: it is not rotated over last-prev.pt
    assert ckpt.load_checkpoint(folder.previous)["epoch"] == 1 and ckpt.load_checkpoint(folder.last)["epoch"] == 3


# --------------------------------------------------------------------------- 2. divergence writes no NaN checkpoint
def test_divergence_with_step_checkpoints_leaves_finite_checkpoints_and_true_advice(finished_run, tmp_path):
    # Before: last.pt and last-prev.pt held NaN weights from mid-epoch 4; the message named last.pt
    # (epoch 3) as good and following its advice failed ("model weights are not finite").
    run = _copy(finished_run, tmp_path)
    diverged = invoke("train", "--resume", "--out", run, "--override", "epochs=5", "--override", "milestones=2",
                      "--override", "lr=1000", "--checkpoint-every-steps", 1, "--quiet", "--device", "cpu")
    message = assert_one_line_error(diverged, "diverged")
    for name in ("last.pt", "last-prev.pt", "best.pt"):
        assert _finite(run / name), name
    if "diverged already" in message:
        # Issue 33, item 7: at lr 1000 the last finite checkpoint's weights have grown by orders of
        # magnitude; a resume from it at any lower lr diverged again, so it is not offered
        named = Path(message.split("the last finite checkpoint ")[1].split(" (")[0])
        assert named.is_file() and _finite(named)
        assert "--resume" not in message and "start a new run with a lower learning rate" in message, message
        return
    named = Path(message.split("the last good checkpoint is ")[1].split(" (")[0])
    assert named.is_file() and _finite(named) and "checked to be finite" in message
    command = message.split("continue from it with a lower learning rate: ")[1].split()
    assert command[:2] == ["at-mem", "train"]
    followed = invoke(*command[1:], "--quiet", "--device", "cpu")
    # it resumes (no "not finite", no "already holds a run")
    assert followed.exit_code == 0 or "diverged" in followed.output, followed.output


def test_divergence_in_the_first_epoch_leaves_no_checkpoint_and_its_advice_works(mnist_dir, tmp_path):
    # Before: "no checkpoint was written" although a NaN last.pt existed, and the advice (--lr, the
    # same --out) failed with "already holds a run".
    run = tmp_path / "run"
    diverged = invoke(*_args(mnist_dir, run, "--checkpoint-every-steps", 1, "--lr", "1e12", epochs=1))
    message = assert_one_line_error(diverged, "diverged")
    if "no checkpoint was written yet" in message:
        assert not (run / "last.pt").exists()
        again = invoke(*_args(mnist_dir, run, epochs=1))  # "the same command with --lr" (a sane one)
        assert again.exit_code == 0, again.output
    else:  # a finite mid-epoch checkpoint came first: it is named, and finite
        assert _finite(run / "last.pt")


# --------------------------------------------------------------------------- 4. strict types
@pytest.mark.parametrize("line,words", [
    ("epochs = 1.7", ["--epochs", "1.7", "not an integer"]),
    ("epochs = true", ["--epochs", "True", "not an integer"]),
    ("lr = [0.1, 0.2]", ["--lr", "not a number"]),
    ("augment = 1", ["--augment", "not true or false"]),
    ("milestones = [2.5]", ["--milestones", "not a list of epochs"]),
    ("te_weight = \"lots\"", ["--te-weight", "not a number"]),
])
def test_file_values_of_the_wrong_type_are_refused_not_coerced(line, words, tmp_path):
    # Before: epochs = 1.7 and epochs = true resolved to epochs 1; lr = [0.1, 0.2] was a traceback.
    path = tmp_path / "bad.toml"
    path.write_text(f'method = "pgd-at-te"\n{line}\n')
    assert_one_line_error(invoke("train", "--config", path, "--print-config"), "--config", *words)


def test_values_are_read_by_their_declaration():
    run, method = read_settings({"eps": "8/255", "milestones": "3,5", "epochs": 4, "te-weight": 2},
                                {"te_weight": SETTINGS_BY_NAME["lr"]}, "test")
    assert run == {"eps": 8 / 255, "milestones": [3, 5], "epochs": 4} and method == {"te_weight": 2.0}
    with pytest.raises(SettingError, match="--epochs must be >= 1, got 0"):
        read_settings({"epochs": 0}, {}, "test")


# --------------------------------------------------------------------------- 5, 6. one-line errors before any work
@pytest.mark.parametrize("override,words", [
    ("label_noise=1", ["label_noise", "cannot change on resume"]),
    ("method=trades", ["method", "cannot change on resume"]),
    ("dataset=cifar10", ["dataset", "cannot change on resume"]),
    ("epochs=ten", ["epochs", "not an integer"]),
    ("colour=red", ["colour", "no such setting"]),
])
def test_refused_overrides_are_one_line_and_load_no_data(override, words, finished_run, monkeypatch):
    # Before: label_noise=1 and method=trades were tracebacks; dataset=cifar10 loaded (and tried to
    # download) CIFAR-10 before refusing.
    import at_memorization.training.build as training  # the module whose load_data the trainer calls

    def no_data(*args, **kwargs):
        raise AssertionError("data were loaded before the override was refused")

    monkeypatch.setattr(training, "load_data", no_data)
    before = (finished_run / "history.jsonl").read_text() if (finished_run / "history.jsonl").exists() else ""
    assert_one_line_error(invoke("train", "--resume", "--out", finished_run, "--override", override), *words)
    after = (finished_run / "history.jsonl").read_text() if (finished_run / "history.jsonl").exists() else ""
    assert after == before


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, None])
def test_memorization_on_a_broken_labels_file_is_one_line(content, finished_run, tmp_path):
    # Before: a zeroed or pickled labels.pt was read by a bare torch.load: a traceback.
    run = _copy(finished_run, tmp_path)
    if content is None:  # a pickle that would run code
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        torch.save({"labels": Evil()}, run / "labels.pt")
    else:
        (run / "labels.pt").write_bytes(content)
    message = assert_one_line_error(invoke("memorization", run, "--output", tmp_path / "m.json"), "labels.pt")
    assert "pwned" not in message


# --------------------------------------------------------------------------- 7. history records only what happened
def test_shrinking_a_finished_run_is_refused_and_records_nothing(finished_run, tmp_path):
    # Before: --override epochs=1 exited 0 ("already finished all 1 epochs") and recorded override
    # and resumed events though nothing ran.
    run = _copy(finished_run, tmp_path)
    assert_one_line_error(invoke("train", "--resume", "--out", run, "--override", "epochs=1",
                                 "--override", "milestones=1"), "already finished 3 epochs", "can only grow")
    done = invoke("train", "--resume", "--out", run, "--quiet")
    assert done.exit_code == 0 and "already finished all 3 epochs" in done.output
    assert _events(run) == []


def test_a_finished_run_missing_its_last_metrics_line_is_repaired_on_resume(finished_run, tmp_path):
    # A kill between saving the last epoch's checkpoint and appending its metrics line left a run that
    # `--resume` called finished forever while metrics.jsonl lacked that epoch (at-mem reproduce then
    # failed it on every call). The checkpoint's history is the record: the file is rewritten from it.
    run = _copy(finished_run, tmp_path)
    complete = (run / "metrics.jsonl").read_text()
    lines = complete.splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:-1]))
    done = invoke("train", "--resume", "--out", run, "--quiet")
    assert done.exit_code == 0 and "rewritten from the checkpoint" in done.output, done.output
    assert (run / "metrics.jsonl").read_text() == complete
    assert _events(run) == []  # nothing trained: no event
    again = invoke("train", "--resume", "--out", run, "--quiet")
    assert again.exit_code == 0 and "nothing was trained or recorded" in again.output
    assert (run / "metrics.jsonl").read_text() == complete


# --------------------------------------------------------------------------- 8. the README's extension
def test_extending_a_tracked_run_keeps_its_derived_settings_and_grows_tracking(finished_run, tmp_path):
    # Before: --override epochs=N failed on milestones (re-derived from N), and with milestones given
    # too, on tracking.pt's shape.
    run = _copy(finished_run, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    assert "milestones" in saved["derived"]
    result = invoke("train", "--resume", "--out", run, "--override", "epochs=5", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["epochs"] == 5 and config["config"]["milestones"] == saved["config"]["milestones"]
    tracked = ckpt.load_tracking(run / "tracking.pt", 5, 96)
    assert tracked["recorded"].tolist() == [1, 1, 1, 1, 1]
    assert [r["epoch"] for r in RunFolder(run).read_metrics()] == [1, 2, 3, 4, 5]
    assert _events(run) == ["override", "resumed"]
    assert invoke("memorization", run, "--output", tmp_path / "m.json").exit_code == 0


def test_resume_takes_the_saved_settings_and_refuses_a_different_one(finished_run):
    result = invoke("train", "--resume", "--out", finished_run, "--lr", "0.5", "--quiet")
    assert_one_line_error(result, "differs from the saved run in 'lr'", "--override lr=VALUE")
    printed = invoke("train", "--resume", "--out", finished_run, "--override", "epochs=6", "--print-config")
    assert printed.exit_code == 0, printed.output
    config = json.loads(printed.output)["config"]
    saved = json.loads((finished_run / "config.json").read_text())["config"]
    assert config == {**saved, "epochs": 6}


# --------------------------------------------------------------------------- 9. exit codes
DRIVER = textwrap.dedent('''
    """Run `at-mem train` with a signal sent at a chosen moment (AT_MEM_TEST=what)."""
    import os, signal, sys
    from at_memorization import runfolder, training
    from at_memorization.cli import main

    what = os.environ["AT_MEM_TEST"]
    if what == "double-sigint":  # the second Ctrl-C arrives while the stop's checkpoint is written
        save_last = runfolder.RunFolder.save_last
        def patched(self, state, label):
            if "partial" in state:
                os.kill(os.getpid(), signal.SIGINT)
            return save_last(self, state, label)
        runfolder.RunFolder.save_last = patched
        step = training.Trainer.train_epoch
        def train_epoch(self, epoch):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return step(self, epoch)
        training.Trainer.train_epoch = train_epoch
    else:  # SIGTERM while the last epoch is evaluated
        evaluate = training.Trainer.evaluate_epoch
        def evaluate_epoch(self, record):
            if record["epoch"] == self.config.epochs:
                os.kill(os.getpid(), signal.SIGTERM)
            return evaluate(self, record)
        training.Trainer.evaluate_epoch = evaluate_epoch
    sys.exit(main(sys.argv[1:], prog_name="at-mem"))
''')


def _driven(tmp_path, what, args):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(AT_MEM_TEST=what), cwd=Path(__file__).parent)


def test_sigterm_during_the_last_evaluation_exits_143_and_says_the_run_is_complete(mnist_dir, tmp_path):
    # Before: "stopping ... saving", then "done" and exit status 0.
    run = tmp_path / "run"
    result = _driven(tmp_path, "sigterm", _args(mnist_dir, run, epochs=2))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "finished all 2 epochs" in result.stderr and "done:" not in result.stdout
    assert [r["epoch"] for r in RunFolder(run).read_metrics()] == [1, 2]


def test_a_second_ctrl_c_exits_130_without_aborted(mnist_dir, tmp_path):
    # Before: the stop's checkpoint was saved, then "Aborted!" and exit status 1.
    run = tmp_path / "run"
    result = _driven(tmp_path, "double-sigint", _args(mnist_dir, run, epochs=3))
    assert result.returncode == 130, result.stderr
    assert "Aborted!" not in result.stderr and "Traceback" not in result.stderr
    assert "holds the last complete checkpoint" in result.stderr
    resumed = invoke("train", "--resume", "--out", run, "--quiet", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output


# --------------------------------------------------------------------------- 10. malicious checkpoints
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_malicious_checkpoint_is_refused_in_words_and_best_is_suggested_only_when_usable(finished_run, tmp_path):
    # Before: "unreadable checkpoint (Trying to load unsupported GLOBAL posix.system ...)", and a
    # suggestion to copy best.pt that might be refused too.
    run = _copy(finished_run, tmp_path)
    for name in ("last.pt", "last-prev.pt"):
        torch.save({"model": _Evil()}, run / name)
    message = assert_one_line_error(invoke("train", "--resume", "--out", run), "refused", "arbitrary Python objects")
    assert "posix.system" in message and "best.pt (epoch" in message and "readable and finite" in message
    torch.save({"model": _Evil()}, run / "best.pt")
    message = assert_one_line_error(invoke("train", "--resume", "--out", run), "refused")
    assert "copy it" not in message and "best.pt is not usable either" in message


# --------------------------------------------------------------------------- 11. a truncated config.json
def test_a_truncated_config_json_is_rewritten_from_the_checkpoint_on_resume(finished_run, tmp_path):
    # Before: it passed --resume and stayed; at-mem report failed on it later.
    run = _copy(finished_run, tmp_path)
    original = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text((run / "config.json").read_text()[:40])
    result = invoke("train", "--resume", "--out", run, "--override", "epochs=4", "--quiet", "--device", "cpu")
    assert result.exit_code == 0, result.output
    repaired = json.loads((run / "config.json").read_text())
    assert repaired["config"] == {**original["config"], "epochs": 4} and repaired["method"] == original["method"]
    assert "config-repaired" in _events(run)
    assert invoke("report", run).exit_code == 0


# --------------------------------------------------------------------------- --eval-every, declared once
def test_eval_every_evaluates_every_n_epochs_and_the_last(mnist_dir, tmp_path):
    run = tmp_path / "run"
    result = invoke(*_args(mnist_dir, run, "--eval-every", 2, epochs=5))
    assert result.exit_code == 0, result.output
    records = RunFolder(run).read_metrics()
    assert [r["epoch"] for r in records if "test_robust_acc" in r] == [2, 4, 5]
    best = ckpt.load_checkpoint(run / "best.pt")["epoch"]
    assert best in (2, 4, 5)
    report = invoke("report", run, "--format", "json")
    assert report.exit_code == 0, report.output
    assert invoke("plot", run, "--output", tmp_path / "p.png").exit_code == 0


def test_every_declared_setting_is_an_option_a_file_key_and_validated():
    """The declaration is the only list: options, files, overrides and validation come from it."""
    from at_memorization.cli import train_command

    options = {p.name for p in train_command.params}
    assert {s.name for s in RUN_SETTINGS} <= options
    defaults = RunConfig()
    for setting in RUN_SETTINGS:
        assert getattr(defaults, setting.name) == setting.default
        if setting.overridable:
            with pytest.raises(SettingError, match=setting.flag):
                # a value of the wrong type is refused, whatever the setting
                setting.coerce({"wrong": "type"})
    from at_memorization.data import DATASETS

    assert set(SETTINGS_BY_NAME["dataset"].choices) == set(DATASETS)


def test_run_config_fields_are_typed_as_their_settings():
    """What a type checker reads of RunConfig (``config.eps`` is a float): each field's type is its
    setting's (``| None`` where the default is None), and its metadata is the Setting RUN_SETTINGS holds."""
    hints = typing.get_type_hints(RunConfig)
    assert hints["eps"] is float and hints["milestones"] == list[int] | None
    run_fields = dataclasses.fields(RunConfig)
    assert [f.name for f in run_fields] == [s.name for s in RUN_SETTINGS] + ["method_args"]
    for run_field, declared in zip(run_fields, RUN_SETTINGS):
        value_type = list[int] if declared.type is list else declared.type
        assert hints[declared.name] == (value_type | None if declared.default is None else value_type), declared.name
        assert run_field.metadata["setting"] is declared
    assert hints["method_args"] == dict[str, typing.Any]


def test_a_declared_list_default_is_a_fresh_list_per_config():
    from at_memorization.settings import setting

    @dataclasses.dataclass
    class Config:
        milestones: list[int] = setting(list, [100, 150], "Epochs.")

    first, second = Config(), Config()
    first.milestones.append(175)
    assert second.milestones == [100, 150] == dataclasses.fields(Config)[0].metadata["setting"].default


# --------------------------------------------------------------------------- review mends
def test_an_override_of_momentum_and_weight_decay_reaches_the_optimizer(finished_run, tmp_path):
    # Before: the optimizer's saved param groups won over the override (recorded, never applied).
    from at_memorization.training import Trainer, resume_config

    run = _copy(finished_run, tmp_path)
    overrides = {"epochs": 4, "momentum": 0.5, "weight_decay": 0.0}
    config, _ = resume_config(run, overrides)
    trainer = Trainer(config, run, resume=True, overrides=overrides, device="cpu")
    try:
        assert all(g["momentum"] == 0.5 and g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups)
    finally:
        trainer.close()


def test_out_and_device_in_a_config_file_yield_to_the_command_line(mnist_dir, tmp_path):
    # The file's device does not exist on any machine: had it won, the run would have failed.
    path = tmp_path / "run.toml"
    path.write_text(f'out = "{tmp_path / "from-file"}"\ndevice = "cuda:99"\n')
    result = invoke("train", "--config", path, *tiny_train_args(mnist_dir, tmp_path / "given", device="cpu"))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "from-file").exists()
    assert json.loads((tmp_path / "given" / "config.json").read_text())["device"] == "cpu"
    assert (tmp_path / "given" / "last.pt").is_file()


@pytest.mark.parametrize("args", [["--eps", "1e400"], ["--lr", "1" + "0" * 400]])
def test_overflowing_numbers_are_one_line_errors(args, tmp_path):
    assert_one_line_error(invoke("train", *args, "--out", tmp_path / "r", "--print-config"), args[0])


def test_a_finished_run_resumed_from_python_records_nothing(finished_run, tmp_path):
    from at_memorization.training import Trainer, resume_config

    run = _copy(finished_run, tmp_path)
    config, _ = resume_config(run)
    Trainer(config, run, resume=True, device="cpu").fit()
    assert _events(run) == []


def test_evaluating_a_run_folder_whose_results_cannot_be_written_fails_before_any_attack(finished_run, tmp_path):
    # Before: a traceback (WriteError) after minutes of attacks. RUN/eval is a file here: unwritable
    # for root too.
    run = _copy(finished_run, tmp_path)
    (run / "eval").write_text("not a folder")
    assert_one_line_error(invoke("evaluate", run, "--attack", "clean", "--n-examples", 4), "the results folder",
                          "is a file, not a folder")
