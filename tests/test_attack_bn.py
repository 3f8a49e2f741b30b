"""``--attack-bn train|eval``: the model's mode during the training attack.

Against the references' step order, through ``Trainer.train_epoch`` (the place the setting is
applied) on a tiny BatchNorm network:

* ``pgd-at-awp`` with ``attack_bn="train"`` against csdongxian/AWP@a7acf5d842fccf1bbb4b91644352ce157d370a26
  ``AT_AWP/train_cifar10.py`` (``attack_pgd`` with the model in train mode, then ``model.train()``,
  ``calc_awp`` on the proxy, ``perturb``, forward/backward, ``opt.step()``, ``restore``);
* ``pgd-at`` with ``attack_bn="train"`` against locuslab/robust_overfitting@c47a25c
  ``train_cifar.py`` (``model.train()`` at the start of the epoch, ``attack_pgd``, forward/backward,
  ``opt.step()``).

Both references make two more train-mode forward passes per step that the package does not make:
``attack_pgd``'s last ``model(X + delta)`` (its restart selection, also run with one restart) and the
clean ``output = model(normalize(X))`` after the step (for the logged training accuracy). Neither
changes the weights (a train-mode forward normalizes with the batch's own statistics, never the
running ones), but both update BatchNorm's running statistics. The transcription below has both,
switched by ``extra_forwards``: the package equals the reference without them, to 1e-6, weights and
running statistics; with them the running statistics differ (docs/differences.md).
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

from at_memorization.settings import SETTINGS_BY_NAME, RunConfig, SettingError, read_settings
from at_memorization.training import Callbacks, Trainer, TrainingInterrupted, resume_config
from awp_reference import AdvWeightPerturb
from cli_testing import assert_one_line_error, invoke, tiny_train_args


# --------------------------------------------------------------------------- a tiny BatchNorm network
class TinyBNNet(nn.Module):
    """Two stride-2 conv + BatchNorm blocks and a linear layer (28x28 MNIST in, 10 logits out)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 4, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


MODEL = "attack_bn_test_tinybn"
if not timm.is_model(MODEL):
    def attack_bn_test_tinybn(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, num_classes=10,
                              in_chans=3, **kwargs):
        return TinyBNNet(num_classes=num_classes, in_chans=in_chans)

    register_model(attack_bn_test_tinybn)


# --------------------------------------------------------------------------- the references (transcribed)
# AT_AWP/train_cifar10.py and robust_overfitting/train_cifar.py; normalize() is the identity here
# (our models take [0, 1] inputs), one restart, Linf, no mixup, no l1, no early stop.
upper_limit, lower_limit = 1, 0


def clamp(X, lower_limit, upper_limit):
    return torch.max(torch.min(X, upper_limit), lower_limit)


def attack_pgd(model, X, y, epsilon, alpha, attack_iters, restarts, final_forward=True):
    max_loss = torch.zeros(y.shape[0])
    max_delta = torch.zeros_like(X)
    for _ in range(restarts):
        delta = torch.zeros_like(X)
        delta.uniform_(-epsilon, epsilon)
        delta = clamp(delta, lower_limit - X, upper_limit - X)
        delta.requires_grad = True
        for _ in range(attack_iters):
            output = model(X + delta)
            index = slice(None, None, None)
            loss = F.cross_entropy(output, y)
            loss.backward()
            grad = delta.grad.detach()
            d = delta[index, :, :, :]
            g = grad[index, :, :, :]
            x = X[index, :, :, :]
            d = torch.clamp(d + alpha * torch.sign(g), min=-epsilon, max=epsilon)
            d = clamp(d, lower_limit - x, upper_limit - x)
            delta.data[index, :, :, :] = d
            delta.grad.zero_()
        if not final_forward:  # (not in the reference: the package's attack ends here)
            return delta.detach()
        all_loss = F.cross_entropy(model(X + delta), y, reduction='none')
        max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
        max_loss = torch.max(max_loss, all_loss)
    return max_delta


def awp_reference_step(model, opt, awp_adversary, X, y, epsilon, pgd_alpha, attack_iters, extra_forwards):
    """train_cifar10.py's batch loop, args.attack == 'pgd', epoch >= awp_warmup."""
    delta = attack_pgd(model, X, y, epsilon, pgd_alpha, attack_iters, 1, final_forward=extra_forwards)
    delta = delta.detach()
    X_adv = torch.clamp(X + delta[:X.size(0)], min=lower_limit, max=upper_limit)
    model.train()
    awp = awp_adversary.calc_awp(inputs_adv=X_adv, targets=y)
    awp_adversary.perturb(awp)
    robust_output = model(X_adv)
    robust_loss = nn.CrossEntropyLoss()(robust_output, y)
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    awp_adversary.restore(awp)
    if extra_forwards:
        output = model(X)  # the logged training accuracy; a train-mode forward
        del output


