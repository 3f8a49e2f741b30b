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
import hashlib
import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .user_errors import UserError


class DataError(UserError, ValueError):
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


def _reason(error: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors that keep the cause."""
    name = type(error).__name__
    if name == "error":  # zlib.error, struct.error: say which
        name = f"{type(error).__module__}.error"
    lines = str(error).strip().splitlines()
    return f"{name}: {lines[0]}" if lines else name


def _check_labels(labels: torch.Tensor, num_classes: int, source) -> None:
    """Every label in ``[0, num_classes)``, or a DataError naming ``source``, the value and where it is."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        index = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
        raise DataError(f"{source}: label {int(labels[index])} (at index {index}) is outside [0, {num_classes}): "
                        f"the data set has {num_classes} classes")


# What unpickling a damaged or foreign file raises (pickle can fail in many ways).
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
                  AttributeError, ImportError, OverflowError)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only (what CIFAR's python batches hold): a
    diagnosis must not run code from a damaged or foreign file."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: {module}.{name} is not a plain container or array")


def _read_cifar_pickle(path: Path):
    with open(path, "rb") as handle:
        return _ArrayUnpickler(handle, encoding="latin1").load()


def _cifar_md5_failure(dataset_cls, data_dir: Path) -> Path | None:
    """The first of a CIFAR set's files that is present but fails its md5 (None when one is missing)."""
    from torchvision.datasets.utils import check_integrity

    folder = data_dir / dataset_cls.base_folder
    files = [(folder / name, md5) for name, md5 in dataset_cls.train_list + dataset_cls.test_list]
    if not all(path.is_file() for path, _ in files):
        return None
    return next((path for path, md5 in files if not check_integrity(str(path), md5)), None)


def _cifar_batch_problem(dataset_cls, data_dir: Path, train: bool, num_classes: int) -> str | None:
    """The first unreadable or inconsistent file of a CIFAR split, as a message (only called on failure)."""
    folder = data_dir / dataset_cls.base_folder
    for name, _ in (dataset_cls.train_list if train else dataset_cls.test_list):
        path = folder / name
        try:
            entry = _read_cifar_pickle(path)
            data = entry["data"]
            labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
            labels = torch.as_tensor(labels, dtype=torch.int64)
        except _PICKLE_ERRORS as error:
            return f"{path}: not a readable CIFAR batch ({_reason(error)})"
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            return f"{path}: 'data' is a {found}, expected uint8 rows of 3072 bytes (32x32 RGB images)"
        if labels.dim() != 1 or len(labels) != len(data):
            return f"{path} holds {len(data)} images but {labels.numel()} labels"
        try:
            _check_labels(labels, num_classes, path)
        except DataError as error:
            return str(error)
    meta = folder / dataset_cls.meta["filename"]
    try:
        _read_cifar_pickle(meta)[dataset_cls.meta["key"]]
    except _PICKLE_ERRORS as error:
        return f"{meta}: not a readable CIFAR meta file ({_reason(error)})"
    return None


def torchvision_files_present(dataset_cls, data_dir) -> bool:
    """Whether ``data_dir`` holds a torchvision CIFAR set's files with their official md5s."""
    probe = dataset_cls.__new__(dataset_cls)
    probe.root = str(data_dir)
    return probe._check_integrity()


