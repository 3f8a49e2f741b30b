"""The MART plugin (``--method mart``) against the authors' code, and end to end.

Reference: github.com/YisenWang/MART at commit 2d83e17b381dd2ee52223695e517bf6d5ff09c2c, ``mart.py``
(``mart_loss``: the attack and the loss in one function); defaults there and in
``train_wideresnet.py``: beta 6.0, epsilon 0.031, step size 0.007, 10 steps (``train_resnet.py``:
beta 5.0).
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable

from at_memorization.methods import TrainingSetup, discover, get_method
from at_memorization.methods.base import MethodError
from cli_testing import assert_one_line_error, invoke, subprocess_env, tiny_train_args
from subprocess_guard import run_with_hang_guard

ENV = subprocess_env()


# --------------------------------------------------------------------------- the reference
def reference_mart_loss(model, x_natural, y, optimizer, step_size=0.007, epsilon=0.031, perturb_steps=10,
                        beta=6.0, distance='l_inf'):
    """``mart.py``'s ``mart_loss``, line for line. Changes: ``.cuda()`` -> ``.to(x_natural.device)``
    (the noise is still drawn on the host), and it also returns ``x_adv`` and whether the top class
    was the label (to check that both branches of ``new_y`` ran)."""
    kl = nn.KLDivLoss(reduction='none')
    model.eval()
    batch_size = len(x_natural)
    # generate adversarial example
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).to(x_natural.device).detach()
    if distance == 'l_inf':
        for _ in range(perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_ce = F.cross_entropy(model(x_adv), y)
            grad = torch.autograd.grad(loss_ce, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    else:
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()

    x_adv = Variable(torch.clamp(x_adv, 0.0, 1.0), requires_grad=False)
    # zero gradient
    optimizer.zero_grad()

    logits = model(x_natural)

    logits_adv = model(x_adv)

    adv_probs = F.softmax(logits_adv, dim=1)

    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]

    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])

    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)

    nat_probs = F.softmax(logits, dim=1)

    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()

    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    loss = loss_adv + float(beta) * loss_robust

    return loss, x_adv, tmp1[:, -1] == y


class TinyBNNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 7 * 7, num_classes))

    def forward(self, x):
        return self.net(x)


def _batch(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 14, 14, generator=g)
    x[:, :, :3] = 0.0  # pixels at the bounds, as in MNIST: the unclamped start and the clamps matter
    x[:, :, -3:] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("seed,beta,eps,step,steps", [
    (0, 6.0, 0.031, 0.007, 10),  # the reference's defaults
    (1, 6.0, 0.3, 0.1, 4),       # large steps: the eps-ball projection and the [0, 1] clamp both bind
    (2, 2.5, 8 / 255, 2 / 255, 3),
    (3, 0.0, 0.1, 0.05, 1),
])
def test_attack_loss_and_gradients_equal_the_reference(seed, beta, eps, step, steps):
    torch.manual_seed(100 + seed)
    ref_model = TinyBNNet()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and running statistics
        for m in ref_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    ours_model = copy.deepcopy(ref_model)
    x, y = _batch(seed)
    with torch.no_grad():  # half the labels are the model's own prediction: both branches of new_y
        y[::2] = ref_model.eval()(x[::2]).argmax(1)
    index = torch.arange(len(y))
    optimizer = torch.optim.SGD(ref_model.parameters(), lr=0.1)

    torch.manual_seed(seed)
    ref_loss, ref_adv, top_is_label = reference_mart_loss(ref_model, x, y, optimizer, step_size=step, epsilon=eps,
                                                          perturb_steps=steps, beta=beta)
    ref_loss.backward()

    method = get_method("mart")(TrainingSetup(num_samples=len(y), num_classes=10, epochs=1, eps=eps,
                                              step_size=step, steps=steps), mart_beta=beta)
    ours_model.train()
    torch.manual_seed(seed)
    x_adv = method.attack(ours_model, x, y, index, 1)
    assert ours_model.training  # the attack ran in eval mode and restored train mode
    loss, logs = method.loss(ours_model, x, x_adv, y, index, 1)
    loss.backward()

    assert torch.equal(x_adv, ref_adv)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6), (loss.item(), ref_loss.item())
    assert set(logs) == {"train_adv_acc", "mart_adv_loss", "mart_kl_loss"}
    assert torch.allclose(logs["mart_adv_loss"] + beta * logs["mart_kl_loss"], loss)
    for (name, p), q in zip(ref_model.named_parameters(), ours_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(ref_model.named_buffers(), ours_model.buffers()):
        assert torch.equal(b, c), name  # same forward passes in the same order and modes
    if eps < 0.3:  # small eps: some top classes on x_adv are still the label; both branches of new_y ran
        assert top_is_label.any() and not top_is_label.all()


def test_attack_starts_unclamped_like_the_reference():
    """mart.py feeds ``x + 0.001 * randn`` to the first step without clamping it to [0, 1]."""
    from at_memorization.plugins.mart import MARTPGD

    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :10] * 1.0

    x = torch.zeros(4, 1, 4, 4)
    attack = MARTPGD(Recorder(), eps=0.1, alpha=0.01, steps=1)
    torch.manual_seed(0)
    out = attack(x, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(0)
    assert torch.equal(seen[0], 0.001 * torch.randn(x.shape))
    assert seen[0].min() < 0 and out.min() >= 0


def test_loss_gradient_stays_finite_when_a_clean_probability_underflows():
    """The one deliberate difference: the reference's KL form gives NaN clean-logit gradients there."""
    from at_memorization.plugins.mart import mart_loss

    y = torch.tensor([1, 0])
    clean = torch.tensor([[0.0, 200.0, -10.0], [3.0, 1.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 0.0]], requires_grad=True)
    loss = mart_loss(clean, adv, y, beta=6.0)
    loss.backward()
    assert torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()

    nat_probs = F.softmax(clean, dim=1)
    adv_probs = F.softmax(adv, dim=1)
    ref_kl = nn.KLDivLoss(reduction='none')(torch.log(adv_probs + 1e-12), nat_probs).sum(1)
    ours_kl = F.kl_div(torch.log(adv_probs + 1e-12), F.log_softmax(clean, 1), reduction="none", log_target=True).sum(1)
    assert torch.allclose(ref_kl, ours_kl)  # the same value
    (ref_grad,) = torch.autograd.grad(ref_kl.sum(), clean)
    assert torch.isnan(ref_grad).any()  # the failure avoided


