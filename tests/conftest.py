"""Shared fixtures: real data from ../shared/data (skipped, with the reason, when absent)."""

from __future__ import annotations

import atexit
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

# The session fixture `slurm_cluster`: a private single-node SLURM cluster (tests/slurm_cluster.py).
pytest_plugins = ["slurm_cluster"]

ROOT = Path(__file__).resolve().parents[1]

# at-mem's method catalog cache (at_memorization/method_catalog.py) goes to a folder of this test
# session, never the user's ~/.cache: for the CLI run in-process and in the subprocesses tests start.
os.environ["AT_MEM_CACHE_DIR"] = tempfile.mkdtemp(prefix="at-mem-test-cache-")
atexit.register(shutil.rmtree, os.environ["AT_MEM_CACHE_DIR"], True)
SHARED_DATA = Path(os.environ.get("AT_MEM_SHARED_DATA", ROOT.parent / "shared" / "data"))
CIFAR_JPG_TAR = SHARED_DATA / "cifar10-jpg" / "cifar10_jpg_YoongiKim_6d04f75.tar.gz"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models run fastest on one thread; several threads crawl when the cores are shared."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set AT_MEM_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The four official MNIST .gz files (read directly from the shared folder)."""
    return _require(SHARED_DATA / "mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return _require(SHARED_DATA / "fashion-mnist")


@pytest.fixture(scope="session")
def cifar_exact_npz() -> Path:
    return _require(SHARED_DATA / "cifar10-exact" / "cifar10_exact_subset.npz")


@pytest.fixture(scope="session")
def cifar_jpg_dir(tmp_path_factory) -> Path:
    """An image-folder subset of CIFAR-10 (JPEG re-encoded): 60 train and 20 test images per class."""
    _require(CIFAR_JPG_TAR)
    root = tmp_path_factory.mktemp("cifar10-jpg")
    keep = {"train": 60, "test": 20}
    with tarfile.open(CIFAR_JPG_TAR, "r:gz") as archive:
        for member in archive:
            parts = Path(member.name).parts  # cifar10-jpg/<split>/<class>/<NNNN>.jpg
            if not member.isfile() or len(parts) != 4 or parts[1] not in keep:
                continue
            if int(Path(parts[3]).stem) < keep[parts[1]]:
                archive.extract(member, root, filter="data")
    return root / "cifar10-jpg"