def _load_torchvision_cifar(dataset_cls, folder: str, expected: str, num_classes: int):
    def load(data_dir: Path, train: bool, download: bool):
        if not torchvision_files_present(dataset_cls, data_dir):
            damaged = _cifar_md5_failure(dataset_cls, data_dir)
            what = (f"{damaged} is corrupted or incomplete (md5 check failed)" if damaged
                    else f"{data_dir / folder} not found")
            if not download:
                hint = "; delete it to download it again" if damaged else " (or allow downloading)"
                raise DataError(f"{what}: expected {expected}{hint}")
            try:
                dataset_cls(str(data_dir), train=train, download=True)
            except Exception as error:  # network errors come in many types
                raise DataError(f"{what}: expected {expected}; {_download_hint(error)}") from error
        try:
            ds = dataset_cls(str(data_dir), train=train, download=False)
        except RuntimeError as error:  # e.g. the meta file fails torchvision's md5 check
            raise DataError(f"{data_dir / folder}: {error}; expected {expected}") from error
        except _PICKLE_ERRORS as error:  # files that pass the md5 check but do not unpickle (or a check skipped)
            problem = _cifar_batch_problem(dataset_cls, data_dir, train, num_classes)
            raise DataError(problem or f"{data_dir / folder}: cannot read the {'train' if train else 'test'} "
                                       f"batches ({_reason(error)}); expected {expected}") from error
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
        out_of_range = labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)
        if len(labels) != len(images) or out_of_range:
            problem = _cifar_batch_problem(dataset_cls, data_dir, train, num_classes)
            if problem:  # otherwise load_split's checks name the folder
                raise DataError(problem)
        return images, labels, list(ds.classes)

    return load


def _load_cifar10(data_dir, train, download):
    from torchvision.datasets import CIFAR10

    return _load_torchvision_cifar(CIFAR10, "cifar-10-batches-py", "the extracted CIFAR-10 python batches", 10)(data_dir, train, download)


def _load_cifar100(data_dir, train, download):
    from torchvision.datasets import CIFAR100

    return _load_torchvision_cifar(CIFAR100, "cifar-100-python", "the extracted CIFAR-100 python files", 100)(data_dir, train, download)


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
        from scipy.io.matlab import MatReadError
    except ImportError:  # then SVHN itself raises ImportError (after its md5 check)
        MatReadError = ValueError
    try:
        ds = SVHN(str(data_dir), split=split, download=False)
    except ImportError as error:
        raise DataError(f"{path}: reading SVHN's .mat files needs scipy ({_reason(error)}); "
                        "pip install scipy") from error
    except NotImplementedError as error:  # e.g. a MATLAB v7.3 (HDF5) file; a RuntimeError, so caught first
        raise DataError(f"{path}: not a readable .mat file ({_reason(error)}); "
                        f"expected SVHN's {split}_32x32.mat") from error
    except RuntimeError as error:  # torchvision's md5 check failed
        raise DataError(f"{path} is corrupted or incomplete (md5 check failed): expected SVHN's official "
                        f"{split}_32x32.mat; delete it to download it again") from error
    except KeyError as error:
        raise DataError(f"{path}: no variable {error} in the .mat file; expected SVHN's X (32x32x3xN images) "
                        "and y (N labels)") from error
    except (MatReadError, ValueError, TypeError, IndexError, OSError, EOFError, zlib.error, OverflowError) as error:
        raise DataError(f"{path}: not a readable SVHN .mat file ({_reason(error)})") from error
    if ds.data.dtype != np.uint8 or ds.data.shape[1:] != (3, 32, 32):
        n, c, h, w = ds.data.shape  # torchvision's transpose of X (H, W, C, N)
        raise DataError(f"{path}: X is a {ds.data.dtype} array of {h}x{w}x{c}x{n}, expected uint8 32x32x3xN images")
    labels = torch.as_tensor(ds.labels, dtype=torch.int64).reshape(-1)
    if len(labels) != len(ds.data):
        raise DataError(f"{path} holds {len(ds.data)} images (X) but {len(labels)} labels (y)")
    _check_labels(labels, 10, path)
    return torch.from_numpy(ds.data).contiguous(), labels, [str(i) for i in range(10)]


_IDX_TYPES = {0x08: "unsigned bytes", 0x09: "signed bytes", 0x0B: "shorts", 0x0C: "ints", 0x0D: "floats",
              0x0E: "doubles"}


