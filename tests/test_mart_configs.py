"""configs/cifar10-*-mart.toml resolve to the settings of MART's reference code,
github.com/YisenWang/MART at 2d83e17b381dd2ee52223695e517bf6d5ff09c2c (train_wideresnet.py,
train_resnet.py, mart.py), the numbers written out below as read there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_testing import invoke

from at_memorization.training import RunConfig, learning_rate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The reference's argparse defaults and model per script; milestones from its adjust_learning_rate
# (lr x0.1 once epoch >= 75, x0.01 >= 90, x0.001 >= 100, epochs from 1).
REFERENCE = {
    "cifar10-wrn34-10-mart": dict(model="wrn34_10", epochs=90, lr=0.1, weight_decay=7e-4, beta=6.0),
    "cifar10-resnet18-mart": dict(model="resnet18_cifar", epochs=120, lr=0.01, weight_decay=3.5e-3, beta=5.0),
}


def reference_lr(base, epoch):  # adjust_learning_rate in train_wideresnet.py / train_resnet.py
    lr = base
    if epoch >= 100:
        lr = base * 0.001
    elif epoch >= 90:
        lr = base * 0.01
    elif epoch >= 75:
        lr = base * 0.1
    return lr


@pytest.mark.parametrize("stem", sorted(REFERENCE))
def test_mart_config_resolves_to_the_reference(stem):
    path = CONFIGS / f"{stem}.toml"
    assert path.read_text().startswith("# Source: ") and "2d83e17b381dd2ee52223695e517bf6d5ff09c2c" in path.read_text()
    result = invoke("train", "--config", path, "--print-config")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    config, method = printed["config"], printed["method"]
    ref = REFERENCE[stem]
    assert config["method"] == "mart" and config["dataset"] == "cifar10" and config["model"] == ref["model"]
    assert (config["epochs"], config["lr"], config["weight_decay"], config["momentum"], config["batch_size"]) == (
        ref["epochs"], ref["lr"], ref["weight_decay"], 0.9, 128)
    assert (config["eps"], config["step_size"], config["steps"], config["norm"]) == (0.031, 0.007, 10, "Linf")
    assert config["attack_bn"] == "eval"  # mart.py: model.eval() before the attack
    assert config["augment"] is True and config["label_noise"] == 0.0 and config["schedule"] == "step"
    assert method == {"mart_beta": ref["beta"]}
    run = RunConfig(**{k: v for k, v in config.items()})
    for epoch in range(1, ref["epochs"] + 1):  # the whole schedule, epoch by epoch
        assert learning_rate(run, epoch) == pytest.approx(reference_lr(ref["lr"], epoch), rel=1e-12), epoch
