"""The AWP plugin (pgd-at-awp, trades-awp, pgd-at-te-awp) against the authors' code, csdongxian/AWP.

The reference below is transcribed from csdongxian/AWP@a7acf5d842fccf1bbb4b91644352ce157d370a26
(MIT License, Copyright (c) 2020 wu-dx16): ``AT_AWP/utils_awp.py`` (``diff_in_weights``,
``add_into_weights``, ``AdvWeightPerturb``), ``trades_AWP/utils_awp.py`` (``TradesAWP``) and the
training steps of ``AT_AWP/train_cifar10.py`` and ``trades_AWP/train_trades_cifar.py``, which
restore the weights *after* ``optimizer.step()``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from at_memorization.methods import MethodError, TrainingSetup, get_method
from at_memorization.methods.pgd_at import PGDAT
from at_memorization.plugins.awp import PGDATAWP, PGDATTEAWP, TRADESAWP, awp_weight_names
from at_memorization.training import Callbacks, RunConfig, Trainer, TrainingInterrupted
from subprocess_guard import run_with_hang_guard

from awp_reference import AdvWeightPerturb, TradesAWP
from cli_testing import invoke, subprocess_env, tiny_train_args

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the reference's steps (transcribed)
# AT_AWP/utils_awp.py and trades_AWP/utils_awp.py are in tests/awp_reference.py.
def reference_at_step(model, opt, awp_adversary, X_adv, y, epoch, awp_warmup=0):
    """The body of train_cifar10.py's batch loop after the attack (no mixup, no l1)."""
    model.train()
    awp = None
    if epoch >= awp_warmup:
        awp = awp_adversary.calc_awp(inputs_adv=X_adv, targets=y)
        awp_adversary.perturb(awp)
    robust_output = model(X_adv)
    robust_loss = nn.CrossEntropyLoss()(robust_output, y)
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    if epoch >= awp_warmup:
        awp_adversary.restore(awp)
    return awp


def reference_trades_step(model, optimizer, awp_adversary, x_natural, x_adv, target, epoch, beta, awp_warmup):
    """The body of train_trades_cifar.py's train() after perturb_input (epochs counted from 1)."""
    model.train()
    awp = None
    if epoch >= awp_warmup:
        awp = awp_adversary.calc_awp(inputs_adv=x_adv, inputs_clean=x_natural, targets=target, beta=beta)
        awp_adversary.perturb(awp)
    optimizer.zero_grad()
    logits_adv = model(x_adv)
    loss_robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(model(x_natural), dim=1),
                           reduction='batchmean')
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, target)
    loss = loss_natural + beta * loss_robust
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if epoch >= awp_warmup:
        awp_adversary.restore(awp)
    return awp


# --------------------------------------------------------------------------- a tiny model, our step
class TinyBN(nn.Module):
    """Conv + BatchNorm + a 2-D parameter without "weight" in its name (never perturbed) + Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.mix = nn.Parameter(torch.eye(4) + 0.1 * torch.randn(4, 4))
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        h = torch.einsum("nchw,cd->ndhw", h, self.mix)
        return self.fc(h.flatten(1))


PERTURBED = {"conv.weight", "fc.weight"}


def _setup(epochs=3):
    return TrainingSetup(num_samples=16, num_classes=10, epochs=epochs, eps=0.1, step_size=0.05, steps=2)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g), torch.arange(16)


def our_step(method, model, opt, x, y, index, epoch, x_adv=None):
    """The trainer's order: attack, train(), before_loss, loss, zero_grad, backward, before_step, step."""
    if x_adv is None:
        x_adv = method.attack(model, x, y, index, epoch)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.before_loss(model, x, x_adv, y, index, epoch)
    perturbation = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    loss, logs = method.loss(model, x, x_adv, y, index, epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.before_step(model, opt, epoch)
    opt.step()
    return x_adv, perturbation, logs


def _sgd(model, lr=0.1, wd=5e-4):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)


