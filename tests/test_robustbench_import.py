"""RobustBench imports after ``import at_memorization``, and its protocol runs on local tensors (issue 19).

The README snippets are read from README.md (its "RobustBench" section) and run verbatim
in a fresh interpreter, with the network blocked, from a folder holding ``runs/x/best.pt``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.machinery
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import at_memorization
from at_memorization import _compat
from at_memorization._compat import RobustBenchUnavailable, import_robustbench
from at_memorization.evaluation import robustbench_protocol
from subprocess_guard import run_with_hang_guard

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

NO_NETWORK = """\
import socket

def _refuse(*args, **kwargs):
    raise OSError("the test blocks the network")

socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""


def _readme_snippets() -> list[str]:
    text = README.read_text()
    section = text.split("### RobustBench\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _python(code: str, cwd: Path, tmp_path: Path, extra_path: Path | None = None):
    """Run ``code`` with ``python -c`` in a fresh interpreter in ``cwd``, without network access."""
    blocker = tmp_path / "no-network"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(NO_NETWORK)
    paths = [str(p) for p in (extra_path, blocker) if p is not None]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return run_with_hang_guard([sys.executable, "-c", code], cwd=cwd, env=env, silence_s=600)


def _write_checkpoint(folder: Path) -> nn.Module:
    """A preactresnet18 CIFAR-10 checkpoint in our format at ``folder/runs/x/best.pt``."""
    from at_memorization import checkpoint as ckpt

    torch.manual_seed(0)
    model = at_memorization.build_model("preactresnet18", 10).eval()
    state = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "model": model.state_dict(),
             "model_name": "preactresnet18", "num_classes": 10, "in_chans": 3, "img_size": 32,
             "dataset": "cifar10", "epoch": 1}
    (folder / "runs" / "x").mkdir(parents=True)
    ckpt.save_atomic(state, folder / "runs" / "x" / "best.pt")
    return model


