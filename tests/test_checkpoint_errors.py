"""Malformed but loadable files: real checkpoints (a tiny MNIST run), corrupted by hand, give one-line
CheckpointErrors naming the file, from the library and from `at-mem evaluate` (no traceback)."""

from __future__ import annotations

import shutil

import pytest
import torch

from at_memorization import checkpoint as ckpt
from at_memorization.checkpoint import CheckpointError, load_checkpoint

EPOCHS, TRAIN_SIZE = 1, 64


from cli_testing import assert_one_line_error, invoke, one_line, tiny_train_args


def refusal(call, *words) -> str:
    """The one-line CheckpointError message of ``call()``, holding every word."""
    return one_line(call, CheckpointError, *words)


@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """A finished one-epoch pgd-at-te run with --track-samples (last.pt, best.pt, tracking.pt)."""
    out = tmp_path_factory.mktemp("ckpt-errors") / "run"
    result = invoke("train", *tiny_train_args(mnist_dir, out, method="pgd-at-te", epochs=EPOCHS, train_size=TRAIN_SIZE,
                                              track_samples=True))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the trained run, free to corrupt."""
    return shutil.copytree(trained_run, tmp_path / "run")


def corrupt(path, change):
    """torch.load the file, let ``change`` modify the object in place, torch.save it back."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    return path


def first_weight(state) -> str:
    return next(k for k, v in state["model"].items() if v.is_floating_point() and v.dim() == 4)


def wrong_shape(state):
    key = first_weight(state)
    state["model"][key] = torch.zeros(8, *state["model"][key].shape[1:])


def renamed_key(state):
    key = first_weight(state)
    state["model"][key.replace("weight", "kernel")] = state["model"].pop(key)


def nan_weight(state):
    state["model"][first_weight(state)].view(-1)[3] = float("nan")


def expected_shape(run) -> list:
    state = torch.load(run / "last.pt", weights_only=True)
    return list(state["model"][first_weight(state)].shape)


# --------------------------------------------------------------------------- weights that do not fit
def test_wrong_weight_shape(run):
    shape = expected_shape(run)
    path = corrupt(run / "last.pt", wrong_shape)
    state = load_checkpoint(path)
    message = refusal(lambda: ckpt.build_model_from_checkpoint(state, path), str(path), "model weights do not fit smallcnn",
                      f"has shape {[8, *shape[1:]]}, the model expects {shape}")
    assert message.startswith(f"{path}: ")
    # Without a path, a checkpoint dict of unknown origin says "checkpoint".
    assert refusal(lambda: ckpt.build_model_from_checkpoint(state), "do not fit").startswith("checkpoint: ")


def test_renamed_weight_key(run):
    path = corrupt(run / "last.pt", renamed_key)
    state = load_checkpoint(path)
    key = first_weight(torch.load(run / "best.pt", weights_only=True))
    refusal(lambda: ckpt.build_model_from_checkpoint(state, path), str(path), "model weights do not fit smallcnn",
            f"missing key {key!r}", f"unexpected key {key.replace('weight', 'kernel')!r}")


def test_load_weights_into_gives_one_line_errors(run):
    from at_memorization.models import build_model

    good = torch.load(run / "last.pt", weights_only=True)["model"]
    model = build_model("smallcnn", 10, 1, 28)
    assert ckpt.load_weights_into(model, good, run / "last.pt") is model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())
    bad = dict(good)
    bad.pop(first_weight({"model": good}))
    refusal(lambda: ckpt.load_weights_into(model, bad, "last.pt", what="resumed model"),
            "last.pt: resumed model weights do not fit", "missing key")
    refusal(lambda: ckpt.load_weights_into(model, [1, 2], "last.pt"), "not a state dict")


def test_nan_weight(run):
    path = corrupt(run / "last.pt", nan_weight)
    state = load_checkpoint(path)
    key = first_weight(state)
    refusal(lambda: ckpt.check_finite_weights(state, path), str(path), "not finite", key, "1 NaN or inf value")
    refusal(lambda: ckpt.check_finite_weights(state["model"], path), key)  # a bare state dict works too
    refusal(lambda: ckpt.build_model_from_checkpoint(state, path), str(path), "not finite", key)
    ckpt.check_finite_weights(load_checkpoint(run / "best.pt"), run / "best.pt")  # finite: no error


# --------------------------------------------------------------------------- entries of the wrong type
@pytest.mark.parametrize("key, value, words", [
    ("num_classes", "10", ["'num_classes' must be a positive int", "str '10'"]),
    ("num_classes", 10.0, ["'num_classes' must be a positive int", "float 10.0"]),
    ("num_classes", True, ["'num_classes' must be a positive int", "bool"]),
    ("num_classes", 0, ["'num_classes' must be a positive int", "int 0"]),
    ("in_chans", 1.5, ["'in_chans' must be a positive int"]),
    ("img_size", "28", ["'img_size' must be a positive int"]),
    ("model_name", 7, ["'model_name' must be a non-empty str", "int 7"]),
    ("epoch", "1", ["'epoch' must be a non-negative int"]),
    ("config", ["eps", 0.3], ["'config' must be a dict", "list"]),
    ("model", [1, 2], ["'model' must be a dict of tensors", "list"]),
    ("method", "pgd-at-te", ["'method' must be a dict"]),
])
def test_entries_of_the_wrong_type(run, key, value, words):
    path = corrupt(run / "last.pt", lambda state: state.__setitem__(key, value))
    refusal(lambda: load_checkpoint(path), str(path), *words)