def _assert_params_close(ours, ref, atol=1e-6):
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- (a) against the reference
@pytest.mark.parametrize("method_name", ["pgd-at-awp", "trades-awp"])
@pytest.mark.parametrize("weight_decay", [5e-4, 5e-2])  # 5e-2: the step-at-perturbed-weights decay shows at 1e-6
def test_steps_equal_the_reference(method_name, weight_decay):
    torch.manual_seed(0)
    ours = TinyBN()
    ref = copy.deepcopy(ours)
    proxy = TinyBN()  # the reference builds a second model; load_state_dict overwrites it
    method = get_method(method_name)(_setup())
    trades = method_name == "trades-awp"
    gamma = 0.005 if trades else 0.01  # the reference's defaults
    assert method.extension("awp").gamma == gamma and method.extension("awp").warmup == 0
    opt, ref_opt = _sgd(ours, wd=weight_decay), _sgd(ref, wd=weight_decay)
    # train_cifar10.py: SGD(proxy, lr=0.01); train_trades_cifar.py: SGD(proxy, lr=args.lr), here 0.1.
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=0.1 if trades else 0.01)
    adversary = (TradesAWP if trades else AdvWeightPerturb)(model=ref, proxy=proxy, proxy_optim=proxy_opt, gamma=gamma)

    for step in range(3):  # momentum buffers come in from the second step
        x, y, index = _batch(step)
        x_adv, perturbation, _ = our_step(method, ours, opt, x, y, index, epoch=1)
        if trades:
            awp = reference_trades_step(ref, ref_opt, adversary, x, x_adv, y, epoch=1, beta=6.0, awp_warmup=0)
        else:
            awp = reference_at_step(ref, ref_opt, adversary, x_adv, y, epoch=0, awp_warmup=0)
        assert set(awp) == PERTURBED
        for name, delta in perturbation.items():  # the perturbation per layer
            if name in PERTURBED:
                assert delta.abs().max() > 0
                torch.testing.assert_close(delta, gamma * awp[name], rtol=1e-4, atol=1e-8)
            else:  # BatchNorm, biases, the 2-D "mix" parameter
                assert torch.equal(delta, torch.zeros_like(delta)), name
        _assert_params_close(ours, ref)  # the weights after the whole step
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                       rtol=0, atol=1e-5)
        if not trades:  # TRADES' reference makes one more clean forward pass (BatchNorm statistics)
            for name, buffer in ours.named_buffers():
                torch.testing.assert_close(buffer, dict(ref.named_buffers())[name], rtol=0, atol=1e-6)
    # The proxy keeps no state to checkpoint: SGD without momentum, and nothing in the method's state.
    assert method.extension("awp")._proxy_optimizer.state_dict()["state"] == {}
    assert method.state_dict() == {}


@pytest.mark.parametrize("method_name", ["pgd-at-awp", "trades-awp"])
def test_calc_awp_equals_the_reference_per_layer(method_name):
    torch.manual_seed(1)
    model = TinyBN()
    proxy = TinyBN()
    x, y, index = _batch(5)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    method = get_method(method_name)(_setup())
    ours = method.extension("awp").calc_awp(model, x, x_adv, y, index, 1)
    if method_name == "trades-awp":
        ref = TradesAWP(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.1), 0.005).calc_awp(x_adv, x, y, 6.0)
    else:
        ref = AdvWeightPerturb(model, proxy, torch.optim.SGD(proxy.parameters(), lr=0.01), 0.01).calc_awp(x_adv, y)
    assert list(ours) == list(ref) == ["conv.weight", "fc.weight"] == awp_weight_names(model)
    for name in ref:
        # (TRADES: one clean forward pass and trades_kl's log-target form; equal up to rounding)
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-6)
        # scaled to the layer's norm
        assert ours[name].norm().item() == pytest.approx(dict(model.named_parameters())[name].norm().item(), rel=1e-5)