def rice_reference_step(model, opt, X, y, epsilon, pgd_alpha, attack_iters, extra_forwards):
    """train_cifar.py's batch loop, args.attack == 'pgd' (model.train() was called at the epoch's start)."""
    delta = attack_pgd(model, X, y, epsilon, pgd_alpha, attack_iters, 1, final_forward=extra_forwards)
    delta = delta.detach()
    robust_output = model(torch.clamp(X + delta[:X.size(0)], min=lower_limit, max=upper_limit))
    robust_loss = nn.CrossEntropyLoss()(robust_output, y)
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    if extra_forwards:
        output = model(X)
        del output


# --------------------------------------------------------------------------- helpers
def _config(mnist_dir, **kwargs) -> RunConfig:
    values = dict(method="pgd-at-awp", dataset="mnist", data_dir=str(mnist_dir), model=MODEL, epochs=2,
                  batch_size=32, lr=0.05, milestones=[2], eps=0.1, step_size=0.04, steps=3, eval_steps=1,
                  train_size=96, test_size=16, seed=3)
    values.update(kwargs)
    return RunConfig(**values)


def _trained(config, out, epochs=(1, 2)):
    """The trainer after ``train_epoch`` of each of ``epochs``, and each step's (x, y, RNG state before
    the attack)."""
    trainer = Trainer(config, out, device="cpu")
    start = copy.deepcopy(trainer.model)
    seen = []
    attack = trainer.method.attack

    def recording_attack(model, x, y, index, epoch):
        seen.append((x.clone(), y.clone(), torch.get_rng_state()))
        return attack(model, x, y, index, epoch)

    trainer.method.attack = recording_attack
    try:
        for epoch in epochs:
            trainer.train_epoch(epoch)
    finally:
        trainer.close()
    return trainer, start, seen


def _differences(ours, ref):
    """max |difference| over the parameters, and over the BatchNorm running statistics."""
    params = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), ref.parameters()))
    buffers = dict(ref.named_buffers())
    stats = max((b - buffers[n]).abs().max().item() for n, b in ours.named_buffers() if n.endswith(("_mean", "_var")))
    counts = [(n, b.item(), buffers[n].item()) for n, b in ours.named_buffers() if n.endswith("num_batches_tracked")]
    return params, stats, counts


def _reference_run(start, seen, method, extra_forwards, config):
    ref = copy.deepcopy(start)
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    if method == "pgd-at-awp":
        proxy = copy.deepcopy(start)  # train_cifar10.py builds a second model; load_state_dict overwrites it
        adversary = AdvWeightPerturb(model=ref, proxy=proxy, proxy_optim=torch.optim.SGD(proxy.parameters(), lr=0.01),
                                     gamma=0.01)
    for x, y, rng in seen:
        torch.set_rng_state(rng)  # the random start draws the same numbers
        if method == "pgd-at-awp":
            awp_reference_step(ref, opt, adversary, x, y, config.eps, config.step_size, config.steps, extra_forwards)
        else:
            rice_reference_step(ref, opt, x, y, config.eps, config.step_size, config.steps, extra_forwards)
    return ref