def _read_idx_gz(path: Path, ndim: int | None = None) -> np.ndarray:
    """A gzip-compressed idx file of unsigned bytes (MNIST's format); any defect is a one-line DataError.

    The header is magic ``00 00 08 <ndim>`` then ``ndim`` big-endian 32-bit sizes; the data that follows
    must hold exactly their product of bytes.
    """
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (EOFError, zlib.error) as error:  # a partial download or copy, or damaged compressed data
        raise DataError(f"{path}: truncated or corrupt gzip file ({_reason(error)})") from error
    except gzip.BadGzipFile as error:  # before OSError: it is one
        raise DataError(f"{path}: not a valid gzip file ({_reason(error)})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({_reason(error)})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        magic = raw[:4].hex(" ") if raw else "none: it decompresses to nothing"
        raise DataError(f"{path}: not an idx file (magic {magic}; expected 00 00 08 then the number of dimensions)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: idx file of {_IDX_TYPES[raw[2]]} (magic {raw[:4].hex(' ')}), expected unsigned bytes "
                        "(00 00 08 ..)")
    dims = raw[3]
    if ndim is not None and dims != ndim:
        expected = "N images x rows x columns" if ndim == 3 else "N labels" if ndim == 1 else f"{ndim} dimensions"
        raise DataError(f"{path}: idx file has {dims} dimensions, expected {ndim} ({expected})")
    offset = 4 + 4 * dims
    if len(raw) < offset:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes; {dims} dimensions need {offset})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    size = math.prod(shape)
    if len(raw) - offset != size:
        raise DataError(f"{path}: idx header says {'x'.join(map(str, shape))} but the file holds {len(raw) - offset} "
                        f"bytes of data, not {size}")
    if size == 0:
        raise DataError(f"{path}: idx file holds no data (header says {'x'.join(map(str, shape))})")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


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
        images_path, labels_path = found / names[0], found / names[1]
        images = torch.from_numpy(_read_idx_gz(images_path, ndim=3).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx_gz(labels_path, ndim=1).astype(np.int64))
        if len(images) != len(labels):  # before any subset: --train-size must not hide mismatched files
            raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
        _check_labels(labels, len(classes), labels_path)
        return images, labels, classes

    return load


_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_EXACT_FILE = "cifar10_exact_subset.npz"


def _load_cifar10_exact(data_dir: Path, train: bool, download: bool):
    """The exact-pixel CIFAR-10 subset (``cifar10_exact_subset.npz``: 5,169 training images, the first
    1,017 test images, original pixels and labels). It cannot be downloaded: it is cut from the original
    batches, so ``data_dir`` must hold the file (or be the file)."""
    path = data_dir if data_dir.suffix == ".npz" else data_dir / CIFAR10_EXACT_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: expected the exact CIFAR-10 subset file {CIFAR10_EXACT_FILE} "
                        "(x_train, y_train, x_test, y_test); it cannot be downloaded, use --dataset cifar10 for the full set")
    split = "train" if train else "test"
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive[f"x_{split}"], archive[f"y_{split}"]
            classes = [str(c) for c in archive["label_names"]] if "label_names" in archive else _CIFAR10_CLASSES
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable exact CIFAR-10 subset ({_reason(error)}); "
                        f"expected arrays x_{split} (N,32,32,3) uint8 and y_{split} (N,)") from error
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: x_{split} is {images.dtype} {images.shape}, expected uint8 (N, 32, 32, 3)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: x_{split} holds {len(images)} images but y_{split} holds {labels.size} labels")
    labels = torch.from_numpy(labels.astype(np.int64))
    _check_labels(labels, 10, path)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous(), labels, classes


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _load_imagefolder(data_dir: Path, train: bool, download: bool, limit: int | None = None):
    """``DIR/{train,test}/<class>/*`` with classes in sorted order.

    The canonical order interleaves the classes (1st image of each class, then 2nd, ...), so the
    first N images of a split are class-balanced; ``--train-size``/``--test-size`` take those.
    """
    from PIL import Image, UnidentifiedImageError

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
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
            # OSError includes PIL's UnidentifiedImageError and "image file is truncated"
            if isinstance(error, UnidentifiedImageError):  # its message only repeats the path
                reason = "empty file" if path.stat().st_size == 0 else "not an image format that PIL recognizes"
            else:
                reason = _reason(error)
            raise DataError(f"{path}: cannot decode image ({reason})") from error
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        first = arrays[0].shape
        other = next(i for i, a in enumerate(arrays) if a.shape != first)
        size = lambda shape: f"{shape[1]}x{shape[0]}"  # noqa: E731  (width x height)
        raise DataError(f"{order[other][0]}: image is {size(arrays[other].shape)} but {order[0][0]} is {size(first)}; "
                        f"the images in {split_dir} must have one size: resize them first")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for _, label in order], dtype=torch.int64)
    return images, labels, classes


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("cifar10", 10, 3, 32, "crop-flip", _load_cifar10),
        DatasetInfo("cifar10-exact", 10, 3, 32, "crop-flip", _load_cifar10_exact),
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


