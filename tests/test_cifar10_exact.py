"""The exact-pixel CIFAR-10 subset as a data set (``--dataset cifar10-exact``): the real file, and
files that are wrong in the ways a user's copy can be."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from subprocess_guard import run_with_hang_guard

from at_memorization.data import CIFAR10_EXACT_FILE, DataError, load_data, load_split


def test_the_real_subset_loads_with_its_original_pixels_and_labels(cifar_exact_npz):
    with np.load(cifar_exact_npz) as archive:
        x_train, y_train, x_test, y_test = (archive[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    for folder in (cifar_exact_npz.parent, cifar_exact_npz):  # the folder, or the file itself
        train = load_split("cifar10-exact", folder, train=True)
        test = load_split("cifar10-exact", folder, train=False)
        assert len(train) == len(y_train) == 5169 and len(test) == len(y_test) == 1017
        assert train.images.shape == (5169, 3, 32, 32) and train.images.dtype == torch.uint8
        assert torch.equal(train.images, torch.from_numpy(x_train).permute(0, 3, 1, 2))
        assert torch.equal(test.labels, torch.from_numpy(y_test.astype(np.int64)))
        assert train.num_classes == 10 and train.classes[0] == "airplane"
    bundle = load_data("cifar10-exact", cifar_exact_npz.parent, train_size=500, test_size=100, seed=0)
    assert len(bundle.train) == 500 and len(bundle.test) == 100
    assert bundle.info.augmentation == "crop-flip" and bundle.info.in_chans == 3
    assert torch.equal(bundle.train.labels, torch.from_numpy(y_train[:500].astype(np.int64)))


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_a_missing_file_says_it_cannot_be_downloaded(tmp_path):
    with pytest.raises(DataError, match=f"{CIFAR10_EXACT_FILE} not found.*cannot be downloaded"):
        load_split("cifar10-exact", tmp_path, train=True)


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((4, 32, 32, 3), np.float32), y_train=np.zeros(4, np.int64)), "expected uint8"),
    (dict(x_train=np.zeros((4, 3, 32, 32), np.uint8), y_train=np.zeros(4, np.int64)), r"expected uint8 \(N, 32, 32, 3\)"),
    (dict(x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.zeros(3, np.int64)), "4 images but y_train holds 3"),
    (dict(x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.array([0, 1, 2, 10])), "10"),
    (dict(y_train=np.zeros(4, np.int64)), "not a readable exact CIFAR-10 subset"),
])
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, arrays, message):
    path = _write(tmp_path / CIFAR10_EXACT_FILE, **arrays)
    with pytest.raises(DataError, match=message) as caught:
        load_split("cifar10-exact", tmp_path, train=True)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_that_is_not_an_npz_is_a_data_error(tmp_path):
    (tmp_path / CIFAR10_EXACT_FILE).write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match="not a readable exact CIFAR-10 subset"):
        load_split("cifar10-exact", tmp_path, train=False)


def test_the_cli_reports_a_missing_subset_in_one_line(tmp_path):
    done = run_with_hang_guard([sys.executable, "-m", "at_memorization", "train", "--dataset", "cifar10-exact",
                                "--data-dir", str(tmp_path), "--epochs", "1", "--device", "cpu", "--out",
                                str(tmp_path / "run")])
    assert done.returncode == 1
    assert done.stderr.strip().startswith("Error:") and "cannot be downloaded" in done.stderr
    assert "Traceback" not in done.stderr
