"""What `at-mem` prints and writes: AutoAttack always comes with its clean accuracy, and other
packages' deprecation warnings stay out of the CLI's output (unless asked for with ``python -W``)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cli_testing import invoke, tiny_train_args

from at_memorization import evaluation

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- clean accuracy with AutoAttack
@pytest.fixture(scope="module")
def checkpoint(mnist_dir, tmp_path_factory) -> Path:
    """A tiny MNIST smallcnn checkpoint (one epoch on 64 points)."""
    out = tmp_path_factory.mktemp("eval-output") / "run"
    result = invoke("train", *tiny_train_args(mnist_dir, out))
    assert result.exit_code == 0, result.output
    return out / "last.pt"


@pytest.fixture
def clean_passes(monkeypatch):
    """Counts the clean-accuracy passes over the test points that `evaluate` was given."""
    given, passes = [], []
    real_evaluate, real_accuracy = evaluation.evaluate, evaluation.accuracy

    def evaluate(model, images, labels, **kwargs):
        given.append(images)
        return real_evaluate(model, images, labels, **kwargs)

    def accuracy(model, images, labels, **kwargs):
        if kwargs.get("attack") is None and any(images is g for g in given):
            passes.append(kwargs)
        return real_accuracy(model, images, labels, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", evaluate)  # the CLI imports it when it runs
    monkeypatch.setattr(evaluation, "accuracy", accuracy)
    return passes


@pytest.mark.parametrize("attacks", [("autoattack",), ("clean", "autoattack")], ids=["autoattack", "clean+autoattack"])
def test_autoattack_reports_clean_accuracy_measured_once(checkpoint, clean_passes, attacks, tmp_path):
    output, card = tmp_path / "out.json", tmp_path / "card.json"
    args = [a for attack in attacks for a in ("--attack", attack)]
    result = invoke("evaluate", checkpoint, *args, "--n-examples", 8, "--device", "cpu", "--output", output,
                    "--model-card", card)
    assert result.exit_code == 0, result.output
    record = json.loads(output.read_text())
    assert "pyautoattack" in record["autoattack_protocol"]
    assert 0.0 <= record["autoattack_acc"] <= record["clean_acc"] <= 1.0
    assert record["n_examples_by_attack"] == {"clean": 8, "autoattack": 8}
    assert f"clean_acc: {record['clean_acc']:.4f}" in result.output
    assert len(clean_passes) == 1, clean_passes
    # --model-card with AutoAttack alone used to fail for want of a clean accuracy.
    model_card = json.loads(card.read_text())
    assert float(model_card["clean_acc"]) == pytest.approx(100 * record["clean_acc"], abs=0.01)


def test_robustbench_benchmark_supplies_the_clean_accuracy(monkeypatch):
    """With robustbench.eval.benchmark, its own clean accuracy is reported; no second clean pass."""
    import torch

    calls = []
    monkeypatch.setattr(evaluation, "official_files_present", lambda dataset, data_dir: True)
    monkeypatch.setattr(evaluation, "robustbench_benchmark", lambda model, **kwargs: (0.5, 0.25))
    monkeypatch.setattr(evaluation, "accuracy", lambda *args, **kwargs: calls.append(kwargs) or 1.0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x, y = torch.zeros(4, 3, 4, 4), torch.zeros(4, dtype=torch.long)
    results = evaluation.evaluate(model, x, y, attacks=("autoattack",), dataset="cifar10", data_dir="unused")
    assert (results["clean_acc"], results["autoattack_acc"]) == (0.5, 0.25) and calls == []
    results = evaluation.evaluate(model, x, y, attacks=("clean", "autoattack"), dataset="cifar10", data_dir="unused")
    assert (results["clean_acc"], results["autoattack_acc"]) == (1.0, 0.25) and len(calls) == 1


# --------------------------------------------------------------------------- third-party warnings
def _torch_deprecates_jit_interface() -> bool:
    import torch.jit._script

    return "deprecated" in inspect.getsource(torch.jit._script.interface)


def _run(*args: str, **extra_env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(extra_env)
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


# A command that imports timm (whose import makes torch warn); `at-mem models` imports neither any more.
TIMM_COMMAND = ("train", "--print-config")


def test_console_script_prints_no_third_party_warnings():
    script = Path(sys.executable).parent / "at-mem"
    if not script.is_file():
        pytest.skip(f"no at-mem console script next to {sys.executable}")
    result = _run(str(script), *TIMM_COMMAND)
    assert result.returncode == 0, result.stderr
    assert "preactresnet18" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


def test_python_m_prints_no_third_party_warnings():
    result = _run(sys.executable, "-m", "at_memorization", *TIMM_COMMAND)
    assert result.returncode == 0, result.stderr
    assert "preactresnet18" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("how", ["-W default", "PYTHONWARNINGS", "library import"])
def test_warnings_stay_visible_when_asked_for_and_for_library_users(how):
    if not _torch_deprecates_jit_interface():
        pytest.skip("this torch does not deprecate torch.jit.interface: no warning to see")
    if how == "-W default":
        result = _run(sys.executable, "-W", "default", "-m", "at_memorization", *TIMM_COMMAND)
    elif how == "PYTHONWARNINGS":
        result = _run(sys.executable, "-m", "at_memorization", *TIMM_COMMAND, PYTHONWARNINGS="default")
    else:  # the package as a library leaves the warning filters alone, also when timm is imported
        result = _run(sys.executable, "-c", "import at_memorization, timm")
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" in result.stderr and "torch.jit.interface" in result.stderr, result.stderr


def test_quiet_filters_only_other_packages_deprecations(monkeypatch):
    from at_memorization import _quiet

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setattr(sys, "warnoptions", [])

    def shown(category, module, message="something is deprecated"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _quiet.install()
            warnings.warn_explicit(message, category, "x.py", 1, module=module, registry={})
        return len(caught) == 1

    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        assert not shown(category, "torch.jit._script")
        assert not shown(category, "timm.models.registry")
        assert shown(category, "at_memorization.training")  # ours stay
        assert shown(category, "at_memorization")
    assert shown(UserWarning, "torch.nn.modules")  # not a deprecation
    assert shown(RuntimeWarning, "torch")
    assert not shown(UserWarning, "robustbench.loaders", "pkg_resources is deprecated as an API.")
    # Asked for explicitly: nothing is installed.
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    with warnings.catch_warnings():
        before = list(warnings.filters)
        assert not _quiet.install()
        assert warnings.filters == before