@pytest.mark.parametrize("method_name", ["pgd-at-awp", "trades-awp"])
def test_trainer_steps_equal_the_reference(method_name, mnist_dir, tmp_path):
    """Through ``Trainer.train_epoch`` (its hooks, its SGD): two steps, each compared with the reference
    applied to the same adversarial examples."""
    trades = method_name == "trades-awp"
    config = RunConfig(method=method_name, dataset="mnist", data_dir=str(mnist_dir), model="smallcnn", drop_rate=0.0,
                       epochs=2, batch_size=32, lr=0.05, milestones=[2], eps=0.1, step_size=0.05, steps=2,
                       eval_steps=1, train_size=64, test_size=16, seed=3)
    trainer = Trainer(config, tmp_path / "run")
    try:
        ref = copy.deepcopy(trainer.model)
        proxy = copy.deepcopy(trainer.model)
        seen = []
        attack = trainer.method.attack

        def recording_attack(model, x, y, index, epoch):
            x_adv = attack(model, x, y, index, epoch)
            seen.append((x.clone(), x_adv.clone(), y.clone()))
            return x_adv

        trainer.method.attack = recording_attack
        trainer.train_epoch(1)
    finally:
        trainer.close()
    assert len(seen) == 2
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    # train_trades_cifar.py gives the proxy the run's lr; the rescaling to ||w|| cancels it anyway.
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=0.05 if trades else 0.01)
    gamma = 0.005 if trades else 0.01
    adversary = (TradesAWP if trades else AdvWeightPerturb)(model=ref, proxy=proxy, proxy_optim=proxy_opt, gamma=gamma)
    for x, x_adv, y in seen:
        if trades:
            reference_trades_step(ref, ref_opt, adversary, x, x_adv, y, epoch=1, beta=6.0, awp_warmup=0)
        else:
            reference_at_step(ref, ref_opt, adversary, x_adv, y, epoch=0, awp_warmup=0)
    _assert_params_close(trainer.model, ref)
    assert not torch.equal(trainer.model.features[0].weight, proxy.features[0].weight)  # it trained


# --------------------------------------------------------------------------- (b) warm-up, defaults, settings
def test_before_the_warmup_the_step_is_plain_pgd_at():
    torch.manual_seed(2)
    start = TinyBN()
    awp_model, plain_model = copy.deepcopy(start), copy.deepcopy(start)
    awp = PGDATAWP(_setup(epochs=3), awp_warmup=1)
    plain = PGDAT(_setup(epochs=3))
    awp_opt, plain_opt = _sgd(awp_model), _sgd(plain_model)
    x, y, index = _batch(3)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert awp.on_epoch_start(1) == {"awp_gamma_now": 0.0} and awp.on_epoch_start(2) == {"awp_gamma_now": 0.01}
    _, perturbation, _ = our_step(awp, awp_model, awp_opt, x, y, index, 1, x_adv=x_adv)
    our_step(plain, plain_model, plain_opt, x, y, index, 1, x_adv=x_adv)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in perturbation.values())
    assert awp.extension("awp")._proxy is None  # no proxy work during the warm-up
    for p, q in zip(awp_model.parameters(), plain_model.parameters()):
        assert torch.equal(p, q)
    # From epoch 2 on (awp_warmup + 1) AWP perturbs, and the step differs from PGD-AT's.
    _, perturbation, _ = our_step(awp, awp_model, awp_opt, x, y, index, 2, x_adv=x_adv)
    our_step(plain, plain_model, plain_opt, x, y, index, 2, x_adv=x_adv)
    assert perturbation["conv.weight"].abs().max() > 0
    assert not torch.equal(awp_model.conv.weight, plain_model.conv.weight)


def test_gamma_zero_is_plain_pgd_at():
    torch.manual_seed(4)
    a, b = TinyBN(), TinyBN()
    b.load_state_dict(a.state_dict())
    off, plain = PGDATAWP(_setup(), awp_gamma=0.0), PGDAT(_setup())
    x, y, index = _batch(4)
    x_adv = x.flip(0)
    opt_a, opt_b = _sgd(a), _sgd(b)
    for epoch in (1, 2, 3):
        our_step(off, a, opt_a, x, y, index, epoch, x_adv=x_adv)
        our_step(plain, b, opt_b, x, y, index, epoch, x_adv=x_adv)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_defaults_are_the_references_and_settings_are_checked():
    assert PGDATAWP(_setup(200)).settings == {"awp_gamma": 0.01, "awp_warmup": 0}
    trades = TRADESAWP(_setup(200))
    assert trades.settings == {"beta": 6.0, "awp_gamma": 0.005, "awp_warmup": 9}  # epoch >= 10 of 1..200
    assert not trades.extension("awp").active(9) and trades.extension("awp").active(10)
    short = TRADESAWP(_setup(100))
    assert short.settings["awp_warmup"] == 4 and "starts at epoch 5" in short.notes[0]
    assert TRADESAWP(_setup(2)).settings["awp_warmup"] == 0
    te = PGDATTEAWP(_setup(200))
    assert te.settings["awp_gamma"] == 0.01 and te.settings["te_start"] == 90
    assert TRADESAWP(_setup(10), awp_gamma=0.02, awp_warmup=3).settings["awp_gamma"] == 0.02
    for bad, words in (({"awp_gamma": -0.1}, "--awp-gamma"), ({"awp_gamma": float("nan")}, "--awp-gamma"),
                       ({"awp_warmup": -1}, "--awp-warmup"), ({"awp_warmup": 3}, "never switch on")):
        with pytest.raises(MethodError, match=words):
            PGDATAWP(_setup(3), **bad)
    PGDATAWP(_setup(3), awp_gamma=0.0, awp_warmup=3)  # AWP off: any warm-up is fine
    with pytest.raises(MethodError, match="awp_gamma"):
        PGDAT(_setup(), awp_gamma=0.01)  # plain PGD-AT has no AWP setting


