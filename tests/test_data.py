"""Data: real MNIST/Fashion-MNIST/CIFAR-10-JPEG loading, fake CIFAR-100/SVHN, randomization tests,
batching and augmentation."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from at_memorization import data as D
from at_memorization.data import DataError, corrupt_inputs, corrupt_labels, crop_flip, epoch_batches, load_data, load_split

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST
def test_mnist_from_the_shared_folder(mnist_dir):
    train = load_split("mnist", mnist_dir, train=True, size=100, download=False)
    assert train.images.shape == (100, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # MNIST's first training labels
    assert train.num_classes == 10 and train.shape == (1, 28, 28)
    image, label, index = train[7]
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert (label, index) == (3, 7)
    test = load_split("mnist", mnist_dir, train=False, download=False)
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_first_n_subsets_are_prefixes(mnist_dir):
    small = load_split("mnist", mnist_dir, train=False, size=50, download=False)
    larger = load_split("mnist", mnist_dir, train=False, size=80, download=False)
    assert torch.equal(small.images, larger.images[:50]) and torch.equal(small.labels, larger.labels[:50])
    with pytest.raises(DataError, match="size must be positive"):
        load_split("mnist", mnist_dir, train=False, size=0, download=False)


def test_mnist_in_torchvision_layout(mnist_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).symlink_to(mnist_dir / name)
    test = load_split("mnist", tmp_path, train=False, size=5, download=False)
    assert test.labels.tolist() == [7, 2, 1, 0, 4]


def test_fashion_mnist(fashion_mnist_dir):
    train = load_split("fashion-mnist", fashion_mnist_dir, train=True, size=10, download=False)
    assert train.images.shape == (10, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert train.classes[9] == "Ankle boot"


def test_load_data_bundle_with_label_noise(mnist_dir):
    bundle = load_data("mnist", mnist_dir, train_size=300, test_size=40, label_noise=1.0, seed=3, download=False)
    assert len(bundle.train) == 300 and len(bundle.test) == 40
    assert bundle.info.name == "mnist"
    clean = load_split("mnist", mnist_dir, train=True, size=300, download=False).labels
    assert torch.equal(bundle.clean_train_labels, clean)
    assert (bundle.train.labels != clean).float().mean() > 0.8  # ~0.9 of random labels differ
    again = load_data("mnist", mnist_dir, train_size=300, test_size=40, label_noise=1.0, seed=3, download=False)
    assert torch.equal(again.train.labels, bundle.train.labels)


# --------------------------------------------------------------------------- image folder
def test_imagefolder_order_is_class_interleaved(cifar_jpg_dir, cifar_exact_npz):
    test = load_split("imagefolder", cifar_jpg_dir, train=False, download=False)
    assert test.classes == CIFAR_CLASSES and test.num_classes == 10
    assert test.images.shape == (200, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels[:20].tolist() == list(range(10)) * 2
    assert torch.bincount(test.labels).tolist() == [20] * 10
    # test/cat/0000.jpg is CIFAR-10 test image 0: JPEG pixels are close to the exact ones.
    exact = np.load(cifar_exact_npz)
    assert int(exact["y_test"][0]) == 3
    reference = torch.from_numpy(exact["x_test"][0]).permute(2, 0, 1).float()
    assert (test.images[3].float() - reference).abs().mean() < 12  # ~5.8/255 on average for the set


def test_imagefolder_labels_agree_with_index_csv(cifar_jpg_dir, cifar_exact_npz):
    index_csv = cifar_exact_npz.parent.parent / "cifar10-jpg" / "index.csv"
    if not index_csv.is_file():
        pytest.skip(f"{index_csv} is absent")
    exact = np.load(cifar_exact_npz)
    with open(index_csv) as handle:
        rows = {r["jpg_path"]: r for r in csv.DictReader(handle) if r["split"] == "test"}
    test = load_split("imagefolder", cifar_jpg_dir, train=False, size=40, download=False)
    for position in range(40):  # item k is the (k // 10)-th image of class k % 10
        cls = CIFAR_CLASSES[position % 10]
        row = rows[f"test/{cls}/{position // 10:04d}.jpg"]
        assert int(row["label"]) == int(test.labels[position]) == position % 10
        original = int(row["original_index"])
        if original < len(exact["y_test"]) and original < exact["x_test"].shape[0]:
            reference = torch.from_numpy(exact["x_test"][original]).permute(2, 0, 1).float()
            assert (test.images[position].float() - reference).abs().mean() < 12


def test_imagefolder_subsets_are_balanced(cifar_jpg_dir):
    train = load_split("imagefolder", cifar_jpg_dir, train=True, size=30, download=False)
    assert train.images.shape == (30, 3, 32, 32)
    assert torch.bincount(train.labels, minlength=10).tolist() == [3] * 10
    full = load_split("imagefolder", cifar_jpg_dir, train=True, download=False)
    assert len(full) == 600 and torch.equal(full.images[:30], train.images)


def test_imagefolder_missing_folder_and_tar_hint(tmp_path):
    with pytest.raises(DataError) as info:
        load_split("imagefolder", tmp_path / "nowhere", train=True)
    assert str(tmp_path / "nowhere" / "train") in str(info.value)
    assert "DIR/train/<class>" in str(info.value)
    (tmp_path / "cifar.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="cifar.tar.gz: unpack it first"):
        load_split("imagefolder", tmp_path, train=False)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_split("imagefolder", tmp_path, train=True)


# --------------------------------------------------------------------------- label noise
def test_corrupt_labels_rate_zero_is_identity():
    labels = torch.randint(0, 10, (1000,))
    assert torch.equal(corrupt_labels(labels, 10, 0.0, seed=1), labels)


def test_corrupt_labels_rate_one_is_uniform():
    labels = torch.zeros(50_000, dtype=torch.int64)
    noisy = corrupt_labels(labels, 10, 1.0, seed=0)
    freq = torch.bincount(noisy, minlength=10).float() / labels.numel()
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.01)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_corrupt_labels_flip_rate(rate):
    num_classes = 10
    labels = torch.arange(100_000) % num_classes
    noisy = corrupt_labels(labels, num_classes, rate, seed=5)
    flip = (noisy != labels).float().mean().item()
    assert flip == pytest.approx(rate * (num_classes - 1) / num_classes, abs=0.01)
    # Off-diagonal mass is spread uniformly over the other classes (row y of P).
    shift = (noisy - labels) % num_classes
    counts = torch.bincount(shift, minlength=num_classes)[1:].float()
    expected = labels.numel() * rate / num_classes
    assert ((counts - expected).abs() / expected).max() < 0.12
    assert noisy.min() >= 0 and noisy.max() < num_classes


def test_corrupt_labels_seeded():
    labels = torch.arange(1000) % 10
    a = corrupt_labels(labels, 10, 0.5, seed=1)
    assert torch.equal(a, corrupt_labels(labels, 10, 0.5, seed=1))
    assert not torch.equal(a, corrupt_labels(labels, 10, 0.5, seed=2))
    state = torch.get_rng_state()
    corrupt_labels(labels, 10, 0.5, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # own generator, global stream untouched


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_corrupt_labels_rejects_rates_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt_labels(torch.zeros(5, dtype=torch.int64), 10, rate, seed=0)


# --------------------------------------------------------------------------- input noise
def _probe_images(n=40, c=3, side=8, seed=0):
    """Random images whose first two carry distinct values per pixel (to read permutations off)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8)
    distinct = torch.arange(side * side, dtype=torch.uint8).view(1, side, side).expand(c, side, side)
    images[0] = distinct
    images[1] = distinct
    return images


