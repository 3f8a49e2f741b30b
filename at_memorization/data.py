"""Data sets that yield ``(image, label, index)``, held in memory as uint8 tensors.

Small image data sets (CIFAR, SVHN, MNIST) fit in memory many times over, so we decode them once
into a ``(N, C, H, W)`` uint8 tensor and cut batches by index. That keeps the data order a pure
function of (seed, epoch) (so resumed runs see exactly the same batches), lets augmentation run
batched on the training device, and needs no worker processes.

Randomization tests from the paper's code are applied once, seeded, when the set is built:
label noise (``P = (r/C) * ones + (1 - r) * I``), shuffled pixels (one fixed permutation), random
pixels (a permutation per image) and Gaussian images.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """Missing or malformed data; the message names the path and what was expected there."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int | None  # None: read from the data (imagefolder)
    in_chans: int
    img_size: int
    augmentation: str  # default augmentation: "crop-flip" or "none"
    loader: Callable[[Path, bool, bool], tuple[torch.Tensor, torch.Tensor, list[str]]]
    # loader(data_dir, train, download) -> (uint8 images (N,C,H,W), int64 labels (N,), class names)


# --------------------------------------------------------------------------- loaders
def _download_hint(error: Exception) -> str:
    return f"download failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


def torchvision_files_present(dataset_cls, data_dir) -> bool:
    """Whether ``data_dir`` holds a torchvision CIFAR set's files with their official md5s."""
    probe = dataset_cls.__new__(dataset_cls)
    probe.root = str(data_dir)
    return probe._check_integrity()


def _load_torchvision_cifar(dataset_cls, folder: str, expected: str):
    def load(data_dir: Path, train: bool, download: bool):
        if not torchvision_files_present(dataset_cls, data_dir):
            if not download:
                raise DataError(f"{data_dir / folder} not found: expected {expected} (or allow downloading)")
            try:
                dataset_cls(str(data_dir), train=train, download=True)
            except Exception as error:  # network errors come in many types
                raise DataError(f"{data_dir / folder} not found: expected {expected}; {_download_hint(error)}") from error
        try:
            ds = dataset_cls(str(data_dir), train=train, download=False)
        except RuntimeError as error:  # e.g. the meta file fails torchvision's md5 check
            raise DataError(f"{data_dir / folder}: {error}; expected {expected}") from error
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)

    return load


def _load_cifar10(data_dir, train, download):
    from torchvision.datasets import CIFAR10

    return _load_torchvision_cifar(CIFAR10, "cifar-10-batches-py", "the extracted CIFAR-10 python batches")(data_dir, train, download)


def _load_cifar100(data_dir, train, download):
    from torchvision.datasets import CIFAR100

    return _load_torchvision_cifar(CIFAR100, "cifar-100-python", "the extracted CIFAR-100 python files")(data_dir, train, download)


def _load_svhn(data_dir: Path, train: bool, download: bool):
    from torchvision.datasets import SVHN

    split = "train" if train else "test"
    path = data_dir / f"{split}_32x32.mat"
    if not path.is_file():
        if not download:
            raise DataError(f"{path} not found: expected SVHN's {split}_32x32.mat")
        try:
            SVHN(str(data_dir), split=split, download=True)
        except Exception as error:
            raise DataError(f"{path} not found: expected SVHN's {split}_32x32.mat; {_download_hint(error)}") from error
    try:
        ds = SVHN(str(data_dir), split=split, download=False)
    except RuntimeError as error:  # torchvision's md5 check failed
        raise DataError(f"{path} is corrupted or incomplete (md5 check failed): expected SVHN's official "
                        f"{split}_32x32.mat; delete it to download it again") from error
    return torch.from_numpy(ds.data).contiguous(), torch.as_tensor(ds.labels, dtype=torch.int64), [str(i) for i in range(10)]


