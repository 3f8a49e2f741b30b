"""The drop-in TE API's surface (issue 19): exports, docstrings that match the signatures, the data
helpers ``WithIndex`` / ``without_index``, and the checks that turn silent misuse into errors."""

from __future__ import annotations

import copy
import inspect
import pickle
import re

import pytest
import torch

import at_memorization
from at_memorization import TELoss, TEPGD, WithIndex, te_penalty, without_index
from at_memorization.plugins.temporal_ensembling import te_schedule, trades_attack_loss

PUBLIC_CALLABLES = {
    "TELoss": (TELoss, TELoss.__init__),
    "TELoss.for_run": (TELoss.for_run, TELoss.for_run),
    "TELoss.update": (TELoss.update, TELoss.update),
    "TELoss.update_from": (TELoss.update_from, TELoss.update_from),
    "TELoss.forward": (TELoss.forward, TELoss.forward),
    "TELoss.penalty": (TELoss.penalty, TELoss.penalty),
    "TELoss.attack_penalty": (TELoss.attack_penalty, TELoss.attack_penalty),
    "TEPGD": (TEPGD, TEPGD.__init__),
    "TEPGD.forward": (TEPGD.forward, TEPGD.forward),
    "WithIndex": (WithIndex, WithIndex.__init__),
    "without_index": (without_index, without_index),
    "te_penalty": (te_penalty, te_penalty),
    "te_schedule": (te_schedule, te_schedule),
    "trades_attack_loss": (trades_attack_loss, trades_attack_loss),
}

_PARAM = re.compile(r"^(\*{0,2}[A-Za-z_]\w*)(?: : .*)?$")


def documented_parameters(doc: str) -> list[str]:
    """The names in a numpydoc ``Parameters`` section (``name : type`` lines at the left margin)."""
    lines = doc.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}:
            break
    else:
        return []
    names = []
    for line in lines[i + 2:]:
        if not line.strip() or line.startswith(" "):
            continue  # a description (indented) or a blank line
        match = _PARAM.match(line)
        if not match or (" : " not in line and not line.startswith("**")):
            break  # prose at the margin: the section is over
        names.append(match.group(1).lstrip("*"))
    return names


def signature_parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name not in ("self", "cls")]


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_docstrings_document_exactly_the_parameters(name):
    documented_on, function = PUBLIC_CALLABLES[name]
    documented = documented_parameters(inspect.getdoc(documented_on) or "")
    assert documented, f"{name} has no Parameters section"
    assert documented == signature_parameters(function), name


def test_the_historical_validate_keyword_exists():
    """help(TELoss) used to document ``validate`` as if it were a keyword (TypeError when passed)."""
    assert "validate" in signature_parameters(TELoss.__init__)
    te = TELoss(4, 3, start_epoch=1, end_epoch=2, validate=False)
    assert te.validate is False
    assert TELoss(4, 3, start_epoch=1, end_epoch=2).validate is True


def test_the_api_is_exported_from_the_package():
    for name in ("TELoss", "TEPGD", "WithIndex", "without_index", "te_penalty"):
        assert name in at_memorization.__all__
        assert getattr(at_memorization, name) is not None
    from at_memorization.plugins.temporal_ensembling import loss

    assert at_memorization.te_penalty is loss.te_penalty


def test_te_penalty_reductions():
    logits, target = torch.randn(5, 3), torch.softmax(torch.randn(5, 3), 1)
    squared = (torch.softmax(logits, 1) - target) ** 2
    torch.testing.assert_close(te_penalty(logits, target, 2.0), 2.0 * squared.mean())
    torch.testing.assert_close(te_penalty(logits, target, 2.0, "none"), 2.0 * squared.mean(1))
    torch.testing.assert_close(te_penalty(logits, target, 2.0, "sum"), 2.0 * squared.mean(1).sum())
    with pytest.raises(ValueError, match="reduction"):
        te_penalty(logits, target, 2.0, "batchmean")


