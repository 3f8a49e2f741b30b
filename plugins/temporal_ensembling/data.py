"""Sample indices for foreign data pipelines: ``WithIndex`` (items gain their index) and
``without_index`` (a view of an indexed loader for code that expects the items without it)."""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch

INDEX_KEY = "index"


def _add_index(item, index: int):
    if isinstance(item, Mapping):
        if INDEX_KEY in item:
            raise ValueError(f"WithIndex: the dataset's items already have a {INDEX_KEY!r} key")
        return {**item, INDEX_KEY: index}
    if isinstance(item, (tuple, list)):
        return (*item, index)
    return (item, index)


def _looks_like_an_index(value) -> bool:
    """Whether a batch's last element can be WithIndex's index: integers, no sample twice."""
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int64, torch.int32) or value.dim() > 1:
        return False
    return value.unique().numel() == value.numel()


def _drop_index(batch, check: bool):
    if isinstance(batch, Mapping):
        if INDEX_KEY not in batch:
            raise ValueError(f"without_index: the batch has no {INDEX_KEY!r} key "
                             f"(is its dataset wrapped in WithIndex?)")
        return {key: value for key, value in batch.items() if key != INDEX_KEY}
    if isinstance(batch, (tuple, list)):
        if len(batch) < 2:
            raise ValueError(f"without_index: a batch of {len(batch)} element(s) has no index to drop "
                             f"(is its dataset wrapped in WithIndex?)")
        if check and not _looks_like_an_index(batch[-1]):
            raise ValueError("without_index: the batches' last element is not a sample index (integers, no sample "
                             "twice): the loader was never indexed, and dropping it would drop the labels; "
                             "wrap its dataset in WithIndex, or use the loader itself")
        rest = batch[:-1]  # a list stays a list (DataLoader collates tuples into lists), a tuple a tuple
        return rest[0] if len(rest) == 1 else rest
    raise TypeError(f"without_index: expected tuple, list or dict batches, got {type(batch).__name__}")


class _Forwarding:
    """Forwards the attributes it lacks to the object it wraps (the attribute ``_inner`` names)."""

    _inner = ""

    def __getattr__(self, name):
        # Only reached for attributes the wrapper itself lacks. Guarded so that unpickling (DataLoader
        # workers) and copying, which look attributes up before __init__ ran, do not recurse.
        inner = self.__dict__.get(self._inner)
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)


class WithIndex(_Forwarding, torch.utils.data.Dataset):
    """A map-style dataset whose items also carry their index: ``(x, y)`` becomes ``(x, y, index)``.

    >>> train = WithIndex(train_set)
    >>> for x, y, index in DataLoader(train, batch_size=128, shuffle=True):
    ...     te.update_from(model, x, index, epoch)

    Tuples and lists get the index appended, dicts an ``"index"`` key, any other item becomes
    ``(item, index)``. ``len`` is the dataset's, and every other attribute is the wrapped dataset's
    (``train.classes``, ``train.targets``, a ``set_random_choices()`` method, ...), so code that
    calls methods on its dataset keeps working; the dataset itself is ``train.dataset``.

    Code that must keep seeing the items without the index (evaluation or recording helpers that
    unpack ``x, y = batch``) takes ``without_index(loader)``, or a loader over ``train.dataset``.

    Parameters
    ----------
    dataset : Dataset
        Any map-style dataset (``__getitem__`` with integer positions and ``__len__``).
    """

    _inner = "dataset"

    def __init__(self, dataset):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError("WithIndex needs a map-style dataset (positions 0..len-1); an IterableDataset has no "
                            "stable sample positions for the TE ensemble")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"WithIndex needs a map-style dataset with __getitem__ and __len__, got "
                            f"{type(dataset).__name__}")
        if isinstance(dataset, WithIndex):
            raise TypeError("the dataset is already a WithIndex: wrapping it again would add a second index")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice) or isinstance(index, bool):
            raise TypeError(f"WithIndex takes one integer position, got {index!r}: use "
                            f"[wrapped[i] for i in range(...)], a Subset or a DataLoader for several")
        try:
            index = operator.index(index)  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise TypeError(f"WithIndex takes one integer position, got {type(index).__name__} {index!r}") from None
        size = len(self.dataset)
        if not -size <= index < size:
            raise IndexError(f"WithIndex: position {index} is out of range for a dataset of {size} items")
        index %= size  # -1 is the last item, whose position (and ensemble row) is size - 1
        return _add_index(self.dataset[index], index)

    def __repr__(self) -> str:
        return f"WithIndex({self.dataset!r})"


def _wraps_with_index(loader) -> bool:
    """Whether the loader's dataset is, or wraps (``Subset``, ...), a ``WithIndex``."""
    dataset, seen = getattr(loader, "dataset", None), set()
    while dataset is not None and id(dataset) not in seen:
        if isinstance(dataset, WithIndex):
            return True
        seen.add(id(dataset))
        dataset = getattr(dataset, "dataset", None)
    return False


class _WithoutIndex(_Forwarding):
    """The batches of an indexed loader with the index dropped; see ``without_index``."""

    _inner = "loader"

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        check = not _wraps_with_index(self.loader)  # data sets that yield their own index are checked per batch
        for batch in self.loader:
            yield _drop_index(batch, check)

    def __len__(self) -> int:
        return len(self.loader)

    def __repr__(self) -> str:
        return f"without_index({self.loader!r})"


def without_index(loader):
    """A view of ``loader`` whose batches lack the index that ``WithIndex`` added.

    ``(x, y, index)`` batches come out as ``(x, y)``, dict batches without their ``"index"`` key. The
    view has the loader's ``len`` and attributes (``batch_size``, ``dataset``, ...) and iterates the
    loader itself, so it sees the same batches (and, for a shuffling loader, draws the same way).
    Give it to code that unpacks ``x, y = batch``, e.g. an evaluation or recording helper.

    A loader whose dataset is not a ``WithIndex`` (nor wraps one) has each batch's last element
    checked: unless it is integers with no sample twice, a ``ValueError`` says the loader was never
    indexed (dropping the last element would drop the labels).

    Parameters
    ----------
    loader : iterable
        A loader (or any iterable) of batches from a ``WithIndex`` dataset.
    """
    return _WithoutIndex(loader)