def _read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _mnist_like(folder: str, torchvision_name: str, classes: list[str]):
    """MNIST-format files either directly in data_dir or in torchvision's ``<Name>/raw`` layout."""

    def load(data_dir: Path, train: bool, download: bool):
        prefix = "train" if train else "t10k"
        names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        candidates = [data_dir, data_dir / torchvision_name / "raw", data_dir / folder]
        found = next((d for d in candidates if all((d / n).is_file() for n in names)), None)
        if found is None:
            if not download:
                raise DataError(f"{data_dir} has no {names[0]}: expected the {torchvision_name} idx .gz files there or in {torchvision_name}/raw")
            import torchvision.datasets as tvd

            try:
                getattr(tvd, torchvision_name)(str(data_dir), train=train, download=True)
            except Exception as error:
                raise DataError(f"{data_dir} has no {names[0]}: expected the {torchvision_name} idx .gz files; {_download_hint(error)}") from error
            found = data_dir / torchvision_name / "raw"
        images = torch.from_numpy(_read_idx_gz(found / names[0]).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx_gz(found / names[1]).astype(np.int64))
        return images, labels, classes

    return load


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _load_imagefolder(data_dir: Path, train: bool, download: bool, limit: int | None = None):
    """``DIR/{train,test}/<class>/*`` with classes in sorted order.

    The canonical order interleaves the classes (1st image of each class, then 2nd, ...), so the
    first N images of a split are class-balanced; ``--train-size``/``--test-size`` take those.
    """
    from PIL import Image

    split_dir = data_dir / ("train" if train else "test")
    if not split_dir.is_dir():
        archives = sorted(p.name for p in data_dir.glob("*.tar.gz")) if data_dir.is_dir() else []
        hint = f" (found {archives[0]}: unpack it first, e.g. tar xzf)" if archives else ""
        raise DataError(f"{split_dir} not found: expected an image folder tree DIR/train/<class>/*, DIR/test/<class>/*{hint}")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image>")
    per_class = [sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) for c in classes]
    order = []
    for rank in range(max(len(files) for files in per_class)):
        order.extend((files[rank], label) for label, files in enumerate(per_class) if rank < len(files))
    if limit is not None:
        order = order[:limit]
    if not order:
        raise DataError(f"{split_dir} has no images")
    arrays = []
    for path, _ in order:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"{split_dir}: images have different sizes {sorted(shapes)[:3]}; resize them to one size first")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in order], dtype=torch.int64)
    return images, labels, classes


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("cifar10", 10, 3, 32, "crop-flip", _load_cifar10),
        DatasetInfo("cifar100", 100, 3, 32, "crop-flip", _load_cifar100),
        DatasetInfo("svhn", 10, 3, 32, "none", _load_svhn),
        DatasetInfo("mnist", 10, 1, 28, "none", _mnist_like("mnist", "MNIST", [str(i) for i in range(10)])),
        DatasetInfo("fashion-mnist", 10, 1, 28, "none", _mnist_like(
            "fashion-mnist", "FashionMNIST",
            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"])),
        DatasetInfo("imagefolder", None, 3, 32, "crop-flip", _load_imagefolder),
    )
}


# --------------------------------------------------------------------------- randomization tests
INPUT_NOISE_KINDS = ("shuffled-pixels", "random-pixels", "gaussian")