def test_state_dict_round_trip_keeps_working_with_the_new_settings():
    te = TELoss.for_run(6, 3, epochs=10, epoch_origin=0, reduction="sum")
    te.update(torch.randn(3, 3), torch.tensor([0, 2, 4]), epoch=te.start_epoch)
    fresh = TELoss.for_run(6, 3, epochs=10, epoch_origin=0)
    fresh.load_state_dict(te.state_dict())
    assert torch.equal(fresh.ensemble, te.ensemble)
    TELoss(6, 3, start_epoch=1, end_epoch=2).load_state_dict(te.state_dict())  # settings are not checked


# --------------------------------------------------------------------------- WithIndex / without_index
class PairDataset(torch.utils.data.Dataset):
    classes = ["a", "b"]

    def __init__(self, n=10):
        self.x, self.y = torch.rand(n, 2), torch.arange(n) % 2
        self.shuffled = 0

    def set_random_choices(self):
        self.shuffled += 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class DictDataset(PairDataset):
    def __getitem__(self, i):
        return {"input": self.x[i], "target": self.y[i]}


def test_with_index_appends_the_index_and_passes_attributes_through():
    data = PairDataset()
    wrapped = WithIndex(data)
    assert len(wrapped) == 10 and wrapped.dataset is data
    x, y, i = wrapped[3]
    assert torch.equal(x, data.x[3]) and y == data.y[3] and i == 3
    assert wrapped[torch.tensor(4)][2] == 4 and type(wrapped[torch.tensor(4)][2]) is int
    assert wrapped.classes == ["a", "b"]
    wrapped.set_random_choices()
    assert data.shuffled == 1
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute
    assert WithIndex(DictDataset())[2]["index"] == 2
    assert WithIndex([5, 6, 7])[1] == (6, 1)
    # Copies and DataLoader workers' pickling look attributes up before __init__ ran. copy.copy
    # rebuilds the object the way unpickling does (__reduce_ex__, no __init__), without unpickling.
    assert pickle.dumps(wrapped)
    clone = copy.copy(wrapped)
    assert len(clone) == 10 and clone.classes == ["a", "b"]
    assert copy.deepcopy(wrapped)[1][2] == 1


def test_with_index_refuses_what_has_no_stable_positions():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield 1

    with pytest.raises(TypeError, match="map-style"):
        WithIndex(Stream())
    with pytest.raises(TypeError, match="already a WithIndex"):
        WithIndex(WithIndex(PairDataset()))
    with pytest.raises(ValueError, match="already have a 'index' key"):
        WithIndex([{"index": 0}])[0]


@pytest.mark.parametrize("dataset", [PairDataset(), DictDataset()], ids=["tuples", "dicts"])
def test_without_index_gives_the_batches_without_the_index(dataset):
    loader = torch.utils.data.DataLoader(WithIndex(dataset), batch_size=4)
    view = without_index(loader)
    assert len(view) == len(loader) == 3 and view.batch_size == 4 and view.dataset is loader.dataset
    for with_i, without in zip(loader, view):
        if isinstance(with_i, dict):
            assert set(without) == {"input", "target"} and "index" in with_i
        else:
            x, y = without  # code that unpacks (x, y) keeps working
            assert torch.equal(x, with_i[0]) and torch.equal(y, with_i[1]) and len(with_i) == 3
    with pytest.raises(ValueError, match="no index"):
        list(without_index([(torch.zeros(1),)]))


# --------------------------------------------------------------------------- checks
def test_tepgd_checks():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    te = TELoss(8, 3, start_epoch=1, end_epoch=2)
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    attack = TEPGD(model, te, eps=0.1, alpha=0.05, steps=2)
    assert attack(x, y).shape == x.shape  # no epoch: plain PGD
    with pytest.raises(ValueError, match="look normalized"):
        attack(x * 4 - 2, y)  # normalized images are refused, with or without mean/std
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        TEPGD(model, te, restarts=0)
    with pytest.raises(ValueError, match="index="):
        attack(x, y, epoch=1)
    with pytest.raises(ValueError, match="epoch_origin=0"):
        attack(x, y, index=torch.arange(4), epoch=0)
    with pytest.raises(ValueError, match="give both"):
        TEPGD(model, te, mean=(0.5,))
