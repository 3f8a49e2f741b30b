"""Corrupt, truncated or inconsistent data files: one-line DataErrors that name the file and the problem.

The corrupt files are built in tmp_path from the real ones (the fixtures skip when they are absent);
the intact files of a split are symlinked.
"""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
from cli_testing import one_line, tiny_train_args
import torch
from click.testing import CliRunner

from at_memorization.cli import main
from at_memorization.data import DataError, load_data, load_split

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def mnist_copy(mnist_dir, folder, **replace):
    """``folder`` with the four MNIST files linked from ``mnist_dir``; ``replace`` maps a name to new bytes
    (or to the name of another real file to link in its place)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        content = replace.get(name, name)
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).symlink_to(mnist_dir / content)
    return folder


def idx_gz(array: np.ndarray) -> bytes:
    """A gzip-compressed idx file of unsigned bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.tobytes())


def real_labels(mnist_dir, name) -> np.ndarray:
    return np.frombuffer(gzip.decompress((mnist_dir / name).read_bytes()), dtype=np.uint8, offset=8).copy()


def data_error(call, *words) -> str:
    """``call()`` raises a DataError whose message is one line and holds every word."""
    return one_line(call, DataError, *words)


# --------------------------------------------------------------------------- idx .gz files
def test_truncated_gz_names_the_file(mnist_dir, tmp_path):
    whole = (mnist_dir / TRAIN_IMAGES).read_bytes()
    folder = mnist_copy(mnist_dir, tmp_path, **{TRAIN_IMAGES: whole[: len(whole) // 2]})
    data_error(lambda: load_split("mnist", folder, train=True, size=64, download=False),
               folder / TRAIN_IMAGES, "truncated or corrupt gzip file", "EOFError")


def test_garbage_bytes_named_gz(mnist_dir, tmp_path):
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    folder = mnist_copy(mnist_dir, tmp_path, **{TEST_LABELS: garbage})
    data_error(lambda: load_split("mnist", folder, train=False, download=False),
               folder / TEST_LABELS, "not a valid gzip file")


def test_damaged_compressed_data(mnist_dir, tmp_path):
    damaged = bytearray((mnist_dir / TEST_IMAGES).read_bytes())
    damaged[2000:2400] = bytes(400)  # zeros in the middle of the deflate stream
    folder = mnist_copy(mnist_dir, tmp_path, **{TEST_IMAGES: bytes(damaged)})
    data_error(lambda: load_split("mnist", folder, train=False, download=False), folder / TEST_IMAGES, "gzip file")


@pytest.mark.parametrize("content, words", [
    (b"PK\x03\x04 a zip file, not idx", ["not an idx file", "magic 50 4b 03 04"]),
    (b"", ["not an idx file", "decompresses to nothing"]),
    (b"\x00\x00", ["not an idx file"]),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 2]) + bytes(8), ["idx file of floats", "expected unsigned bytes"]),
    (bytes([0, 0, 8, 3, 0, 0]), ["truncated idx header"]),
], ids=["zip-magic", "empty", "two-bytes", "floats", "short-header"])
def test_bad_idx_header(mnist_dir, tmp_path, content, words):
    folder = mnist_copy(mnist_dir, tmp_path, **{TEST_IMAGES: gzip.compress(content)})
    data_error(lambda: load_split("mnist", folder, train=False, download=False), folder / TEST_IMAGES, *words)


def test_images_file_where_labels_belong(mnist_dir, tmp_path):
    folder = mnist_copy(mnist_dir, tmp_path, **{TEST_LABELS: TEST_IMAGES})
    data_error(lambda: load_split("mnist", folder, train=False, size=10, download=False),
               folder / TEST_LABELS, "idx file has 3 dimensions, expected 1")


