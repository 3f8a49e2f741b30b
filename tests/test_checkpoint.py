"""Checkpoints: atomic writes, safe loading, and one clear reason for every file we refuse."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from at_memorization import checkpoint as ckpt
from at_memorization.checkpoint import CheckpointError, load_checkpoint, save_atomic


class _Custom:
    """A class that only a full (unsafe) unpickler could rebuild."""

    def __init__(self):
        self.weights = torch.ones(2)


def _minimal_checkpoint(**extra) -> dict:
    from at_memorization.models import build_model

    model = build_model("smallcnn", 10, 1, 28)
    state = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "model": model.state_dict(),
             "model_name": "smallcnn", "num_classes": 10, "in_chans": 1, "img_size": 28, "dataset": "mnist",
             "epoch": 3, "config": {"eps": 0.1, "milestones": [1, 2]}, "history": [{"epoch": 1, "lr": 0.1}]}
    state.update(extra)
    return state


def _temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_save_atomic_writes_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "last.pt"
    save_atomic({"a": torch.arange(3), "b": 1.5}, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == 1.5
    assert _temp_files(path.parent) == []


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"version": 1}, path)
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.write(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a write

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert _temp_files(tmp_path) == []


def test_real_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "ok.pt"
    save_atomic(_minimal_checkpoint(), path)
    raw = torch.load(path, weights_only=True)  # the format itself is weights_only-safe
    assert raw["model_name"] == "smallcnn"
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["config"]["milestones"] == [1, 2]
    model = ckpt.build_model_from_checkpoint(loaded)
    assert not model.training
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "no such checkpoint file" in _refusal(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"garbage bytes, not a checkpoint" * 10, b"", b"PK\x03\x04truncated zip"])
def test_garbage_is_unreadable(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    message = _refusal(path)
    assert "unreadable" in message
    assert "arbitrary" not in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_unreadable_not_arbitrary(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    assert "unreadable" in _refusal(path)


def test_truncated_checkpoint_is_unreadable(tmp_path):
    path = tmp_path / "cut.pt"
    save_atomic(_minimal_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "unreadable" in _refusal(path)


def test_foreign_torch_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert "not an at-memorization checkpoint" in _refusal(path)
    torch.save(torch.zeros(3), path)  # not even a dict
    assert "not an at-memorization checkpoint" in _refusal(path)


@pytest.mark.parametrize("payload", [argparse.Namespace(lr=0.1), _Custom()], ids=["namespace", "custom-class"])
def test_file_needing_arbitrary_unpickling_is_refused(tmp_path, payload):
    path = tmp_path / "unsafe.pt"
    torch.save({"format": ckpt.FORMAT, "args": payload}, path)
    message = _refusal(path)
    assert "arbitrary Python objects" in message
    assert type(payload).__name__ in message  # names the offending class
    assert "unreadable" not in message


def test_wrong_version_and_missing_keys(tmp_path):
    path = tmp_path / "old.pt"
    save_atomic(_minimal_checkpoint(format_version=99), path)
    assert "format version 99" in _refusal(path)
    state = _minimal_checkpoint()
    del state["model_name"]
    save_atomic(state, path)
    assert "model_name" in _refusal(path)