def test_methods_are_registered_through_entry_points():
    declared = {ep.name: ep.value for ep in entry_points(group="at_memorization.methods")}
    assert declared["pgd-at-awp"] == "at_memorization.plugins.awp.methods:PGDATAWP"
    assert declared["trades-awp"] == "at_memorization.plugins.awp.methods:TRADESAWP"
    assert declared["pgd-at-te-awp"] == "at_memorization.plugins.awp.methods:PGDATTEAWP"
    assert get_method("pgd-at-te-awp") is PGDATTEAWP
    flags = [h.flag for h in PGDATTEAWP.hyperparameters]
    assert flags == ["--te-momentum", "--te-weight", "--te-start", "--te-end", "--awp-gamma", "--awp-warmup"]


# --------------------------------------------------------------------------- (c) AWP on top of PGD-AT+TE
def test_pgd_at_te_awp_composes_the_hooks_and_te():
    torch.manual_seed(5)
    model = TinyBN()
    method = PGDATTEAWP(_setup(epochs=3), te_start=1, te_end=2, te_weight=30.0)
    # PGD-AT with two extensions, composed by declaration (no class of its own in between)
    assert type(method).__mro__[1] is PGDAT and [e.key for e in type(method).extensions] == ["te", "awp"]
    assert set(method.on_epoch_start(2)) == {"te_weight_now", "awp_gamma_now"}
    assert method.on_epoch_start(2)["awp_gamma_now"] == 0.01
    opt = _sgd(model)
    x, y, index = _batch(6)
    start = copy.deepcopy(model.state_dict())
    for epoch in (1, 2, 2):
        x_adv, perturbation, logs = our_step(method, model, opt, x, y, index, epoch)
        assert perturbation["conv.weight"].abs().max() > 0
        assert math.isfinite(logs["te_loss"].item())
    assert logs["te_loss"].item() > 0
    assert method.extension("te").te.ensemble[index].sum(1).gt(0).all()  # the ensemble was updated
    assert not torch.equal(start["conv.weight"], model.conv.weight)
    # The proxy ascends the method's own loss, TE penalty included: not PGD-AT-AWP's perturbation.
    plain = PGDATAWP(_setup(epochs=3))
    with_te = method.extension("awp").calc_awp(model, x, x_adv, y, index, 2)
    without = plain.extension("awp").calc_awp(model, x, x_adv, y, index, 2)
    assert not torch.allclose(with_te["conv.weight"], without["conv.weight"])
    # Only TE's ensemble goes into the checkpoint, not the proxy.
    assert set(method.state_dict()) == {"te"}


def test_before_step_restores_exactly_and_decays_the_perturbation():
    """The weights come back bit for bit; the gradient gets weight_decay * (perturbation), the decay
    the reference's step applies at the perturbed weights."""
    torch.manual_seed(6)
    model = TinyBN()
    method = PGDATAWP(_setup())
    opt = _sgd(model, wd=0.1)
    x, y, index = _batch(7)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    model.train()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.before_loss(model, x, x_adv, y, index, 1)
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.equal(perturbed["fc.weight"], original["fc.weight"])
    method.loss(model, x, x_adv, y, index, 1)[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.before_step(model, opt, 1)
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), name
        expected = grads[name] + 0.1 * (perturbed[name] - original[name]) if name in PERTURBED else grads[name]
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-7)
    method.before_step(model, opt, 1)  # nothing pending: a no-op
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- (d) the CLI on MNIST
CLI = {"epochs": 2, "steps": 2}  # the tiny MNIST run's settings changed here