def corrupt_labels(labels: torch.Tensor, num_classes: int, rate: float, seed: int) -> torch.Tensor:
    """Resample each label from row y of ``P = (rate/C) * ones + (1 - rate) * I``.

    Equivalently: with probability ``rate`` draw a uniformly random class (which may be y again).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise must be in [0, 1], got {rate}")
    generator = torch.Generator().manual_seed(seed)
    resample = torch.rand(labels.shape, generator=generator) < rate
    random_labels = torch.randint(0, num_classes, labels.shape, generator=generator)
    return torch.where(resample, random_labels, labels)


def corrupt_inputs(images: torch.Tensor, kind: str, fraction: float, seed: int) -> torch.Tensor:
    """Replace a seeded ``fraction`` of the images as in Zhang et al. (2017) / the paper's code."""
    if kind not in INPUT_NOISE_KINDS:
        raise ValueError(f"unknown input noise {kind!r}; choose from {', '.join(INPUT_NOISE_KINDS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"input noise fraction must be in [0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    chosen = torch.rand(n, generator=generator) < fraction
    out = images.clone()
    flat = out.view(n, c, h * w)
    if kind == "shuffled-pixels":
        permutation = torch.randperm(h * w, generator=generator)
        flat[chosen] = flat[chosen][:, :, permutation]
    elif kind == "random-pixels":
        for i in chosen.nonzero().flatten().tolist():
            flat[i] = flat[i][:, torch.randperm(h * w, generator=generator)]
    else:  # gaussian: same per-channel mean and std as the data, quantized back to uint8
        as_float = images.float()
        mean = as_float.mean(dim=(0, 2, 3)).view(1, c, 1, 1)
        std = as_float.std(dim=(0, 2, 3)).view(1, c, 1, 1)
        noise = torch.randn((int(chosen.sum()), c, h, w), generator=generator) * std + mean
        out[chosen] = noise.round().clamp(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------- the in-memory data set
class IndexedDataset(torch.utils.data.Dataset):
    """uint8 images + labels; item ``i`` is ``(image in [0,1], label, i)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if labels.shape != (images.shape[0],):
            raise ValueError("labels must have shape (N,)")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.num_classes = num_classes
        self.classes = classes or [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index].float().div(255), int(self.labels[index]), index

    def batch(self, indices: torch.Tensor):
        """uint8 images, labels and the indices themselves, for a 1-D index tensor."""
        return self.images[indices], self.labels[indices], indices

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


@dataclass
class DataBundle:
    train: IndexedDataset
    test: IndexedDataset
    info: DatasetInfo
    clean_train_labels: torch.Tensor  # before label noise, for analysis


def load_split(name: str, data_dir: str | Path, *, train: bool, size: int | None = None,
               download: bool = True) -> IndexedDataset:
    """One split, cut to its first ``size`` points (RobustBench evaluates the first N test points)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if size is not None and size <= 0:
        raise DataError(f"{'train' if train else 'test'} size must be positive, got {size}")
    info = DATASETS[name]
    data_dir = Path(data_dir).expanduser()
    if name == "imagefolder":  # decode only what is used
        images, labels, classes = _load_imagefolder(data_dir, train, download, size)
    else:
        images, labels, classes = info.loader(data_dir, train, download)
    if size is not None and size < len(labels):
        # Copies, not views: a view would keep (and torch.save would write) the whole split.
        images, labels = images[:size].clone(), labels[:size].clone()
    return IndexedDataset(images, labels, info.num_classes or len(classes), classes)


def load_data(name: str, data_dir: str | Path, *, train_size: int | None = None, test_size: int | None = None,
              label_noise: float = 0.0, input_noise: str | None = None, input_noise_fraction: float = 1.0,
              seed: int = 0, download: bool = True) -> DataBundle:
    """Load a data set's train and test splits, take subsets and apply the randomization tests."""
    train = load_split(name, data_dir, train=True, size=train_size, download=download)
    test = load_split(name, data_dir, train=False, size=test_size, download=download)
    clean_labels = train.labels.clone()
    if label_noise:
        train.labels = corrupt_labels(train.labels, train.num_classes, label_noise, seed)
    if input_noise:
        train.images = corrupt_inputs(train.images, input_noise, input_noise_fraction, seed + 1)
    return DataBundle(train, test, DATASETS[name], clean_labels)


# --------------------------------------------------------------------------- batching and augmentation
def epoch_batches(dataset_size: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index batches for one epoch, from ``DistributedSampler`` (``set_epoch`` each epoch).

    The order depends only on (seed, epoch), so a resumed run replays exactly the same batches; with
    several processes each rank takes its own shard of the same permutation.
    """
    sampler = torch.utils.data.DistributedSampler(
        range(dataset_size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler), dtype=torch.int64)
    yield from indices.split(batch_size)


def num_batches(dataset_size: int, batch_size: int, world_size: int = 1) -> int:
    return math.ceil(math.ceil(dataset_size / world_size) / batch_size)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without a host-device synchronization on CUDA (page-locked staging)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, batched on the images' device.

    The random offsets come from a CPU generator, so the result does not depend on the device.
    """
    n, _, h, w = images.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = _to_device(dy[:, None] + torch.arange(h), device)  # (n, h)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = _to_device(dx[:, None] + cols, device)  # (n, w)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "crop-flip": crop_flip,
    "none": lambda images, generator: images,
}