def _permutation_of(original, shuffled):
    """The pixel permutation p with shuffled.flat[:, k] == original.flat[:, p[k]] (distinct values)."""
    return shuffled.flatten(1)[0].long()  # original is arange on every channel


def test_shuffled_pixels_use_one_permutation():
    images = _probe_images()
    out = corrupt_inputs(images, "shuffled-pixels", 1.0, seed=0)
    perm = _permutation_of(images[0], out[0])
    assert not torch.equal(perm, torch.arange(64))
    assert torch.equal(_permutation_of(images[1], out[1]), perm)
    n, c = images.shape[:2]
    assert torch.equal(out.view(n, c, -1), images.view(n, c, -1)[:, :, perm])
    # Every image keeps its pixel multiset (per channel); the input is not modified.
    assert torch.equal(out.view(n, c, -1).sort(-1).values, images.view(n, c, -1).sort(-1).values)
    assert torch.equal(images, _probe_images())


def test_random_pixels_use_a_permutation_per_image():
    images = _probe_images()
    out = corrupt_inputs(images, "random-pixels", 1.0, seed=0)
    n, c = images.shape[:2]
    assert torch.equal(out.view(n, c, -1).sort(-1).values, images.view(n, c, -1).sort(-1).values)
    p0, p1 = _permutation_of(images[0], out[0]), _permutation_of(images[1], out[1])
    assert not torch.equal(p0, p1)
    assert sorted(p0.tolist()) == list(range(64))
    # All channels of one image move together.
    assert torch.equal(out[0, 0], out[0, 2])


