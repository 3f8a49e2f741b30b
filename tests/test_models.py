"""Models: timm registration, shapes, sizes, RobustBench naming, any timm model by name."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import timm
import torch

import at_memorization  # noqa: F401  (registers the models)
from at_memorization import checkpoint as ckpt
from at_memorization._compat import import_robustbench
from at_memorization.model_catalog import COUNTED_FOR, COUNTED_FOR_TEXT, MODELS
from at_memorization.models import (OUR_MODELS, ROBUSTBENCH_NAMES, UnknownModelError, build_model, count_parameters,
                                    model_names)

PAPER_MODELS = ("preactresnet18", "resnet18_cifar", "wrn34_10", "wrn28_10", "smallcnn")

# Parameter counts of the standard CIFAR-10 architectures (10 classes).
EXPECTED_PARAMETERS = {
    "preactresnet18": (11.1e6, 11.3e6),
    "resnet18_cifar": (11.1e6, 11.3e6),
    "wrn34_10": (46.1e6, 46.3e6),
    "wrn28_10": (36.4e6, 36.6e6),
    "smallcnn": (0.25e6, 0.4e6),
}


def test_all_paper_models_are_registered():
    assert set(PAPER_MODELS) <= set(model_names())
    for name in PAPER_MODELS:
        assert timm.is_model(name)
        for dataset in ("cifar10", "cifar100"):  # RobustBench's BenchmarkDataset: cifar10, cifar100, imagenet
            assert timm.is_model(f"{name}_{dataset}_linf") and timm.is_model(f"{name}_{dataset}_l2")
        assert not timm.is_model(f"{name}_svhn_linf")  # RobustBench has no SVHN benchmark to look it up


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_counts(name):
    model = timm.create_model(name, num_classes=10)
    low, high = EXPECTED_PARAMETERS[name]
    assert low <= count_parameters(model) <= high


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_logits_shape_on_32x32(name):
    model = timm.create_model(name, num_classes=7, in_chans=3).eval()
    batch = 1 if name.startswith("wrn") else 2
    with torch.no_grad():
        logits = model(torch.rand(batch, 3, 32, 32))
    assert logits.shape == (batch, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_smallcnn_on_mnist_shape_and_cifar_shape():
    mnist = timm.create_model("smallcnn", num_classes=10, in_chans=1).eval()
    cifar = timm.create_model("smallcnn", num_classes=100, in_chans=3).eval()
    with torch.no_grad():
        assert mnist(torch.rand(3, 1, 28, 28)).shape == (3, 10)
        assert cifar(torch.rand(3, 3, 32, 32)).shape == (3, 100)
    assert cifar.features[0].in_channels == 3


def test_build_model_and_gradients():
    model = build_model("preactresnet18", num_classes=10, in_chans=1, img_size=28)
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_model():
    with pytest.raises(UnknownModelError) as info:
        build_model("no_such_net", 10)
    message = str(info.value)
    assert "unknown model 'no_such_net'" in message and "preactresnet18" in message and "\n" not in message


def test_a_timm_cnn_by_name():
    model = build_model("resnet18", num_classes=10, in_chans=1, img_size=28).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_timm_vit_by_name_at_32x32():
    start = time.perf_counter()
    model = build_model("vit_tiny_patch16_224", num_classes=10, in_chans=3, img_size=32).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert model.patch_embed.img_size == (32, 32)
    assert time.perf_counter() - start < 60


def test_robustbench_load_model_reads_our_checkpoint_offline(tmp_path, monkeypatch):
    rb_utils = import_robustbench("utils")
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that a missed buffer would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "model": model.state_dict(),
             "model_name": "preactresnet18", "num_classes": 10, "in_chans": 3, "img_size": 32,
             "dataset": "cifar10", "epoch": 1}
    path = tmp_path / "best.pt"
    ckpt.save_atomic(state, path)
    monkeypatch.chdir(tmp_path)  # robustbench may create ./models; keep it inside tmp_path

    def no_network(*args, **kwargs):
        raise AssertionError("robustbench tried to download")

    monkeypatch.setattr(rb_utils, "download_gdrive_new", no_network, raising=False)
    loaded = rb_utils.load_model("preactresnet18", dataset="cifar10", threat_model="Linf",
                                 custom_checkpoint=str(path))
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # And from our own loader:
    ours = ckpt.build_model_from_checkpoint(ckpt.load_checkpoint(path))
    with torch.no_grad():
        assert torch.equal(ours(x), model(x))


def _registered_by_us() -> set[str]:
    """Every name in timm's registry whose entry point at_memorization.models defines."""
    return {name for name in timm.list_models()
            if timm.models.model_entrypoint(name).__module__ == "at_memorization.models"}