@pytest.mark.parametrize("method", ["pgd-at-awp", "trades-awp", "pgd-at-te-awp"])
def test_cli_trains_each_method_for_two_epochs(method, mnist_dir, tmp_path):
    run = tmp_path / method
    result = invoke("train", *tiny_train_args(mnist_dir, run, method=method, **CLI))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        for key in ("train_loss", "grad_norm", "test_clean_acc", "test_robust_acc"):
            assert math.isfinite(record[key]), (key, record)
        assert record["awp_gamma_now"] == (0.005 if method == "trades-awp" else 0.01)  # on from epoch 1
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["method"]["name"] == method
    assert {"awp_gamma", "awp_warmup"} <= set(state["method"]["config"])
    assert set(state["method"]["state"]) == ({"te"} if method == "pgd-at-te-awp" else set())  # no proxy
    if method == "trades-awp":
        assert "AWP starts at epoch 1" in result.output  # 2 epochs: 9 * 2 // 200 = 0 warm-up epochs


# --------------------------------------------------------------------------- (e) exact resume
@pytest.mark.parametrize("method, extra", [("pgd-at-awp", {}), ("trades-awp", {}),
                                           ("pgd-at-te-awp", {"te_start": 1, "te_end": 2})])
def test_resume_after_epoch_one_is_exact(method, extra, mnist_dir, tmp_path):
    # smallcnn keeps its dropout: the proxy's forward passes draw from the saved random streams too.
    config = RunConfig(method=method, method_args=extra, dataset="mnist", data_dir=str(mnist_dir), model="smallcnn",
                       epochs=2, batch_size=32, lr=0.05, milestones=[1], eps=0.1, step_size=0.05, steps=2,
                       eval_steps=1, train_size=64, test_size=16, seed=1)
    Trainer(config, tmp_path / "full").fit()

    holder = {}

    def stop_after_epoch(record):
        if record["epoch"] == 1:
            holder["trainer"].request_stop("test")

    holder["trainer"] = Trainer(config, tmp_path / "cut", callbacks=Callbacks(epoch_end=stop_after_epoch))
    with pytest.raises(TrainingInterrupted):
        holder["trainer"].fit()
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 1
    Trainer(config, tmp_path / "cut", resume=True).fit()

    full = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert full["epoch"] == cut["epoch"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    assert torch.equal(full["optimizer"]["state"][0]["momentum_buffer"], cut["optimizer"]["state"][0]["momentum_buffer"])
    if method == "pgd-at-te-awp":
        assert torch.equal(full["method"]["state"]["te"]["ensemble"], cut["method"]["state"]["te"]["ensemble"])


# --------------------------------------------------------------------------- (f) two processes (torchrun, gloo)
WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import at_memorization.cli as cli
    import at_memorization.training as training

    dist.init_process_group("gloo")
    trainers = []
    original_fit = training.Trainer.fit

    def fit(self):
        trainers.append(self)
        return original_fit(self)

    training.Trainer.fit = fit
    cli.main(["train", *sys.argv[2:]], standalone_mode=False)
    flat = torch.cat([p.detach().reshape(-1) for p in trainers[0].model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump({"ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered)}, handle)
    del flat, gathered
    trainers.pop().shutdown()  # drops DDP (which holds gloo's threads) before the group goes (else exit -6)
    dist.barrier()  # tear down together: a rank leaving gloo early can abort the other (exit -6)
    dist.destroy_process_group()
""")


def test_two_process_torchrun_run(mnist_dir, tmp_path):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    env = subprocess_env()
    args = tiny_train_args(mnist_dir, None, method="pgd-at-awp", **CLI)
    # The torchrun command of the README, `-m at_memorization train`. (Run from tmp_path: a stale
    # at_memorization.egg-info in the repository root would shadow the installed entry points.)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "at_memorization", "train", *args, "--out", str(tmp_path / "run")]
    result = run_with_hang_guard(command, cwd=tmp_path, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in records)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2
    # The same run in a worker that then compares every process's weights: the proxy's gradients
    # are averaged over the processes, so all apply one perturbation (and one weight-decay term).
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "ranks.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(out), *args, "--out", str(tmp_path / "run2")]
    result = run_with_hang_guard(command, cwd=tmp_path, env=env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert json.loads(out.read_text())["ranks_identical"]