@pytest.mark.parametrize("extra", [-1234, 7], ids=["short", "long"])
def test_idx_data_length_differs_from_header(mnist_dir, tmp_path, extra):
    raw = gzip.decompress((mnist_dir / TRAIN_IMAGES).read_bytes())
    data = raw[16: 16 + 1234] if extra < 0 else raw[16:] + bytes(extra)
    folder = mnist_copy(mnist_dir, tmp_path, **{TRAIN_IMAGES: gzip.compress(raw[:16] + data)})
    data_error(lambda: load_split("mnist", folder, train=True, size=64, download=False),
               folder / TRAIN_IMAGES, f"idx header says 60000x28x28 but the file holds {len(data)} bytes of data")


# --------------------------------------------------------------------------- images and labels disagree
def test_count_mismatch_even_with_a_subset(mnist_dir, tmp_path):
    folder = mnist_copy(mnist_dir, tmp_path, **{TRAIN_LABELS: TEST_LABELS})  # 10000 labels for 60000 images
    data_error(lambda: load_split("mnist", folder, train=True, size=64, download=False),
               folder / TRAIN_IMAGES, "60000 images", folder / TRAIN_LABELS, "10000 labels")
    data_error(lambda: load_data("mnist", folder, train_size=64, test_size=16, download=False), "10000 labels")


@pytest.mark.parametrize("value", [10, 255])
def test_label_out_of_range(mnist_dir, tmp_path, value):
    labels = real_labels(mnist_dir, TEST_LABELS)
    labels[5] = value  # past the subset below: still an error
    folder = mnist_copy(mnist_dir, tmp_path, **{TEST_LABELS: idx_gz(labels)})
    data_error(lambda: load_split("mnist", folder, train=False, size=3, download=False),
               folder / TEST_LABELS, f"label {value} (at index 5) is outside [0, 10)", "10 classes")


def test_fashion_mnist_truncated_labels(fashion_mnist_dir, tmp_path):
    whole = (fashion_mnist_dir / TRAIN_LABELS).read_bytes()
    folder = mnist_copy(fashion_mnist_dir, tmp_path, **{TRAIN_LABELS: whole[:-100]})
    data_error(lambda: load_split("fashion-mnist", folder, train=True, size=10, download=False),
               folder / TRAIN_LABELS, "truncated or corrupt gzip file")


# --------------------------------------------------------------------------- image folders
def image_folder(root, size=(32, 32)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:04d}.jpg", quality=90)
    return root


def test_intact_image_folder_loads(tmp_path):
    train = load_split("imagefolder", image_folder(tmp_path), train=True, download=False)
    assert train.images.shape == (6, 3, 32, 32) and train.labels.tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("damage, reason", [("garbage", "not an image format"), ("truncated", "truncated"),
                                            ("empty", "empty file")])