def test_readme_snippets_run_verbatim_in_a_fresh_interpreter(tmp_path):
    snippets = _readme_snippets()
    assert len(snippets) == 2
    load_snippet, protocol_snippet = snippets
    assert "import at_memorization" in load_snippet and "from robustbench.utils import load_model" in load_snippet
    assert "robustbench_protocol(" in protocol_snippet
    work = tmp_path / "work"
    work.mkdir()
    model = _write_checkpoint(work)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = (model(x).argmax(1) + 1) % 10  # all misclassified: AutoAttack has nothing to attack (fast)
    torch.save((x, y), work / "my_test_points.pt")

    done = _python(load_snippet, work, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    done = _python(protocol_snippet, work, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'clean_acc': 0.0" in done.stdout and "'autoattack_acc': 0.0" in done.stdout, done.stdout
    assert "'n_examples': 6" in done.stdout and "'threat_model': 'Linf'" in done.stdout


def test_import_robustbench_works_after_import_at_memorization(tmp_path):
    code = textwrap.dedent("""\
        import sys, warnings
        import at_memorization
        assert not {"robustbench", "autoattack", "pyautoattack"} & set(sys.modules), "imported eagerly"
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # e.g. pkg_resources' deprecation warning
            import robustbench
        from robustbench.eval import benchmark
        from robustbench.utils import load_model, clean_accuracy
        import autoattack, autoattack.state, pyautoattack.state
        assert robustbench.benchmark is benchmark
        assert autoattack.AutoAttack is at_memorization._compat.LegacyAutoAttack
        assert autoattack.state is pyautoattack.state
        hooks = [getattr(f, "_at_mem_hook", None) for f in sys.meta_path]
        at_memorization._compat.install_import_hooks()  # idempotent
        assert [getattr(f, "_at_mem_hook", None) for f in sys.meta_path] == hooks
        assert hooks.count("robustbench-preflight") == hooks.count("autoattack-alias") == 1
        path_finder = next(i for i, f in enumerate(sys.meta_path) if getattr(f, "__name__", "") == "PathFinder")
        assert hooks.index("robustbench-preflight") < path_finder < hooks.index("autoattack-alias")
        print("ok")
    """)
    done = _python(code, tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_plain_import_robustbench_without_at_memorization_still_fails(tmp_path):
    """The documented decision: no .pth hook, no top-level ``autoattack`` package of ours."""
    if importlib.machinery.PathFinder.find_spec("autoattack") is not None:
        pytest.skip("a real autoattack package is installed here")
    done = _python("import robustbench", tmp_path, tmp_path)
    assert done.returncode != 0
    assert "No module named 'autoattack'" in done.stderr


def test_a_real_autoattack_package_wins_over_the_alias(tmp_path):
    fake = tmp_path / "fake-site"
    (fake / "autoattack").mkdir(parents=True)
    (fake / "autoattack" / "__init__.py").write_text("class AutoAttack:\n    REAL = True\n")
    (fake / "autoattack" / "state.py").write_text("class EvaluationState:\n    pass\n")
    code = textwrap.dedent("""\
        import at_memorization, autoattack
        assert getattr(autoattack.AutoAttack, "REAL", False), autoattack
        at_memorization._compat._install_autoattack_alias()
        import sys
        assert sys.modules["autoattack"] is autoattack and not hasattr(autoattack, "_at_mem_alias")
        print("ok")
    """)
    done = _python(code, tmp_path, tmp_path, extra_path=fake)
    assert done.returncode == 0, done.stderr[-3000:]


# -- the installation check on `import robustbench` ----------------------------------------------


class _FakeDistribution:
    def __init__(self, root, record):
        self.root, self.record = root, record

    def read_text(self, name):
        return self.record if name == "RECORD" else None

    def locate_file(self, relative):
        return self.root / relative


@pytest.fixture
def unimported_robustbench(monkeypatch):
    """robustbench removed from sys.modules for the test (put back after), so that it imports anew."""
    assert any(getattr(f, "_at_mem_hook", None) == "robustbench-preflight" for f in sys.meta_path)
    import_robustbench()
    for name in [n for n in sys.modules if n == "robustbench" or n.startswith("robustbench.")]:
        monkeypatch.delitem(sys.modules, name)


def test_import_robustbench_refuses_files_overwritten_by_torchattacks(unimported_robustbench, tmp_path,
                                                                      monkeypatch):
    (tmp_path / "robustbench").mkdir()
    (tmp_path / "robustbench" / "eval.py").write_bytes(b"# stripped by torchattacks\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(b"def benchmark(): ...\n").digest()).rstrip(b"=").decode()
    fake = _FakeDistribution(tmp_path, f"robustbench/eval.py,sha256={digest},21\n")
    real = importlib.metadata.distribution
    monkeypatch.setattr(_compat.importlib.metadata, "distribution",
                        lambda name: fake if name == "robustbench" else real(name))
    with pytest.raises(RobustBenchUnavailable) as info:
        import robustbench  # noqa: F401
    message = str(info.value)
    assert "not robustbench's own file" in message and _compat.ROBUSTBENCH_FIX in message and "\n" not in message
    assert isinstance(info.value, ImportError)
    assert "robustbench" not in sys.modules


def test_import_robustbench_names_the_setuptools_fix(unimported_robustbench, monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # makes `import pkg_resources` fail
    with pytest.raises(ImportError, match=r"setuptools>=82 removed; run: pip install 'setuptools<82'"):
        from robustbench.utils import load_model  # noqa: F401


# -- robustbench_protocol --------------------------------------------------------------------------


def _linear_model(classes: int = 10) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(classes, 64, generator=generator))
        model[1].bias.zero_()
    return model


def _points(model, n: int = 16):
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three clean errors
    return x, y


def test_protocol_is_exported_lazily():
    assert at_memorization.robustbench_protocol is robustbench_protocol
    assert "robustbench_protocol" in at_memorization.__all__


@pytest.mark.parametrize("threat_model, eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_protocol_matches_robustbench_and_a_direct_pyautoattack_run(threat_model, eps):
    import pyautoattack

    model = _linear_model().train()  # put in eval mode for the run, then restored
    x, y = _points(model)
    rng = torch.get_rng_state()
    result = robustbench_protocol(model, x, y, threat_model=threat_model.lower(), batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert result["threat_model"] == threat_model and result["eps"] == eps and result["version"] == "standard"
    assert result["n_examples"] == 16 and result["batch_size"] == 8 and result["seed"] == 3

    rb_utils = import_robustbench("utils")
    assert result["clean_acc"] == rb_utils.clean_accuracy(model.eval(), x, y, batch_size=8) == 13 / 16
    adversary = pyautoattack.AutoAttack(model, device="cpu", eps=eps, norm=threat_model, seed=3, version="standard")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=8)
    assert result["autoattack_acc"] == rb_utils.clean_accuracy(model, x_adv, y, batch_size=8)
    assert result["autoattack_acc"] < result["clean_acc"]
    if threat_model == "Linf":
        assert result["autoattack_acc"] > 0  # some points survive: all four attacks ran


def test_protocol_defaults_progress_and_uint8_pixels():
    model = _linear_model()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = (model(x.float() / 255).argmax(1) + 1) % 10  # all wrong: nothing to attack
    seen = []
    result = robustbench_protocol(model, x, y.int(), threat_model="L2",
                                  progress=lambda stage: (lambda n: seen.append((stage, n))))
    assert result == {"clean_acc": 0.0, "autoattack_acc": 0.0, "n_examples": 5, "eps": 0.5, "threat_model": "L2",
                      "version": "standard", "batch_size": 256, "seed": 0}
    assert seen == [("clean", 5), ("autoattack", 5)]
    assert robustbench_protocol(model, x.float() / 255, y)["eps"] == 8 / 255


def _bad_inputs():
    model = _linear_model()
    x, y = _points(model, 4)
    return [
        ("model", dict(model=lambda t: t), TypeError, r"model must be a torch\.nn\.Module"),
        ("threat", dict(threat_model="L1"), ValueError, r"threat_model must be 'Linf' or 'L2'"),
        ("eps", dict(eps=-0.1), ValueError, r"eps must be a positive number"),
        ("batch", dict(batch_size=0), ValueError, r"batch_size must be a positive integer"),
        ("range", dict(x=x * 255), ValueError, r"x must hold images in \[0, 1\] .* range over \[\d"),
        ("nan", dict(x=x.clone().fill_(float("nan"))), ValueError, r"x has NaN or infinite values"),
        ("shape", dict(x=x.flatten(1)), ValueError, r"x must be a non-empty \(N, C, H, W\) image tensor"),
        ("empty", dict(x=x[:0], y=y[:0]), ValueError, r"non-empty"),
        ("int-x", dict(x=x.long()), TypeError, r"x must hold float images"),
        ("float-y", dict(y=y.float()), TypeError, r"y must be a 1-D tensor of integer class labels"),
        ("2d-y", dict(y=y[:, None]), TypeError, r"y must be a 1-D tensor"),
        ("length", dict(y=y[:3]), ValueError, r"x has 4 images but y has 3 labels"),
        ("negative", dict(y=y - 100), ValueError, r"y must hold class indices >= 0"),
        ("label", dict(y=y + 10), ValueError, r"y has label 1\d but the model outputs 10 classes"),
        ("classes", dict(model=_linear_model(3)), ValueError, r"at least 10 classes; it outputs 3"),
        ("device", dict(device="tpu"), ValueError, r"unknown device 'tpu'"),
    ], dict(model=model, x=x, y=y)


@pytest.mark.parametrize("case", [case[0] for case in _bad_inputs()[0]])
def test_protocol_refuses_bad_input_with_one_line(case):
    cases, good = _bad_inputs()
    _, changes, error, pattern = next(c for c in cases if c[0] == case)
    kwargs = dict(good, **changes)
    with pytest.raises(error, match=pattern) as info:
        robustbench_protocol(kwargs.pop("model"), kwargs.pop("x"), kwargs.pop("y"), **kwargs)
    assert "\n" not in str(info.value)


def test_protocol_never_imports_robustbench(tmp_path):
    code = textwrap.dedent("""\
        import sys, torch
        import at_memorization
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
        x = torch.rand(3, 3, 2, 2)
        with torch.no_grad():
            y = (model(x).argmax(1) + 1) % 10
        print(at_memorization.robustbench_protocol(model, x, y)["n_examples"])
        assert "robustbench" not in sys.modules
    """)
    done = _python(code, tmp_path, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "3"