def _folders_near(data_dir: Path) -> set[Path]:
    """The folders that exist at ``data_dir``, its parents and two levels below it (where torchvision's
    downloads create theirs, e.g. ``MNIST/raw``)."""
    near = {parent for parent in (data_dir, *data_dir.parents) if parent.is_dir()}
    if data_dir.is_dir():
        near.update(path for pattern in ("*", "*/*") for path in data_dir.glob(pattern) if path.is_dir())
    return near


def _remove_new_empty_folders(data_dir: Path, before: set[Path]) -> None:
    """Remove the folders a failed load created (deepest first), where they are empty."""
    for folder in sorted(_folders_near(data_dir) - before, key=lambda path: len(path.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty (something else is in it): not ours to remove
            pass


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
        folders_before = _folders_near(data_dir)
        try:
            images, labels, classes = info.loader(data_dir, train, download)
        except BaseException:  # a failed or stopped download (a mistyped folder, offline): no empty folders left
            _remove_new_empty_folders(data_dir, folders_before)
            raise
    num_classes = info.num_classes or len(classes)
    # The loaders name the file at fault; these catch what any loader lets through, on the whole split
    # (before the subset: --train-size must not hide a mismatch).
    source = f"{data_dir} ({name} {'train' if train else 'test'} split)"
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(f"{source}: images are a {images.dtype} tensor of shape {tuple(images.shape)}, "
                        "expected uint8 (N, C, H, W)")
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataError(f"{source}: {len(images)} images but {labels.numel()} labels")
    _check_labels(labels, num_classes, source)
    if size is not None and size < len(labels):
        # Copies, not views: a view would keep (and torch.save would write) the whole split.
        images, labels = images[:size].clone(), labels[:size].clone()
    return IndexedDataset(images, labels, num_classes, classes)


def load_data(name: str, data_dir: str | Path, *, train_size: int | None = None, test_size: int | None = None,
              label_noise: float = 0.0, input_noise: str | None = None, input_noise_fraction: float = 1.0,
              seed: int = 0, download: bool = True) -> DataBundle:
    """Load a data set's train and test splits, take subsets and apply the randomization tests."""
    train = load_split(name, data_dir, train=True, size=train_size, download=download)
    test = load_split(name, data_dir, train=False, size=test_size, download=download)
    if train.shape != test.shape:
        size = lambda shape: "x".join(map(str, shape))  # noqa: E731
        raise DataError(f"{Path(data_dir).expanduser()}: {name} train images are {size(train.shape)} but test images "
                        f"are {size(test.shape)}")
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


def data_fingerprint(dataset) -> str:
    """SHA-256 of the training images and labels actually used (subset, noise included)."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(dataset.images.shape), tuple(dataset.labels.shape))).encode())
    digest.update(dataset.images.contiguous().numpy().data)
    digest.update(dataset.labels.to(torch.int64).contiguous().numpy().data)
    return digest.hexdigest()


def as_float(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as float: uint8 ones scaled, float ones (e.g. Gaussian inputs) as they are."""
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


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