def test_corrupt_jpeg_in_image_folder(tmp_path, damage, reason):
    root = image_folder(tmp_path)
    bad = root / "train" / "dog" / "0001.jpg"
    whole = bad.read_bytes()
    bad.write_bytes({"garbage": b"\x00not a jpeg" * 50, "truncated": whole[: len(whole) // 2], "empty": b""}[damage])
    data_error(lambda: load_split("imagefolder", root, train=True, download=False), bad, "cannot decode image", reason)
    data_error(lambda: load_data("imagefolder", root, download=False), bad, "cannot decode image", reason)


def test_corrupt_jpeg_of_the_real_cifar_folder(cifar_jpg_dir, tmp_path):
    import shutil

    root = tmp_path / "cifar"
    shutil.copytree(cifar_jpg_dir / "test", root / "test")
    bad = root / "test" / "cat" / "0000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    data_error(lambda: load_split("imagefolder", root, train=False, size=50, download=False),
               bad, "cannot decode image")


def test_image_of_another_size_is_named(tmp_path):
    from PIL import Image

    root = image_folder(tmp_path)
    odd = root / "test" / "cat" / "0002.jpg"
    Image.new("RGB", (40, 30)).save(odd)
    data_error(lambda: load_split("imagefolder", root, train=False, download=False), odd, "40x30", "32x32")


# --------------------------------------------------------------------------- CIFAR and SVHN files
def test_cifar_file_failing_its_md5_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(b"half a download")
    data_error(lambda: load_split("cifar10", tmp_path, train=True, download=False),
               folder / "data_batch_1", "corrupted or incomplete (md5 check failed)")


def fake_cifar10(tmp_path, monkeypatch, batch=None, n=4):
    """CIFAR-10 files whose md5 check is skipped; ``batch`` replaces data_batch_3's content."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    if batch is not None:
        (folder / "data_batch_3").write_bytes(batch)
    return folder


def test_fake_cifar10_loads(tmp_path, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch)
    assert load_split("cifar10", tmp_path, train=True, download=False).images.shape == (20, 3, 32, 32)


@pytest.mark.parametrize("batch, words", [
    (b"garbage, not a pickle", ["not a readable CIFAR batch"]),
    (pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2]}), ["4 images but 3 labels"]),
    (pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 12, 2]}),
     ["label 12 (at index 2) is outside [0, 10)"]),
    (pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0, 1, 2, 3]}), ["rows of 3072 bytes"]),
    # a global other than NumPy's array reconstruction is refused, not imported or called
    (pickle.dumps({"data": __import__("collections").OrderedDict(), "labels": [0]}),
     ["not a readable CIFAR batch", "refused: collections.OrderedDict"]),
], ids=["not-a-pickle", "count-mismatch", "label-out-of-range", "wrong-row-size", "foreign-global"])
def test_unreadable_cifar_batch_is_named(tmp_path, monkeypatch, batch, words):
    folder = fake_cifar10(tmp_path, monkeypatch, batch)
    data_error(lambda: load_split("cifar10", tmp_path, train=True, size=2, download=False),
               folder / "data_batch_3", *words)


@pytest.fixture
def svhn_unchecked(monkeypatch):
    pytest.importorskip("scipy.io", reason="scipy is needed to read SVHN's .mat files")
    from torchvision.datasets import SVHN

    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)


def test_svhn_garbage_mat_file(tmp_path, svhn_unchecked):
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, but then garbage" * 3)
    data_error(lambda: load_split("svhn", tmp_path, train=False, download=False), path, "SVHN")


@pytest.mark.parametrize("variables, words", [
    ({"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.full((5, 1), 3, np.uint8)}, None),
    ({"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.array([[1], [2], [11], [4], [5]], np.uint8)},
     ["label 11 (at index 2) is outside [0, 10)"]),
    ({"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.full((4, 1), 3, np.uint8)}, ["5 images (X) but 4 labels (y)"]),
    ({"X": np.zeros((32, 32, 3, 5), np.uint8)}, ["no variable 'y'"]),
    ({"X": np.zeros((28, 28, 1, 5), np.uint8), "y": np.full((5, 1), 3, np.uint8)}, ["28x28x1x5"]),
], ids=["intact", "label-out-of-range", "count-mismatch", "no-y", "wrong-image-size"])
def test_svhn_inconsistent_mat_file(tmp_path, svhn_unchecked, variables, words):
    import scipy.io

    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, variables)
    if words is None:  # the intact file loads
        assert load_split("svhn", tmp_path, train=True, size=2, download=False).labels.tolist() == [3, 3]
    else:
        data_error(lambda: load_split("svhn", tmp_path, train=True, size=2, download=False), path, *words)


# --------------------------------------------------------------------------- the command line
def train_args(data_dir, out, dataset="mnist"):
    return ["train", *tiny_train_args(data_dir, out, dataset=dataset)]


def assert_cli_data_error(data_dir, out, *words, dataset="mnist"):
    result = CliRunner().invoke(main, train_args(data_dir, out, dataset), catch_exceptions=True)
    output = result.output
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output and "Aborted!" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    for word in words:
        assert str(word) in errors[0], (word, errors[0])
    assert not out.exists(), "the run folder was created before the data loaded"


def test_cli_truncated_gz_is_one_line_not_aborted(mnist_dir, tmp_path):
    whole = (mnist_dir / TRAIN_IMAGES).read_bytes()
    data_dir = mnist_copy(mnist_dir, tmp_path / "data", **{TRAIN_IMAGES: whole[: len(whole) // 2]})
    assert_cli_data_error(data_dir, tmp_path / "run", data_dir / TRAIN_IMAGES, "truncated or corrupt gzip file")


def test_cli_label_out_of_range_past_the_subset(mnist_dir, tmp_path):
    labels = real_labels(mnist_dir, TRAIN_LABELS)
    labels[100] = 255  # beyond --train-size 64
    data_dir = mnist_copy(mnist_dir, tmp_path / "data", **{TRAIN_LABELS: idx_gz(labels)})
    assert_cli_data_error(data_dir, tmp_path / "run", data_dir / TRAIN_LABELS, "label 255", "[0, 10)")


def test_cli_count_mismatch_with_train_size(mnist_dir, tmp_path):
    data_dir = mnist_copy(mnist_dir, tmp_path / "data", **{TRAIN_LABELS: TEST_LABELS})
    assert_cli_data_error(data_dir, tmp_path / "run", data_dir / TRAIN_IMAGES, data_dir / TRAIN_LABELS,
                          "60000 images", "10000 labels")


def test_cli_corrupt_jpeg(tmp_path):
    root = image_folder(tmp_path / "data")
    bad = root / "test" / "cat" / "0000.jpg"
    bad.write_bytes(b"garbage")
    assert_cli_data_error(root, tmp_path / "run", bad, "cannot decode image", dataset="imagefolder")


def test_train_and_test_images_of_different_sizes(tmp_path):
    import shutil

    root = image_folder(tmp_path / "a")
    other = image_folder(tmp_path / "b", size=(28, 28))
    shutil.rmtree(root / "test")
    shutil.copytree(other / "test", root / "test")
    data_error(lambda: load_data("imagefolder", root, download=False), root, "3x32x32", "3x28x28")
    assert torch.equal(load_split("imagefolder", root, train=False, download=False).labels,
                       torch.tensor([0, 1, 0, 1, 0, 1]))


class _FailingDownload:
    """torchvision's MNIST as it behaves offline: it creates ``ROOT/MNIST/raw``, then the download fails."""

    def __init__(self, root, train=True, download=False):
        from pathlib import Path

        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    # Issue 33, item 7 (and issue 32): a refused resume with a mistyped --data-dir created that folder
    # (empty MNIST/raw folders in the user's data directory).
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", _FailingDownload)
    mistyped = tmp_path / "typo" / "data"
    one_line(lambda: load_split("mnist", mistyped, train=True), DataError, str(mistyped), "download failed")
    assert not (tmp_path / "typo").exists()
    # a folder that was there stays, with what it held; only the new, empty ones go
    existing = tmp_path / "data"
    (existing / "notes").mkdir(parents=True)
    one_line(lambda: load_split("mnist", existing, train=True), DataError, "download failed")
    assert sorted(p.name for p in existing.iterdir()) == ["notes"]


_STOPPED_DOWNLOAD = """\
import os, signal, sys, time
from pathlib import Path
import torchvision.datasets

class StoppedDownload:  # a SIGTERM (a scheduler's preemption) while torchvision downloads
    def __init__(self, root, train=True, download=False):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise RuntimeError("the download went on after the signal")

torchvision.datasets.MNIST = StoppedDownload
from at_memorization.cli import main
main(sys.argv[1:])
"""


def test_a_signal_during_the_download_stops_the_run_cleanly(tmp_path):
    # Issue 29: the download's error handling caught the stop and exited 1 with a download error.
    import subprocess
    import sys

    from cli_testing import subprocess_env

    driver = tmp_path / "driver.py"
    driver.write_text(_STOPPED_DOWNLOAD)
    data = tmp_path / "new-data"
    result = subprocess.run([sys.executable, str(driver), "train", *tiny_train_args(data, tmp_path / "run")],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 128 + 15, result.stdout + result.stderr
    assert "stopped by SIGTERM before training started; nothing was saved" in result.stderr, result.stderr
    assert "download failed" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not data.exists() and not (tmp_path / "run").exists()