def test_loss_under_bf16_autocast_is_float32():
    method = get_method("mart")(TrainingSetup(num_samples=8, num_classes=10, epochs=1, steps=2))
    model = TinyBNNet()
    x, y = _batch(5, n=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = method.attack(model, x, y, torch.arange(8), 1)
        model.train()
        loss, logs = method.loss(model, x, x_adv, y, torch.arange(8), 1)
    assert x_adv.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------- the method's settings
def test_registered_through_the_entry_point_with_its_own_setting():
    assert discover()["mart"].value == "at_memorization.plugins.mart.methods:MART"
    cls = get_method("mart")
    assert [(h.name, h.flag, h.default) for h in cls.hyperparameters] == [("mart_beta", "--mart-beta", 6.0)]
    assert cls.hyperparameters[0].help == "MART: weight of the misclassification-aware KL term"
    result = invoke("methods")
    assert result.exit_code == 0
    line = next(l for l in result.output.splitlines() if l.startswith("mart "))
    assert "at_memorization.plugins.mart" in line and "--mart-beta" in result.output
    setup = TrainingSetup(num_samples=4, num_classes=10, epochs=1)
    assert cls(setup).settings == {"mart_beta": 6.0}
    with pytest.raises(MethodError, match="takes no setting beta"):
        cls(setup, beta=6.0)
    with pytest.raises(MethodError, match="Linf threat model only"):
        cls(TrainingSetup(num_samples=4, num_classes=10, epochs=1, norm="L2"))
    attack = cls(setup).make_attack(TinyBNNet())
    assert (attack.eps, attack.alpha, attack.steps) == (8 / 255, 2 / 255, 10)


def _args(mnist_dir, out, *extra, epochs=2):
    return ["train", *tiny_train_args(mnist_dir, out, *extra, method="mart", epochs=epochs, steps=2)]


@pytest.mark.parametrize("flags,words", [
    (["--beta", "6"], ["--beta does not apply to method mart", "trades"]),
    (["--mart-beta", "-1"], ["--mart-beta must be >= 0, got -1"]),
    (["--mart-beta", "nan"], ["--mart-beta must be a finite number"]),
    (["--mart-beta", "inf"], ["--mart-beta must be a finite number"]),
    (["--norm", "L2"], ["mart supports the Linf threat model only"]),
])
def test_bad_settings_are_refused_with_one_line(flags, words, mnist_dir, tmp_path):
    assert_one_line_error(invoke(*_args(mnist_dir, tmp_path / "run", *flags)), *words)
    assert not (tmp_path / "run").exists()


def test_mart_beta_is_refused_for_trades(mnist_dir, tmp_path):
    args = _args(mnist_dir, tmp_path / "run", "--mart-beta", "6")
    args[args.index("mart")] = "trades"
    assert_one_line_error(invoke(*args), "--mart-beta does not apply to method trades", "mart")


# --------------------------------------------------------------------------- end to end
def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_finite(records):
    for record in records:
        for key, value in record.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, record)