def test_the_registered_backbones_are_the_catalogs_plus_their_robustbench_names():
    robustbench_names = {name for names in ROBUSTBENCH_NAMES.values() for name in names}
    assert _registered_by_us() == set(MODELS) | robustbench_names and not set(MODELS) & robustbench_names
    assert sorted(OUR_MODELS) == model_names() == sorted(MODELS)
    # RobustBench's f"{name}_{dataset}_{threat}" for every backbone, data set and threat it looks up
    looked_up = [(dataset, threat) for dataset in ("cifar10", "cifar100") for threat in ("linf", "l2")]
    assert ROBUSTBENCH_NAMES == {OUR_MODELS[name]: tuple(f"{name}_{dataset}_{threat}" for dataset, threat in looked_up)
                                 for name in MODELS}
    for name, entrypoint in OUR_MODELS.items():
        assert entrypoint.__name__ == name and timm.models.model_entrypoint(name) is entrypoint


def test_the_model_catalog_states_each_backbones_real_parameter_count():
    """model_catalog.py (what `at-mem models` prints without torch) agrees with the built models, at
    the size it says the counts are for. Built on the meta device: no memory, no initialization cost."""
    assert COUNTED_FOR_TEXT == (f"{COUNTED_FOR['num_classes']} classes, "
                                f"{COUNTED_FOR['in_chans']}x{COUNTED_FOR['img_size']}x{COUNTED_FOR['img_size']} inputs")
    for name, info in MODELS.items():
        with torch.device("meta"):
            model = build_model(name, COUNTED_FOR["num_classes"], COUNTED_FOR["in_chans"], COUNTED_FOR["img_size"])
        assert info.parameters == count_parameters(model), name
        assert info.description and "\n" not in info.description


def test_a_robustbench_name_builds_its_backbone():
    model = timm.create_model("smallcnn_cifar100_l2", num_classes=100, in_chans=3)
    assert type(model).__name__ == "SmallCNN" and model.classifier[-1].out_features == 100
    assert count_parameters(model) == count_parameters(timm.create_model("smallcnn", num_classes=100, in_chans=3))


def test_importing_the_models_again_registers_them_again_quietly():
    """Our package imported anew in one process (timm still loaded) registers the new module's entry
    points, without timm's "Overwriting" warning (which is for two packages claiming one name)."""
    script = (
        "import sys, timm, warnings\n"
        "import at_memorization.models as first\n"
        "for name in [m for m in sys.modules if m.split('.')[0] == 'at_memorization']:\n"
        "    del sys.modules[name]\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    import at_memorization.models as second\n"
        "assert second is not first and timm.models.model_entrypoint('wrn28_10') is second.wrn28_10\n"
        "assert isinstance(timm.create_model('wrn28_10_cifar10_linf'), second.WideResNet)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_drop_rate_is_passed_to_models_with_dropout():
    """--drop-rate is timm's drop_rate: smallcnn's classifier dropout follows it; None keeps 0.5."""
    dropouts = lambda model: [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts(build_model("smallcnn", 10, in_chans=1)) == [0.5]
    assert dropouts(build_model("smallcnn", 10, in_chans=1, drop_rate=0.0)) == [0.0]
    # a model without train-mode dropout computes the same in train and eval mode (no BN in smallcnn)
    model = build_model("smallcnn", 10, in_chans=1, drop_rate=0.0)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.train()(x), model.eval()(x))


def test_drop_rate_on_a_model_without_dropout_is_refused():
    with pytest.raises(UnknownModelError) as info:
        build_model("preactresnet18_w16", 10, drop_rate=0.1)
    assert "no dropout" in str(info.value) and "--drop-rate" in str(info.value)