# --------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("method", ["pgd-at-awp", "pgd-at"])
def test_train_mode_steps_equal_the_reference(method, mnist_dir, tmp_path):
    """Six steps (two epochs of three) through the trainer: weights and BatchNorm running statistics
    equal the reference's (attack in train mode) to 1e-6; in eval mode they do not."""
    config = _config(mnist_dir, method=method, attack_bn="train")
    trainer, start, seen = _trained(config, tmp_path / "train")
    assert len(seen) == 6
    ref = _reference_run(start, seen, method, extra_forwards=False, config=config)
    params, stats, counts = _differences(trainer.model, ref)
    assert params < 1e-6 and stats < 1e-6, (params, stats)
    # every forward pass updated the statistics, as the reference's: 3 attack steps + 1 training forward
    assert all(ours == theirs == 6 * (config.steps + 1) for _, ours, theirs in counts), counts
    assert not torch.equal(trainer.model.fc.weight, start.fc.weight)  # it trained

    # The reference as written (its restart-selection and logged-accuracy forwards): the same weights,
    # other running statistics.
    full = _reference_run(start, seen, method, extra_forwards=True, config=config)
    params, stats, counts = _differences(trainer.model, full)
    assert params < 1e-6 and stats > 1e-4, (params, stats)
    assert all(theirs == 6 * (config.steps + 3) for _, _, theirs in counts), counts

    # eval mode (the package's default): the attack uses and keeps the running statistics, so the
    # statistics, and the adversarial examples, hence the weights, differ from the reference's.
    evaluated, start_eval, seen_eval = _trained(_config(mnist_dir, method=method), tmp_path / "eval")
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), start_eval.parameters()))
    params, stats, counts = _differences(evaluated.model, ref)
    assert params > 1e-4 and stats > 1e-4, (params, stats)
    assert all(ours == 6 for _, ours, _ in counts), counts  # the training forward only


@pytest.mark.parametrize("method, attack_forwards, loss_forwards", [
    ("pgd-at", 3, 1), ("pgd-at-awp", 3, 1), ("pgd-at-te", 3, 1), ("pgd-at-te-awp", 3, 1),
    ("trades", 4, 2), ("trades-awp", 4, 2),
    ("trades-te", 3, 2),  # TRADES' clean target is TE's eval-mode ensemble forward, reused by the attack
    ("mart", 3, 2)])
def test_every_method_attacks_in_the_chosen_mode(method, attack_forwards, loss_forwards, mnist_dir, tmp_path):
    """One step per method: in train mode every attack forward pass (TRADES: also its clean target) updates
    BatchNorm's statistics; in eval mode none does. The model is back in train mode for the loss."""
    te = {"te_start": 1, "te_end": 2} if "-te" in method else {}  # the TE penalty and ensemble from the first step
    counts = {}
    for mode in ("train", "eval"):
        config = _config(mnist_dir, method=method, attack_bn=mode, train_size=32, method_args=te)
        trainer = Trainer(config, tmp_path / mode, device="cpu")
        modes = []
        attack = trainer.method.attack

        def recording_attack(model, x, y, index, epoch):
            x_adv = attack(model, x, y, index, epoch)
            modes.append(all(m.training for m in model.modules()))
            return x_adv

        trainer.method.attack = recording_attack
        try:
            trainer.train_epoch(1)
        finally:
            trainer.close()
        assert modes == [True]  # torchattacks restores the mode it found (train) after the attack
        counts[mode] = {n: b.item() for n, b in trainer.model.named_buffers() if n.endswith("num_batches_tracked")}
    # TE's ensemble forward stays in eval mode (the paper's), so it counts in neither
    assert set(counts["train"].values()) == {attack_forwards + loss_forwards}, counts
    assert set(counts["eval"].values()) == {loss_forwards}, counts


def test_a_model_without_batchnorm_or_dropout_trains_alike_in_both_modes(mnist_dir, tmp_path):
    """smallcnn at drop rate 0 (the MNIST study's network) has no mode-dependent layer: bit-identical;
    with its dropout (0.5) the train-mode attack draws masks, and the runs differ."""
    weights = {}
    for drop_rate in (0.0, 0.5):
        for mode in ("train", "eval"):
            config = _config(mnist_dir, model="smallcnn", drop_rate=drop_rate, attack_bn=mode, train_size=64,
                             epochs=1, milestones=[1])
            trainer, _, _ = _trained(config, tmp_path / f"{drop_rate}-{mode}", epochs=(1,))
            weights[drop_rate, mode] = [p.detach().clone() for p in trainer.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[0.0, "train"], weights[0.0, "eval"]))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0.5, "train"], weights[0.5, "eval"]))


def test_the_compiled_attack_model_gets_the_mode(mnist_dir, tmp_path):
    """With --compile the attack object's model is the compiled module, set to train mode once."""
    trainer = Trainer(_config(mnist_dir, attack_bn="train", compile=True), tmp_path / "run", device="cpu")
    trainer.close()
    attack = trainer.method.make_attack(trainer.attack_model)
    assert attack is trainer.method._attack and attack.model is trainer.attack_model
    assert trainer.attack_model is not trainer.model  # compiled
    assert (attack._model_training, attack._batchnorm_training, attack._dropout_training) == (True, True, True)
    plain = Trainer(_config(mnist_dir), tmp_path / "plain", device="cpu")
    plain.close()
    assert getattr(plain.method, "_attack", None) is None  # eval: nothing set, built on first use as before


