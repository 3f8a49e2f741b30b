"""The robustbench compatibility layer: the autoattack alias, the old-API adapter, the file self-check."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import sys

import pytest
import torch
from torch import nn

from at_memorization import _compat
from at_memorization._compat import (ROBUSTBENCH_FIX, LegacyAutoAttack, RobustBenchUnavailable,
                                     check_robustbench_files, import_robustbench)
from at_memorization.user_errors import UserError


def test_import_robustbench_installs_the_autoattack_alias():
    robustbench = import_robustbench()
    assert robustbench.__name__ == "robustbench"
    import pyautoattack
    import pyautoattack.state

    alias = sys.modules["autoattack"]
    assert alias._at_mem_alias and alias.AutoAttack is LegacyAutoAttack
    assert sys.modules["autoattack.state"] is pyautoattack.state
    from autoattack import AutoAttack  # what robustbench does

    assert AutoAttack is LegacyAutoAttack
    # Everything else forwards to pyautoattack.
    for name in ("APGDAttack", "FABAttack", "SquareAttack"):
        if hasattr(pyautoattack, name):
            assert getattr(alias, name) is getattr(pyautoattack, name)
    eval_module = import_robustbench("eval")
    assert hasattr(eval_module, "benchmark")
    import_robustbench()  # idempotent
    assert sys.modules["autoattack"] is alias


class _Constant(nn.Module):
    """Always predicts class 0."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([5.0, 0.0, 0.0]))

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True) * 0 + self.bias


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_legacy_autoattack_accepts_the_old_keywords(tmp_path):
    x = torch.rand(4, 3, 4, 4)
    y = torch.tensor([1, 2, 1, 2])  # all misclassified by _Constant: nothing left to attack
    adversary = LegacyAutoAttack(_Constant(), norm="Linf", eps=8 / 255, version="standard", device="cpu",
                                 log_path=str(tmp_path / "log.txt"), verbose=False)
    x_adv = adversary.run_standard_evaluation(x, y, bs=2)
    assert torch.is_tensor(x_adv) and x_adv.shape == x.shape
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=2, return_labels=True)
    assert torch.is_tensor(y_adv) and y_adv.shape == y.shape


def test_legacy_autoattack_custom_attacks_run():
    model = _Linear().eval()
    x = torch.rand(6, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct at first
    adversary = LegacyAutoAttack(model, norm="Linf", eps=0.3, version="custom", attacks_to_run=["apgd-ce"],
                                 log_path=None, seed=0)
    x_adv = adversary.run_standard_evaluation(x, y, bs=6)
    assert torch.is_tensor(x_adv) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 0.3 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).sum() < len(y)  # a large eps breaks a linear model


def test_check_robustbench_files_passes_on_the_installed_files():
    check_robustbench_files()


class _FakeDistribution:
    def __init__(self, root, record):
        self.root, self.record = root, record

    def read_text(self, name):
        return self.record if name == "RECORD" else None

    def locate_file(self, relative):
        return self.root / relative


def _sha(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture
def fake_robustbench(tmp_path, monkeypatch):
    package = tmp_path / "robustbench"
    package.mkdir()
    files = {"robustbench/eval.py": b"def benchmark(): ...\n", "robustbench/utils.py": b"def load_model(): ...\n"}
    for relative, content in files.items():
        (tmp_path / relative).write_bytes(content)
    record = "".join(f"{rel},sha256={_sha(content)},{len(content)}\n" for rel, content in files.items())
    record += "robustbench-1.1.1.dist-info/RECORD,,\n"
    fake = _FakeDistribution(tmp_path, record)
    real = importlib.metadata.distribution
    monkeypatch.setattr(_compat.importlib.metadata, "distribution",
                        lambda name: fake if name == "robustbench" else real(name))
    return tmp_path


def test_check_passes_on_matching_fake_files(fake_robustbench):
    check_robustbench_files()


def test_check_names_the_fix_when_a_file_was_overwritten(fake_robustbench):
    (fake_robustbench / "robustbench" / "eval.py").write_bytes(b"# def benchmark(): stripped by torchattacks\n")
    with pytest.raises(RobustBenchUnavailable) as info:
        check_robustbench_files()
    message = str(info.value)
    assert "eval.py is not robustbench's own file" in message and "torchattacks" in message
    assert ROBUSTBENCH_FIX in message and "\n" not in message
    with pytest.raises(RobustBenchUnavailable, match="force-reinstall"):
        import_robustbench("eval")


def test_check_reports_a_missing_file(fake_robustbench):
    (fake_robustbench / "robustbench" / "utils.py").unlink()
    with pytest.raises(RobustBenchUnavailable, match=r"utils\.py is missing; run: pip install --force-reinstall"):
        check_robustbench_files()


def test_check_when_robustbench_is_not_installed(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_compat.importlib.metadata, "distribution", missing)
    with pytest.raises(RobustBenchUnavailable, match="robustbench is not installed; run: pip install"):
        check_robustbench_files()


def test_missing_pkg_resources_names_the_setuptools_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # makes `import pkg_resources` fail
    with pytest.raises(RobustBenchUnavailable, match="setuptools<82"):
        import_robustbench("utils")


def test_model_card_writer_uses_the_self_check(fake_robustbench, tmp_path):
    from at_memorization.evaluation import write_model_card

    (fake_robustbench / "robustbench" / "utils.py").write_bytes(b"stripped")
    with pytest.raises(RobustBenchUnavailable):
        write_model_card(tmp_path / "card.json", dataset="cifar10", eps=8 / 255, clean_acc=0.5, autoattack_acc=0.4)
    assert not (tmp_path / "card.json").exists()
    assert issubclass(RobustBenchUnavailable, UserError)  # the CLI prints it as one "Error: ..." line