def test_gaussian_images_match_mean_and_std():
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(500, 3, 16, 16, generator=g) * torch.tensor([100.0, 150.0, 200.0]).view(1, 3, 1, 1)
              + 20).to(torch.uint8)
    out = corrupt_inputs(images, "gaussian", 1.0, seed=0)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    mean_in, mean_out = images.float().mean((0, 2, 3)), out.float().mean((0, 2, 3))
    std_in, std_out = images.float().std((0, 2, 3)), out.float().std((0, 2, 3))
    assert torch.allclose(mean_out, mean_in, atol=2.0)
    assert torch.allclose(std_out, std_in, rtol=0.05)
    # Gaussian, not a rearrangement of the original pixels.
    assert not torch.equal(out.view(500, 3, -1).sort(-1).values, images.view(500, 3, -1).sort(-1).values)


@pytest.mark.parametrize("kind", D.INPUT_NOISE_KINDS)
def test_input_noise_fraction_and_seed(kind):
    images = torch.randint(0, 256, (2000, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = corrupt_inputs(images, kind, 0.3, seed=4)
    changed = (out != images).flatten(1).any(1).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.04)
    assert torch.equal(out, corrupt_inputs(images, kind, 0.3, seed=4))
    assert torch.equal(corrupt_inputs(images, kind, 0.0, seed=4), images)


def test_input_noise_rejects_bad_arguments():
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="unknown input noise"):
        corrupt_inputs(images, "salt", 1.0, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt_inputs(images, "gaussian", 1.5, seed=0)


# --------------------------------------------------------------------------- batching
def _flat(batches):
    return torch.cat(list(batches)).tolist()


def test_epoch_batches_deterministic_and_complete():
    a = list(epoch_batches(103, 16, seed=1, epoch=3))
    assert [len(b) for b in a] == [16] * 6 + [7]
    assert sorted(_flat(a)) == list(range(103))
    assert _flat(a) == _flat(epoch_batches(103, 16, seed=1, epoch=3))
    assert _flat(a) != _flat(epoch_batches(103, 16, seed=1, epoch=4))
    assert _flat(a) != _flat(epoch_batches(103, 16, seed=2, epoch=3))
    assert _flat(epoch_batches(10, 4, seed=0, epoch=1, shuffle=False)) == list(range(10))
    assert D.num_batches(103, 16) == 7


def test_epoch_batches_two_rank_sharding_covers_everything():
    n = 101
    shards = [_flat(epoch_batches(n, 8, seed=0, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51  # padded to equal length, as DistributedSampler
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) <= 1
    assert D.num_batches(n, 8, world_size=2) == len(list(epoch_batches(n, 8, seed=0, epoch=2, rank=0, world_size=2)))


# --------------------------------------------------------------------------- augmentation
def test_crop_flip_identity_without_padding_or_flip(monkeypatch):
    images = torch.rand(6, 3, 8, 8)
    out = crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    assert out.shape == images.shape
    # padding 0: the only change can be a horizontal flip
    for x, y in zip(images, out):
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: real_rand(*a, **k) + 1.0)  # never < 0.5: no flips
    assert torch.equal(crop_flip(images, torch.Generator().manual_seed(0), padding=0), images)


def test_crop_flip_matches_per_image_reference():
    images = torch.rand(64, 3, 10, 12)
    padding = 3
    out = crop_flip(images, torch.Generator().manual_seed(7), padding=padding)
    assert out.shape == images.shape
    # Same draws as the implementation, then a straightforward per-image crop and flip.
    g = torch.Generator().manual_seed(7)
    n, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    padded = F.pad(images, (padding,) * 4)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(out[i], expected), i
    # And, independently of the draws: each output is a (possibly flipped) crop of the padded input.
    for i in range(8):
        candidates = [padded[i, :, a:a + h, b:b + w] for a in range(2 * padding + 1) for b in range(2 * padding + 1)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in candidates)
    assert flip.any() and not flip.all() and dy.unique().numel() > 1


def test_crop_flip_is_seeded_and_works_on_uint8_sized_batches():
    images = torch.rand(5, 1, 28, 28)
    a = crop_flip(images, torch.Generator().manual_seed(1))
    b = crop_flip(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert D.AUGMENTATIONS["none"](images, torch.Generator()) is images


# --------------------------------------------------------------------------- CIFAR-100 and SVHN on fake files
@pytest.fixture
def fake_cifar100(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # meta file md5
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 30), ("test", 12)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": rng.integers(0, 20, n).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
        splits[name] = entry
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class{i:03d}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, handle)
    return tmp_path, splits


def test_cifar100_loader(fake_cifar100):
    root, splits = fake_cifar100
    for train, name in ((True, "train"), (False, "test")):
        split = load_split("cifar100", root, train=train, download=False)
        n = len(splits[name]["fine_labels"])
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.tolist() == splits[name]["fine_labels"]
        assert split.num_classes == 100 and split.classes[5] == "class005"
        # CIFAR rows are channel-major: R plane, G plane, B plane.
        assert torch.equal(split.images[2], torch.from_numpy(splits[name]["data"][2].reshape(3, 32, 32)))
    bundle = load_data("cifar100", root, train_size=10, test_size=4, download=False)
    assert len(bundle.train) == 10 and len(bundle.test) == 4 and bundle.info.augmentation == "crop-flip"


@pytest.fixture
def fake_svhn(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy is needed to write SVHN's .mat files")
    from torchvision.datasets import SVHN

    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    rng = np.random.default_rng(1)
    files = {}
    for split, n in (("train", 25), ("test", 11)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # SVHN writes digit 0 as label 10
        y[1, 0] = 3
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        files[split] = (x, y)
    return tmp_path, files


def test_svhn_loader_maps_label_10_to_0(fake_svhn):
    root, files = fake_svhn
    for train, split in ((True, "train"), (False, "test")):
        data = load_split("svhn", root, train=train, download=False)
        x, y = files[split]
        assert data.images.shape == (x.shape[3], 3, 32, 32) and data.images.dtype == torch.uint8
        expected = y[:, 0].astype(np.int64)
        expected[expected == 10] = 0
        assert data.labels.tolist() == expected.tolist()
        assert data.labels[0] == 0 and data.labels[1] == 3 and data.labels.max() <= 9
        assert torch.equal(data.images[4], torch.from_numpy(x[:, :, :, 4]).permute(2, 0, 1))
    assert D.DATASETS["svhn"].augmentation == "none"


def test_svhn_corrupted_file_is_a_data_error(tmp_path):
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="md5"):
        load_split("svhn", tmp_path, train=False, download=False)


# --------------------------------------------------------------------------- errors, no network
def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; choose from cifar10"):
        load_split("imagenet", ".", train=True)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat"),
    ("mnist", "train-images-idx3-ubyte.gz"), ("fashion-mnist", "train-images-idx3-ubyte.gz"),
])
def test_missing_files_without_download(tmp_path, name, expected):
    with pytest.raises(DataError) as info:
        load_split(name, tmp_path, train=True, download=False)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and expected in message


@pytest.mark.parametrize("name, cls", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("svhn", "SVHN"),
                                       ("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_failed_download_is_one_line(tmp_path, monkeypatch, name, cls):
    import urllib.error

    import torchvision.datasets as tvd

    def offline(self):
        raise urllib.error.URLError("network is unreachable\nsecond line")

    monkeypatch.setattr(getattr(tvd, cls), "download", offline)
    with pytest.raises(DataError) as info:
        load_split(name, tmp_path, train=True, download=True)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "download failed: URLError" in message and "network is unreachable" in message