# --------------------------------------------------------------------------- settings, resume, CLI
def test_the_setting_is_declared_with_eval_as_default():
    setting = SETTINGS_BY_NAME["attack_bn"]
    assert setting.default == "eval" and setting.choices == ("eval", "train") and setting.overridable
    assert RunConfig().attack_bn == "eval"
    with pytest.raises(SettingError, match="--attack-bn must be one of eval, train"):
        read_settings({"attack_bn": "sideways"}, {}, "file")


def _strip_attack_bn(run):
    """Make ``run`` look saved before the setting existed: no attack_bn in config.json or checkpoints."""
    document = json.loads((run / "config.json").read_text())
    del document["config"]["attack_bn"]
    (run / "config.json").write_text(json.dumps(document, indent=2))
    for name in ("last.pt", "best.pt"):
        path = run / name
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            del state["config"]["attack_bn"]
            torch.save(state, path)


def test_a_run_saved_before_the_setting_resumes_in_eval_mode_bit_identically(mnist_dir, tmp_path):
    config = _config(mnist_dir, train_size=64)
    Trainer(config, tmp_path / "full", device="cpu").fit()
    assert json.loads((tmp_path / "full" / "config.json").read_text())["config"]["attack_bn"] == "eval"

    holder = {}

    def stop_after_epoch_one(record):
        if record["epoch"] == 1:
            holder["trainer"].request_stop("test")

    holder["trainer"] = Trainer(config, tmp_path / "cut", device="cpu", callbacks=Callbacks(epoch_end=stop_after_epoch_one))
    with pytest.raises(TrainingInterrupted):
        holder["trainer"].fit()
    _strip_attack_bn(tmp_path / "cut")
    resumed, changes = resume_config(tmp_path / "cut")
    assert resumed.attack_bn == "eval" and changes == {}
    Trainer(resumed, tmp_path / "cut", device="cpu", resume=True).fit()
    full = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    for key, value in full["model"].items():  # BatchNorm's running statistics included
        assert torch.equal(value, cut["model"][key]), key
    # the CLI resumes it too (nothing to train: the run is finished), and a given --attack-bn must match
    assert invoke("train", "--resume", "--out", tmp_path / "cut", "--device", "cpu", "--quiet").exit_code == 0
    assert_one_line_error(invoke("train", "--resume", "--out", tmp_path / "cut", "--attack-bn", "train", "--quiet"),
                          "attack_bn", "--override attack_bn=VALUE")


def test_override_attack_bn_on_resume_is_recorded(mnist_dir, tmp_path):
    run = tmp_path / "run"
    config = _config(mnist_dir, train_size=32, epochs=1, milestones=[1])
    Trainer(config, run, device="cpu").fit()
    _strip_attack_bn(run)  # an old run, switched to train mode from its second epoch
    resumed, changes = resume_config(run, {"attack_bn": "train", "epochs": 2})
    assert changes == {"attack_bn": ["eval", "train"], "epochs": [1, 2]}
    Trainer(resumed, run, device="cpu", resume=True, overrides={"attack_bn": "train", "epochs": 2}).fit()
    events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "override" and e["changes"].get("attack_bn") == [None, "train"]
               or e.get("event") == "override" and e["changes"].get("attack_bn") == ["eval", "train"] for e in events), events
    assert json.loads((run / "config.json").read_text())["config"]["attack_bn"] == "train"


def test_cli_option_print_config_and_errors(mnist_dir, tmp_path):
    shown = invoke("train", "--attack-bn", "train", "--print-config")
    assert shown.exit_code == 0 and json.loads(shown.output)["config"]["attack_bn"] == "train"
    assert json.loads(invoke("train", "--print-config").output)["config"]["attack_bn"] == "eval"
    assert "--attack-bn" in invoke("train", "--help").output
    assert_one_line_error(invoke("train", "--attack-bn", "sideways", "--print-config"), "--attack-bn")
    config_file = tmp_path / "c.toml"
    config_file.write_text('attack_bn = "train"\n')
    assert json.loads(invoke("train", "--config", config_file, "--print-config").output)["config"]["attack_bn"] == "train"
    run = tmp_path / "run"
    result = invoke("train", *tiny_train_args(mnist_dir, run, method="pgd-at-awp", attack_bn="train", model=MODEL,
                                              train_size=32))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["config"]["attack_bn"] == "train"