def test_model_entry_with_a_non_tensor(run):
    path = corrupt(run / "last.pt", lambda state: state["model"].__setitem__(first_weight(state), [0.0] * 9))
    refusal(lambda: load_checkpoint(path), str(path), "'model' must be a dict of tensors", "is a list")


# --------------------------------------------------------------------------- at-mem evaluate
@pytest.mark.parametrize("change, words", [
    (wrong_shape, ["model weights do not fit smallcnn", "the model expects"]),
    (renamed_key, ["model weights do not fit smallcnn", "missing key"]),
    (nan_weight, ["model weights are not finite"]),
    (lambda state: state.__setitem__("num_classes", "10"), ["'num_classes' must be a positive int"]),
    (lambda state: state.__setitem__("num_classes", 10.0), ["'num_classes' must be a positive int"]),
], ids=["wrong-shape", "renamed-key", "nan-weight", "num-classes-str", "num-classes-float"])
def test_evaluate_refuses_with_one_line(run, change, words):
    path = corrupt(run / "last.pt", change)
    result = invoke("evaluate", path, "--attack", "clean", "--n-examples", 16, "--device", "cpu")
    assert_one_line_error(result, f"Error: {path}: ", *words)


# --------------------------------------------------------------------------- tracking.pt
def test_truncated_tracking_file(run):
    path = run / "tracking.pt"
    assert set(ckpt.load_tracking(path, EPOCHS, TRAIN_SIZE)) >= {"adv_correct", "adv_loss"}  # intact: loads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refusal(lambda: ckpt.load_tracking(path, EPOCHS, TRAIN_SIZE), str(path), "unreadable tracking file")
    path.write_bytes(b"")
    refusal(lambda: ckpt.load_tracking(path, EPOCHS, TRAIN_SIZE), str(path), "unreadable tracking file")
    refusal(lambda: ckpt.load_tracking(run / "nope.pt", EPOCHS, TRAIN_SIZE), "no such tracking file")


def test_tracking_file_of_the_wrong_shape(run):
    path = run / "tracking.pt"

    def rewrite(**entries):
        torch.save({"adv_correct": torch.zeros(EPOCHS, TRAIN_SIZE, dtype=torch.uint8),
                    "adv_loss": torch.zeros(EPOCHS, TRAIN_SIZE, dtype=torch.float16), **entries}, path)
        return lambda: ckpt.load_tracking(path, EPOCHS, TRAIN_SIZE)

    refusal(rewrite(adv_correct=torch.zeros(EPOCHS, TRAIN_SIZE + 1, dtype=torch.uint8)), str(path),
            "'adv_correct' has shape [1, 65], expected [1, 64]")
    refusal(rewrite(adv_loss=torch.zeros(EPOCHS + 1, TRAIN_SIZE, dtype=torch.float16)), "'adv_loss' has shape [2, 64]")
    refusal(rewrite(adv_loss=torch.zeros(EPOCHS, TRAIN_SIZE)), "'adv_loss' is torch.float32, expected torch.float16")
    refusal(rewrite(recorded=torch.ones(EPOCHS + 1, dtype=torch.uint8)), "'recorded' has shape [2], expected [1]")
    refusal(rewrite(extra=torch.zeros(1)), "unexpected entry 'extra'")
    torch.save({"adv_correct": torch.zeros(EPOCHS, TRAIN_SIZE, dtype=torch.uint8)}, path)
    refusal(lambda: ckpt.load_tracking(path, EPOCHS, TRAIN_SIZE), "lacks 'adv_loss'")
    torch.save([1, 2], path)
    refusal(lambda: ckpt.load_tracking(path, EPOCHS, TRAIN_SIZE), "not a tracking file")
    # the optional "recorded" flags (uint8, one per epoch) are accepted
    loaded = rewrite(recorded=torch.ones(EPOCHS, dtype=torch.uint8))()
    assert loaded["recorded"].tolist() == [1] and loaded["adv_correct"].shape == (EPOCHS, TRAIN_SIZE)


# --------------------------------------------------------------------------- TE state on resume
def test_te_ensemble_of_the_wrong_size(run, mnist_dir):
    from at_memorization.methods import MethodError, TrainingSetup, get_method

    state = torch.load(run / "last.pt", weights_only=True)["method"]["state"]
    ensemble = state["te"]["ensemble"]
    assert ensemble.shape == (TRAIN_SIZE, 10)
    method = get_method("pgd-at-te")(TrainingSetup(num_samples=TRAIN_SIZE, num_classes=10, epochs=EPOCHS))
    method.load_state_dict(state)  # the run's own state fits
    bigger = {"te": {**state["te"], "ensemble": torch.zeros(TRAIN_SIZE + 1, 10)}}
    with pytest.raises(MethodError) as info:
        method.load_state_dict(bigger)
    assert "\n" not in str(info.value)
    assert f"ensemble has shape [{TRAIN_SIZE + 1}, 10], this TELoss expects [{TRAIN_SIZE}, 10]" in str(info.value)
    # The same through `at-mem train --resume` on the corrupted run: one line, no traceback.
    corrupt(run / "last.pt", lambda s: s["method"]["state"].update(bigger))
    (run / "last-prev.pt").unlink(missing_ok=True)
    result = invoke("train", *tiny_train_args(mnist_dir, run, "--resume", method="pgd-at-te", epochs=EPOCHS,
                                              train_size=TRAIN_SIZE, track_samples=True))
    assert_one_line_error(result, "TE state", f"ensemble has shape [{TRAIN_SIZE + 1}, 10]")