def test_cli_training_run(mnist_dir, tmp_path):
    run = tmp_path / "run"
    result = invoke(*_args(mnist_dir, run, "--mart-beta", "6"))
    assert result.exit_code == 0, result.output
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    _assert_finite(records)
    for key in ("train_loss", "train_adv_acc", "mart_adv_loss", "mart_kl_loss", "test_clean_acc", "test_robust_acc"):
        assert key in records[0], key
    assert records[0]["mart_kl_loss"] >= 0
    assert json.loads((run / "config.json").read_text())["method"] == {"mart_beta": 6.0}
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["method"]["name"] == "mart" and last["method"]["config"] == {"mart_beta": 6.0}


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(mnist_dir, tmp_path):
    from at_memorization.training import Callbacks, RunConfig, Trainer, TrainingInterrupted

    def config():
        return RunConfig(method="mart", dataset="mnist", data_dir=str(mnist_dir), model="preactresnet18_w16",
                         epochs=2, train_size=64, test_size=16, batch_size=32, steps=2, eval_steps=1,
                         milestones=[1], method_args={"mart_beta": 3.0})

    Trainer(config(), tmp_path / "full", device="cpu").fit()

    callbacks = Callbacks()
    cut = Trainer(config(), tmp_path / "cut", device="cpu", callbacks=callbacks)
    callbacks.epoch_end = lambda record: cut.request_stop("test") if record["epoch"] == 1 else None
    with pytest.raises(TrainingInterrupted) as stopped:
        cut.fit()
    assert stopped.value.saved and stopped.value.epoch == 2
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = Trainer(config(), tmp_path / "cut", device="cpu", resume=True)
    assert resumed.start_epoch == 2
    resumed.fit()

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    again = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert again["epoch"] == full["epoch"] == 2
    for name, tensor in full["model"].items():  # weights and BatchNorm statistics
        assert torch.equal(tensor, again["model"][name]), name
    drop = ("train_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / "full")]
            == [{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / "cut")])


def test_two_process_gloo_run_under_torchrun(mnist_dir, tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    run = tmp_path / "ddp"
    args = _args(mnist_dir, run, "--mart-beta", "6", epochs=1)
    args[args.index("smallcnn")] = "preactresnet18_w16"  # BatchNorm: two forward passes per step under DDP
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "at_memorization", *args]
    # Not the repository root: `python -m` puts the working folder first on sys.path, where a stale, ignored
    # at_memorization.egg-info (from an older build; `pip install -e` does not refresh it) would hide
    # the installed entry points, this plugin's among them.
    result = run_with_hang_guard(command, cwd=tmp_path, env=ENV)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1]
    _assert_finite(records)
    assert "mart_kl_loss" in records[0]
    saved = json.loads((run / "config.json").read_text())
    assert saved["world_size"] == 2 and saved["method"] == {"mart_beta": 6.0}
