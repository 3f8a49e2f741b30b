"""The drop-in TE API inside training loops written the way foreign code is (issue 19).

The expected values are not taken from the package: each test computes the official TE semantics
itself, from the formulas of the paper's code (dongyp13/memorization-AT, ``loss.py`` ``PGD_TE`` and
``train_te.py``):

    soft[idx] = m * soft[idx] + (1 - m) * softmax(f(x_clean))   (f in eval mode, from epoch start on)
    p = soft[idx] / soft[idx].sum(1)
    w(e) = reg_weight * ramp(e), epochs counted from 1
    penalty = w(e) * mean((softmax(logits) - p) ** 2)

(a) is Rice et al.'s ``train_cifar.py`` loop (locuslab/robust_overfitting): normalization inside the
loop, its own ``attack_pgd`` with restarts in train mode, ``model.train()`` once per epoch, epochs
from 0, a dataset with ``set_random_choices`` behind a ``Batches`` wrapper. (b) is a MAIR-style
trainer whose SAM minimizer evaluates the cost function twice per step and whose recorder unpacks
``(x, y)``. (c) is a normalized model under ``TEPGD(mean=, std=)``. (d) runs a transcription of the
official ``PGD_TE`` loop next to the drop-in API. Issue 31 added (e) TRADES' own ``trades_loss`` and
schedule, (f) the official ``TRADES_TE`` loop in lockstep, (g) fast_adversarial's FGSM-RS
(normalization in the loader, per-channel eps, epochs from 0, a one-cycle learning rate).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from at_memorization import TELoss, TEPGD, WithIndex, te_penalty, without_index
from at_memorization.plugins.temporal_ensembling import (TERepeatedUpdateError, TERepeatedUpdateWarning,
                                                       TEScheduleWarning, trades_attack_loss)

N, C = 40, 4
MOMENTUM, REG = 0.9, 300.0


def official_ramp(epoch, start, end):
    """memorization-AT train_te.py ``sigmoid_rampup``, transcribed."""
    if epoch < start:
        return 0.0
    if epoch > end:
        return 1.0
    phase = 1.0 - (epoch - start) / (end - start)
    return math.exp(-5.0 * phase * phase)


class OfficialTE:
    """The official TE state, written from the formulas (not from the package)."""

    def __init__(self, start, end, n=N, c=C):
        self.soft = torch.zeros(n, c)
        self.start, self.end = start, end

    def update(self, eval_logits, index, epoch1):
        if epoch1 >= self.start:
            prob = F.softmax(eval_logits.detach(), dim=1)
            self.soft[index] = MOMENTUM * self.soft[index] + (1 - MOMENTUM) * prob

    def weight(self, epoch1):
        return REG * official_ramp(epoch1, self.start, self.end)

    def penalty(self, logits, index, epoch1):
        w = self.weight(epoch1)
        if w == 0:
            return torch.zeros(())
        p = self.soft[index] / self.soft[index].sum(1, keepdim=True)
        return w * ((F.softmax(logits, dim=1) - p) ** 2).mean()


def net(seed=0, channels=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, C),
    )


def synthetic(n=N, seed=1, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, 3, 8, 8, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return x, y


def eval_logits_of(model, x):
    """Eval-mode clean logits of a copy: the reference never touches the trained model's modes."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        return reference(x)


# --------------------------------------------------------------------------- (a) Rice et al.'s loop
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
mu = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
std = torch.tensor(CIFAR_STD).view(3, 1, 1)


def normalize(X):
    return (X - mu) / std


upper_limit, lower_limit = 1, 0


def clamp(X, lower_limit, upper_limit):
    return torch.max(torch.min(X, upper_limit), lower_limit)


def attack_pgd(model, X, y, epsilon, alpha, attack_iters, restarts, norm, penalty):
    """Rice et al.'s ``attack_pgd`` (train_cifar.py), ``.cuda()`` dropped, mixup/early-stop branches
    removed; the TE additions are the two lines marked ``# TE``."""
    max_loss = torch.zeros(y.shape[0])
    max_delta = torch.zeros_like(X)
    for _ in range(restarts):
        delta = torch.zeros_like(X)
        if norm == "l_inf":
            delta.uniform_(-epsilon, epsilon)
        elif norm == "l_2":
            delta.normal_()
            d_flat = delta.view(delta.size(0), -1)
            n = d_flat.norm(p=2, dim=1).view(delta.size(0), 1, 1, 1)
            r = torch.zeros_like(n).uniform_(0, 1)
            delta *= r / n * epsilon
        delta = clamp(delta, lower_limit - X, upper_limit - X)
        delta.requires_grad = True
        for _ in range(attack_iters):
            output = model(normalize(X + delta))
            loss = F.cross_entropy(output, y) + penalty(output)  # TE
            loss.backward()
            grad = delta.grad.detach()
            d, g, x = delta, grad, X
            if norm == "l_inf":
                d = torch.clamp(d + alpha * torch.sign(g), min=-epsilon, max=epsilon)
            elif norm == "l_2":
                g_norm = torch.norm(g.view(g.shape[0], -1), dim=1).view(-1, 1, 1, 1)
                scaled_g = g / (g_norm + 1e-10)
                d = (d + scaled_g * alpha).view(d.size(0), -1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(d)
            d = clamp(d, lower_limit - x, upper_limit - x)
            delta.data = d.detach()
            delta.grad.zero_()
        output = model(normalize(X + delta))
        all_loss = F.cross_entropy(output, y, reduction="none") + penalty(output, reduction="none")  # TE
        max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
        max_loss = torch.max(max_loss, all_loss.detach())
    return max_delta


class RiceTransform(torch.utils.data.Dataset):
    """Rice et al.'s ``utils.Transform``: random choices drawn per epoch by ``set_random_choices``."""

    def __init__(self, x, y):
        self.x, self.y, self.flips = x, y, torch.zeros(len(x), dtype=torch.bool)
        self.calls = 0

    def set_random_choices(self):
        self.calls += 1
        self.flips = torch.rand(len(self.x)) < 0.5

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        data = self.x[i].flip(-1) if self.flips[i] else self.x[i]
        return data, self.y[i]


class Batches:
    """Rice et al.'s ``Batches``; the one changed line unpacks the index (``# TE``)."""

    def __init__(self, dataset, batch_size, shuffle, set_random_choices=False):
        self.dataset = dataset
        self.set_random_choices = set_random_choices
        self.dataloader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)

    def __iter__(self):
        if self.set_random_choices:
            self.dataset.set_random_choices()  # WithIndex passes this through to the dataset
        return ({"input": x.float(), "target": y.long(), "index": i} for (x, y, i) in self.dataloader)  # TE

    def __len__(self):
        return len(self.dataloader)


@pytest.mark.parametrize("norm", ["l_inf", "l_2"])
def test_rice_style_loop_matches_the_official_te_semantics(norm):
    epochs, restarts = 8, 2
    start1, end1 = 4, 6  # 45% and 75% of 8 epochs (round(3.6), round(6)), counted from 1 as the paper
    epsilon, alpha = (8 / 255, 2 / 255) if norm == "l_inf" else (0.5, 0.2)
    x_all, y_all = synthetic()
    dataset = RiceTransform(x_all, y_all)
    train_set = WithIndex(dataset)  # TE
    train_batches = Batches(train_set, 10, shuffle=True, set_random_choices=True)

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    te = TELoss.for_run(len(train_set), C, epochs=epochs, epoch_origin=0)  # TE: Rice counts epochs from 0
    assert (te.start_epoch, te.end_epoch) == (start1 - 1, end1 - 1)
    official = OfficialTE(start1, end1)
    forwards = []
    model.register_forward_hook(lambda module, inputs, output: forwards.append(module.training))
    train_vs_eval_differ = False

    model.train()
    for epoch in range(epochs):
        model.train()  # once per epoch, as train_cifar.py
        epoch1 = epoch + 1  # the reference's epoch (from 1); the loop itself never adds 1
        assert te.weight(epoch) == official.weight(epoch1)
        assert te.active(epoch) == (epoch1 >= start1)
        for batch in train_batches:
            X, y, index = batch["input"], batch["target"], batch["index"]

            expected_logits = eval_logits_of(model, normalize(X))
            official.update(expected_logits, index, epoch1)
            bn_before = [b.clone() for b in model.state_dict().values()]
            forwards.clear()
            updated = te.update_from(model, X, index, epoch, normalize=normalize)  # TE: the whole update
            assert updated == (epoch1 >= start1)
            assert forwards == ([False] if updated else [])  # one eval-mode forward, none before the start
            assert model.training and all(m.training for m in model.modules())  # train mode restored
            assert all(torch.equal(a, b) for a, b in zip(bn_before, model.state_dict().values()))  # no BN update
            torch.testing.assert_close(te.ensemble, official.soft, rtol=1e-6, atol=1e-8)
            if updated and not train_vs_eval_differ:
                with torch.no_grad():
                    train_logits = copy.deepcopy(model).train()(normalize(X))
                train_vs_eval_differ = not torch.allclose(train_logits, expected_logits, atol=1e-3)

            penalty = te.attack_penalty(index, epoch)  # TE: one object for the attack's inner loss
            delta = attack_pgd(model, X, y, epsilon, alpha, 3, restarts, norm, penalty)  # in train mode
            robust_output = model(normalize(torch.clamp(X + delta, min=lower_limit, max=upper_limit)))
            te_loss = te(robust_output, index, epoch)  # TE
            expected = official.penalty(robust_output.detach(), index, epoch1)
            torch.testing.assert_close(te_loss.detach(), expected, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(penalty(robust_output).detach(), expected, rtol=1e-5, atol=1e-9)
            per_sample = te(robust_output, index, epoch, reduction="none")
            assert per_sample.shape == (len(y),)
            torch.testing.assert_close(per_sample.mean(), te_loss, rtol=1e-6, atol=1e-9)
            robust_loss = F.cross_entropy(robust_output, y) + te_loss
            opt.zero_grad()
            robust_loss.backward()
            opt.step()
            if norm == "l_inf":
                assert delta.abs().max() <= epsilon + 1e-6
            else:
                assert delta.flatten(1).norm(dim=1).max() <= epsilon + 1e-5
        if epoch1 >= start1:
            assert float(te_loss.detach()) > 0
        else:
            assert float(te_loss.detach()) == 0.0
    assert dataset.calls == epochs  # set_random_choices reached the dataset through WithIndex
    assert train_vs_eval_differ  # so the eval-mode update was really needed
    assert bool((te.ensemble.sum(1) > 0).all())  # every sample ensembled


def test_for_run_scales_the_schedule_and_states_the_origin():
    for origin in (0, 1):
        te = TELoss.for_run(50000, 10, epochs=200, epoch_origin=origin)
        assert (te.start_epoch, te.end_epoch, te.epoch_origin) == (89 + origin, 149 + origin, origin)
        for epoch in range(origin, 200 + origin):
            assert te.weight(epoch) == REG * official_ramp(epoch + 1 - origin, 90, 150)
    te = TELoss.for_run(10, 3, epochs=20, epoch_origin=0)
    assert (te.start_epoch + 1, te.end_epoch + 1) == (round(0.45 * 20), round(0.75 * 20))
    with pytest.raises(TypeError, match="epoch_origin"):
        TELoss.for_run(10, 3, epochs=20)  # the origin must be stated
    with pytest.raises(TypeError, match="start_epoch"):
        TELoss.for_run(10, 3, epochs=20, epoch_origin=1, start_epoch=3)
    with pytest.raises(ValueError, match="epoch_origin must be 0 or 1"):
        TELoss.for_run(10, 3, epochs=20, epoch_origin=2)
    # A loop counting from 0 that forgot to say so fails at its first step, not silently one epoch late.
    te = TELoss.for_run(10, 3, epochs=20, epoch_origin=1)
    with pytest.raises(ValueError, match="epoch_origin=0"):
        te.update_from(nn.Linear(2, 3), torch.zeros(2, 2), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="epoch_origin=0"):
        te(torch.zeros(2, 3), torch.tensor([0, 1]), 0)
    # The constructor's defaults are the paper's epochs 90 and 150, in the stated counting.
    with pytest.warns(TEScheduleWarning):
        assert (TELoss(10, 3).start_epoch, TELoss(10, 3, epoch_origin=0).start_epoch) == (90, 89)


# --------------------------------------------------------------------------- (b) a SAM-style trainer
class SAM:
    """MAIR's ``SAM`` minimizer (mair/optim/minimizer.py), transcribed: two cost evaluations per step."""

    def __init__(self, model, optimizer, rho):
        self.model, self.optimizer, self.rho, self.state = model, optimizer, rho, {}

    def step(self, cost_fn, *inputs):
        cost = cost_fn(*inputs)
        cost.backward()
        self.ascent_step()
        cost = cost_fn(*inputs)
        cost.backward()
        self.descent_step()

    @torch.no_grad()
    def ascent_step(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in grads]), p=2) + 1.0e-16
        for p in self.model.parameters():
            if p.grad is not None:
                self.state[p] = self.rho / grad_norm * p.grad.clone().detach()
                p.add_(self.state[p])
        self.optimizer.zero_grad()

    @torch.no_grad()
    def descent_step(self):
        for p in self.model.parameters():
            if p.grad is not None:
                p.sub_(self.state[p])
        self.optimizer.step()
        self.optimizer.zero_grad()


class TETrainer:
    """A MAIR-style trainer (``calculate_cost(train_data)``, epochs from 1, a recorder that unpacks
    ``x, y``) with TE added through the drop-in API."""

    def __init__(self, model, te, attack):
        self.rmodel, self.te, self.atk = model, te, attack
        self.curr_epoch = 0
        self.records = []

    def calculate_cost(self, train_data):
        images, labels, index = train_data
        self.te.update_from(self.rmodel, images, index, self.curr_epoch)  # TE: called twice per step by SAM
        adv_images = self.atk(images, labels, index=index, epoch=self.curr_epoch)
        logits_adv = self.rmodel(adv_images)
        return F.cross_entropy(logits_adv, labels) + self.te(logits_adv, index, self.curr_epoch)

    @torch.no_grad()
    def eval_accuracy(self, loader):  # MAIR's RobModel.eval_accuracy: ``for images, labels in loader``
        correct = total = 0
        for images, labels in loader:
            correct += int((self.rmodel(images).argmax(1) == labels).sum())
            total += len(labels)
        return correct / total


def test_sam_style_trainer_updates_the_ensemble_once_per_step():
    epochs = 4
    x_all, y_all = synthetic()
    loader = torch.utils.data.DataLoader(WithIndex(torch.utils.data.TensorDataset(x_all, y_all)), batch_size=8,
                                         shuffle=True)
    model = net(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    minimizer = SAM(model, optimizer, rho=0.05)
    te = TELoss.for_run(N, C, epochs=epochs, epoch_origin=1)  # MAIR's curr_epoch counts from 1
    start1, end1 = 2, 3  # 45% and 75% of 4 epochs
    trainer = TETrainer(model, te, TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=2))
    official = OfficialTE(start1, end1)
    twice = OfficialTE(start1, end1)  # what two updates per step would give
    active_steps = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(epochs):
            trainer.curr_epoch = epoch + 1
            for train_data in loader:
                model.train()
                images, _, index = train_data
                expected_logits = eval_logits_of(model, images)  # at the step's weights, before SAM's ascent
                official.update(expected_logits, index, trainer.curr_epoch)
                twice.update(expected_logits, index, trainer.curr_epoch)
                twice.update(expected_logits, index, trainer.curr_epoch)
                minimizer.step(lambda data: trainer.calculate_cost(data), train_data)
                torch.testing.assert_close(te.ensemble, official.soft, rtol=1e-6, atol=1e-8)
                active_steps += trainer.curr_epoch >= start1
            model.eval()
            trainer.records.append(trainer.eval_accuracy(without_index(loader)))  # the recorder sees (x, y)
    repeats = [w for w in caught if issubclass(w.category, TERepeatedUpdateWarning)]
    assert active_steps > 0 and len(repeats) == active_steps  # one refused second update per active step
    assert "SAM" in str(repeats[0].message) and "on_repeat" in str(repeats[0].message)
    assert repeats[0].filename == __file__  # the warning points at the caller's line
    assert not torch.allclose(official.soft, twice.soft)  # the guard mattered
    assert len(trainer.records) == epochs


def test_repeat_policy_and_steps():
    model = net()
    x, _ = synthetic(8)
    first, second = torch.arange(8), torch.arange(8, 16)
    strict = TELoss(N, C, start_epoch=1, end_epoch=2, on_repeat="error")
    assert strict.update_from(model, x, first, 1)
    with pytest.raises(TERepeatedUpdateError, match="already updated in this step"):
        strict.update_from(model, x, first.flip(0), 1)  # the same set of samples, in any order
    assert strict.update_from(model, x, first, 2)  # the next epoch: a new step

    quiet = TELoss(N, C, start_epoch=1, end_epoch=2, on_repeat="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quiet.update_from(model, x, first, 1) and not quiet.update_from(model, x, first, 1)

    # step= tells steps apart: micro-batches of one step are all applied, a repeat in the step is not,
    # and a loop feeding one fixed batch at every step is updated at every step.
    te = TELoss(N, C, start_epoch=1, end_epoch=2, on_repeat="error")
    assert te.update_from(model, x, first, 1, step=0)
    assert te.update_from(model, x, second, 1, step=0)
    with pytest.raises(TERepeatedUpdateError):
        te.update_from(model, x, torch.cat([first[:4], second[:4]]), 1, step=0)
    assert te.update_from(model, x, first, 1, step=1)
    assert te.update_from(model, x, first, 1, step=2)
    with pytest.raises(ValueError, match="on_repeat"):
        TELoss(N, C, on_repeat="twice")


def test_update_from_restores_every_mode_also_on_errors_and_normalizes():
    model = net()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a model in train mode
    x, _ = synthetic(4)
    te = TELoss(N, C, start_epoch=1, end_epoch=2)
    modes = [m.training for m in model.modules()]

    def broken(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        te.update_from(model, x, torch.arange(4), 1, normalize=broken)
    assert [m.training for m in model.modules()] == modes
    assert te.update_from(model, x, torch.arange(4), 1, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert [m.training for m in model.modules()] == modes
    reference = OfficialTE(1, 2)
    reference.update(eval_logits_of(model, normalize(x)), torch.arange(4), 1)
    torch.testing.assert_close(te.ensemble, reference.soft, rtol=1e-6, atol=1e-8)
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="not both"):
        te.update_from(model, x, torch.arange(4, 8), 1, normalize=normalize, mean=CIFAR_MEAN, std=CIFAR_STD)
    with pytest.raises(ValueError, match="give both"):
        te.update_from(model, x, torch.arange(4, 8), 1, mean=CIFAR_MEAN)
    with pytest.raises(ValueError, match="shape"):
        te.update_from(model, x, torch.arange(5), 1)


def test_penalty_before_update_is_refused():
    te = TELoss(N, C, start_epoch=1, end_epoch=2)
    with pytest.raises(ValueError, match="update_from"):
        te(torch.randn(3, C), torch.tensor([0, 1, 2]), 2)
    hook = te.attack_penalty(torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="update_from"):
        hook(torch.randn(3, C))


def test_hook_made_before_the_update_reads_the_updated_ensemble():
    te = TELoss(N, C, start_epoch=1, end_epoch=2)
    index = torch.tensor([0, 1, 2])
    te.update(torch.randn(3, C), index, 1)
    hook = te.attack_penalty(index, 2)
    logits = torch.randn(3, C)
    with pytest.raises(ValueError, match="stale ensemble"):
        hook(logits)  # the rows were last updated at epoch 1
    before = te_penalty(logits, te.target(index), te.weight(2))
    te.update(torch.randn(3, C) * 4, index, 2)
    torch.testing.assert_close(hook(logits), te(logits, index, 2))
    assert not torch.equal(before, hook(logits))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    te = TELoss(N, C, start_epoch=1, end_epoch=3, reduction=reduction)
    index = torch.tensor([3, 5, 7, 9])
    te.update(torch.randn(4, C), index, 2)
    logits = torch.randn(4, C, requires_grad=True)
    reference = OfficialTE(1, 3)
    reference.soft = te.ensemble.clone()
    per_sample = REG * official_ramp(2, 1, 3) * ((F.softmax(logits, 1) - te.target(index)) ** 2).mean(1)
    expected = {"mean": reference.penalty(logits, index, 2), "sum": per_sample.sum(), "none": per_sample}[reduction]
    torch.testing.assert_close(te(logits, index, 2), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(te.penalty(logits, index, 2), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(te.attack_penalty(index, 2)(logits), expected, rtol=1e-5, atol=1e-9)
    zero = TELoss(N, C, start_epoch=2, end_epoch=3, reduction=reduction)(logits, index, 1)  # before the start
    assert zero.shape == expected.shape and not zero.any()
    zero.sum().backward()
    assert not logits.grad.any()
    with pytest.raises(ValueError, match="reduction"):
        TELoss(N, C, reduction="avg")


# --------------------------------------------------------------------------- (c) normalized models
class NormalizedInside(nn.Module):
    """A model that takes [0, 1] images and normalizes inside (RobustBench's convention)."""

    def __init__(self, inner, mean, std):
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.inner((x - self.mean) / self.std)


class RobModel(nn.Module):
    """The shape of MAIR's ``RobModel``: mean/std buffers, a forward that does not normalize."""

    def __init__(self, inner, mean, std):
        super().__init__()
        self.model = inner
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("norm, eps, alpha", [("Linf", 8 / 255, 2 / 255), ("L2", 0.5, 0.2)])
def test_tepgd_on_a_normalized_model_stays_in_pixel_space(norm, eps, alpha):
    inner = net(seed=3).eval()
    x, y = synthetic(8)
    index = torch.arange(8)
    te = TELoss(N, C, reg_weight=1e3, start_epoch=1, end_epoch=2)
    te.update_from(inner, x, index, 2, mean=CIFAR_MEAN, std=CIFAR_STD)
    results = []
    for attack in (TEPGD(inner, te, eps=eps, alpha=alpha, steps=4, norm=norm, restarts=2, mean=CIFAR_MEAN,
                         std=CIFAR_STD),
                   TEPGD(NormalizedInside(inner, CIFAR_MEAN, CIFAR_STD), te, eps=eps, alpha=alpha, steps=4, norm=norm,
                         restarts=2),
                   TEPGD(RobModel(inner, CIFAR_MEAN, CIFAR_STD), te, eps=eps, alpha=alpha, steps=4, norm=norm,
                         restarts=2)):
        torch.manual_seed(5)
        results.append(attack(x, y, index=index, epoch=2))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    adv = results[0]
    assert adv.min() >= 0 and adv.max() <= 1  # pixel space in and out
    if norm == "Linf":
        assert (adv - x).abs().max() <= eps + 1e-6
    else:
        assert (adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert not inner.training  # modes restored (it was in eval mode)

    # The silent error of issue 19: torchattacks with set_normalization_used takes *normalized*
    # images; given [0, 1] images its perturbation is eps / std in pixel space (about 4x).
    if norm == "Linf":
        foreign = torchattacks.PGD(inner, eps=eps, alpha=alpha, steps=4)
        foreign.set_normalization_used(mean=CIFAR_MEAN, std=CIFAR_STD)
        assert (foreign(x, y) - x).abs().max() > 3 * eps
    attack = TEPGD(inner, te, eps=eps, alpha=alpha, steps=2, norm=norm, mean=CIFAR_MEAN, std=CIFAR_STD)
    with pytest.raises(ValueError, match="look normalized"):
        attack(normalize(x), y, index=index, epoch=2)
    with pytest.raises(TypeError, match="mean=..., std="):
        attack.set_normalization_used(mean=CIFAR_MEAN, std=CIFAR_STD)


def test_tepgd_restarts_keep_the_best_run_per_sample():
    model = net(seed=4).eval()
    x, y = synthetic(8)
    index = torch.arange(8)
    te = TELoss(N, C, reg_weight=1e3, start_epoch=1, end_epoch=2)
    te.update_from(model, x, index, 2)
    single = TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=3)
    torch.manual_seed(0)
    runs = [single(x, y, index=index, epoch=2) for _ in range(3)]
    torch.manual_seed(0)
    best = TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=3, restarts=3)(x, y, index=index, epoch=2)
    with torch.no_grad():
        objective = torch.stack([F.cross_entropy(model(r), y, reduction="none")
                                 + te(model(r), index, 2, reduction="none") for r in runs])
    # Rice et al.'s rule: a later run replaces the kept one where its objective is >= the kept one's.
    keep = torch.zeros(8, dtype=torch.long)
    for k in (1, 2):
        keep = torch.where(objective[k] >= objective[keep, torch.arange(8)], torch.tensor(k), keep)
    expected = torch.stack([runs[int(k)][i] for i, k in enumerate(keep)])
    assert torch.equal(best, expected)


def test_tepgd_attacks_in_eval_mode_unless_told_and_restores_modes():
    model = net(seed=5)
    x, y = synthetic(4)
    te = TELoss(N, C, start_epoch=3, end_epoch=4)
    seen = []
    model[1].register_forward_hook(lambda module, inputs, output: seen.append(module.training))
    model.train()
    TEPGD(model, te, steps=2)(x, y)
    assert seen and not any(seen) and model.training  # BatchNorm in eval mode during the attack
    seen.clear()
    rice = TEPGD(model, te, steps=2)
    rice.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
    model.eval()
    rice(x, y)
    assert seen and all(seen)  # train mode, as Rice et al.'s attack_pgd
    assert not any(m.training for m in model.modules())  # torchattacks alone would leave it in train mode


# --------------------------------------------------------------------------- (d) the official PGD_TE loop
def official_pgd_te_step(model, x_natural, y, index, epoch, optimizer, weight, soft_labels, es, epsilon, step_size,
                         perturb_steps, momentum=MOMENTUM):
    """memorization-AT loss.py ``PGD_TE.__call__`` (its linf branch), ``.cuda()`` dropped."""
    model.eval()
    logits = model(x_natural)
    if epoch >= es:
        prob = F.softmax(logits.detach(), dim=1)
        soft_labels[index] = momentum * soft_labels[index] + (1 - momentum) * prob
        soft_labels_batch = soft_labels[index] / soft_labels[index].sum(1, keepdim=True)
    x_adv = x_natural.detach() + torch.FloatTensor(*x_natural.shape).uniform_(-epsilon, epsilon)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            logits_adv = model(x_adv)
            if epoch >= es:
                loss = F.cross_entropy(logits_adv, y) + weight * ((F.softmax(logits_adv, dim=1) - soft_labels_batch) ** 2).mean()
            else:
                loss = F.cross_entropy(logits_adv, y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    optimizer.zero_grad()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    logits = model(x_adv)
    if epoch >= es:
        return F.cross_entropy(logits, y) + weight * ((F.softmax(logits, dim=1) - soft_labels_batch) ** 2).mean()
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("api", ["drop-in", "pgd-at-te method"])
def test_te_follows_the_official_pgd_te_loop_bit_for_bit(api):
    """The official loop and ours from the same weights and random state: the random starts and
    dropout masks are the same draws, and the runs are bit-identical (losses, ensemble, weights and
    BatchNorm statistics), for the drop-in API and for the method the CLI trains (``pgd-at-te``).

    The one place where they could round differently is PGD's projection: torchattacks computes
    ``x + clamp(x_adv - x, -eps, eps)``, the official code ``min(max(x_adv, x - eps), x + eps)``.
    With every pixel in [0.1, 0.9] the subtraction is exact (Sterbenz), so both give the same floats;
    the random start, which torchattacks clamps to [0, 1] and the official code does not, is then
    never clamped either (docs/differences.md)."""
    from at_memorization.methods import TrainingSetup, get_method

    epochs, start, end = 5, 2, 4
    eps, step = 8 / 255, 2 / 255
    x_all, y_all = synthetic(low=0.1, high=0.9)  # no pixel within eps of 0 or 1: no clamping difference
    batches = [torch.arange(i, i + 10) for i in range(0, N, 10)]

    official_model, model = net(seed=6), net(seed=6)
    official_opt = torch.optim.SGD(official_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    soft_labels = torch.zeros(N, C)
    if api == "drop-in":
        te = TELoss(N, C, momentum=MOMENTUM, reg_weight=REG, start_epoch=start, end_epoch=end)
        attack = TEPGD(model, te, eps=eps, alpha=step, steps=4)
    else:
        setup = TrainingSetup(num_samples=N, num_classes=C, epochs=epochs, eps=eps, step_size=step, steps=4)
        method = get_method("pgd-at-te")(setup, te_start=start, te_end=end, te_weight=REG, te_momentum=MOMENTUM)
        te = method.extension("te").te
    penalties = 0
    for epoch in range(1, epochs + 1):
        weight = official_ramp(epoch, start, end) * REG
        assert te.weight(epoch) == weight
        official_model.train()
        model.train()
        for index in batches:
            x, y = x_all[index], y_all[index]
            rng = torch.get_rng_state()
            official_loss = official_pgd_te_step(official_model, x, y, index, epoch, official_opt, weight, soft_labels,
                                                 start, eps, step, 4)
            official_loss.backward()
            official_opt.step()

            torch.set_rng_state(rng)
            if api == "drop-in":
                te.update_from(model, x, index, epoch)
                x_adv = attack(x, y, index=index, epoch=epoch)
                logits = model(x_adv)
                loss = F.cross_entropy(logits, y) + te(logits, index, epoch)
            else:  # as the trainer calls a method (docs/plugins.md)
                x_adv = method.attack(model, x, y, index, epoch)
                model.train()
                loss, logs = method.loss(model, x, x_adv, y, index, epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()

            assert torch.equal(loss, official_loss), (epoch, loss.item(), official_loss.item())
            assert torch.equal(te.ensemble, soft_labels)
            penalties += weight > 0
    assert penalties == (epochs - start + 1) * len(batches) and float(te.ensemble.sum()) > 0
    for ours, theirs in zip(model.state_dict().values(), official_model.state_dict().values()):
        assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- (e) TRADES' own script
# TRADES (yaodongyu/TRADES) ``trades.py``'s ``trades_loss`` (its l_inf branch) and the loop of
# ``train_trades_cifar10.py`` (epochs from 1, ``adjust_learning_rate``: lr / 10 from epoch 75 of 76),
# scaled to 6 epochs with the decay from epoch 5, ``.cuda()`` dropped and ``KLDivLoss(size_average=False)``
# written ``reduction="sum"`` (the same). The drop-in version differs by the lines marked ``# TE``;
# the reference adds the official ``TRADES_TE`` formulas inline instead.
TRADES_EPOCHS, TRADES_DECAY_EPOCH, TRADES_LR, BETA = 6, 5, 0.05, 6.0


def adjust_learning_rate(optimizer, epoch):
    """train_trades_cifar10.py's schedule, scaled: lr / 10 from epoch TRADES_DECAY_EPOCH on."""
    lr = TRADES_LR
    if epoch >= TRADES_DECAY_EPOCH:
        lr = TRADES_LR * 0.1
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def trades_loss(model, x_natural, y, optimizer, step_size=0.003, epsilon=0.031, perturb_steps=10, beta=1.0,
                penalty=None):
    """trades.py's trades_loss; with TE, the three lines marked ``# TE`` (``penalty``: the batch's
    ``te.attack_penalty(index, epoch)``)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            logits_adv = model(x_adv)                                                  # TE: named
            loss_kl = criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(model(x_natural), dim=1))
            if penalty is not None:
                loss_kl = trades_attack_loss(loss_kl, logits_adv, beta, penalty)      # TE
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    loss = loss_natural + beta * loss_robust
    if penalty is not None:
        loss = loss + penalty(logits)                                                  # TE: on the clean logits
    return loss


def reference_trades_te_loss(model, x_natural, y, optimizer, step_size, epsilon, perturb_steps, beta, official,
                             index, epoch1):
    """The same trades_loss with TE as the official TRADES_TE writes it: the ensemble updated from the
    eval-mode clean logits, ``(beta / B) * KL_sum + w * mean((softmax - p) ** 2)`` in the attack once TE
    is on (``KL_sum`` before), ``+ w * mean(...)`` on the clean logits in the loss."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    batch_size = len(x_natural)
    with torch.no_grad():
        official.update(model(x_natural), index, epoch1)
    te_on = epoch1 >= official.start
    if te_on:
        p = official.soft[index] / official.soft[index].sum(1, keepdim=True)
        weight = official.weight(epoch1)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            logits_adv = model(x_adv)
            loss_kl = criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(model(x_natural), dim=1))
            if te_on:
                loss_kl = (beta / batch_size) * loss_kl + weight * ((F.softmax(logits_adv, dim=1) - p) ** 2).mean()
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    loss = loss_natural + beta * loss_robust
    if te_on:
        loss = loss + weight * ((F.softmax(logits, dim=1) - p) ** 2).mean()
    return loss


def test_trades_script_with_te_matches_the_official_trades_te_maths_step_by_step():
    """TRADES' own script with TE added through the drop-in API, next to the same script computing the
    official TRADES_TE formulas itself: every step's loss, the ensemble, and in the end the weights and
    BatchNorm buffers are identical (0.0 difference). Before TE starts the reference is TRADES untouched."""
    eps, step, steps = 8 / 255, 2 / 255, 3
    x_all, y_all = synthetic()
    train_set = WithIndex(torch.utils.data.TensorDataset(x_all, y_all))                      # TE
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=10, shuffle=True)
    te = TELoss.for_run(len(train_set), C, epochs=TRADES_EPOCHS, epoch_origin=1,             # TE
                        lr_schedule="multistep", milestones=[TRADES_DECAY_EPOCH - 1])
    # te_schedule: 5% of 6 epochs (0.3, rounded to 0) before the decay, i.e. from the last epoch at the full
    # learning rate; one decay, so full weight at min(6, 4 + round(0.25 * 6)) = 6, the run's end.
    assert (te.start_epoch, te.end_epoch) == (4, 6)
    official = OfficialTE(te.start_epoch, te.end_epoch)

    model, reference = net(seed=7), net(seed=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRADES_LR, momentum=0.9, weight_decay=2e-4)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=TRADES_LR, momentum=0.9, weight_decay=2e-4)
    losses_with_te = 0
    for epoch in range(1, TRADES_EPOCHS + 1):
        adjust_learning_rate(optimizer, epoch)
        adjust_learning_rate(reference_optimizer, epoch)
        model.train()
        reference.train()
        for data, target, index in train_loader:
            rng = torch.get_rng_state()
            expected = reference_trades_te_loss(reference, data, target, reference_optimizer, step, eps, steps, BETA,
                                                official, index, epoch)
            expected.backward()
            reference_optimizer.step()

            torch.set_rng_state(rng)
            te.update_from(model, data, index, epoch)                                         # TE
            loss = trades_loss(model, data, target, optimizer, step_size=step, epsilon=eps, perturb_steps=steps,
                               beta=BETA, penalty=te.attack_penalty(index, epoch))            # TE: penalty=
            loss.backward()
            optimizer.step()
            assert torch.equal(loss, expected), (epoch, loss.item(), expected.item())
            assert torch.equal(te.ensemble, official.soft)
            losses_with_te += epoch >= te.start_epoch
    assert losses_with_te == 3 * 4 and float(te.ensemble.sum()) > 0
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)


def test_trades_attack_loss_scales_the_kl_only_once_te_is_on():
    """Item 1 of issue 31: the attack of a TRADES loop maximizes ``(beta / B) * KL_sum + penalty`` once TE
    is on (the official TRADES_TE), ``KL_sum`` alone before; a batch-mean CE-style ``KL + penalty``
    would weaken the penalty by B / beta."""
    te = TELoss(N, C, start_epoch=2, end_epoch=3)
    index = torch.arange(8)
    logits_adv, kl_sum = torch.randn(8, C), torch.tensor(3.7)
    before = te.attack_penalty(index, 1)
    assert not before.active and trades_attack_loss(kl_sum, logits_adv, BETA, before) is kl_sum
    assert trades_attack_loss(kl_sum, logits_adv, BETA, None) is kl_sum
    te.update(torch.randn(8, C), index, 2)
    penalty = te.attack_penalty(index, 2)
    p = te.ensemble[index] / te.ensemble[index].sum(1, keepdim=True)
    expected = (BETA / 8) * kl_sum + te.weight(2) * ((F.softmax(logits_adv, dim=1) - p) ** 2).mean()
    assert torch.equal(trades_attack_loss(kl_sum, logits_adv, BETA, penalty), expected)
    # The methods' TRADES attack computes its inner loss with the same helper.
    from at_memorization.attacks import PenalizedTPGD

    attack = PenalizedTPGD(net(), beta=BETA)
    target = F.softmax(torch.randn(8, C), dim=1)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), target, reduction="sum")
    assert torch.equal(attack._inner_loss(logits_adv, target, penalty),
                       trades_attack_loss(kl, logits_adv, BETA, penalty))
    assert torch.equal(attack._inner_loss(logits_adv, target, before), kl)


# --------------------------------------------------------------------------- (f) the official TRADES_TE loop
class OfficialTRADES_TE:
    """memorization-AT loss.py ``TRADES_TE`` (its linf branch), ``.cuda()`` dropped and
    ``KLDivLoss(size_average=False)`` written ``reduction="sum"`` (the same); returns the adversarial
    batch too."""

    def __init__(self, num_samples=50000, num_classes=10, momentum=0.9, es=90, step_size=0.003, epsilon=0.031,
                 perturb_steps=10, beta=6.0):
        self.soft_labels = torch.zeros(num_samples, num_classes, dtype=torch.float)
        self.momentum, self.es, self.step_size, self.epsilon = momentum, es, step_size, epsilon
        self.perturb_steps, self.beta = perturb_steps, beta

    def __call__(self, x_natural, y, index, epoch, model, optimizer, weight):
        criterion_kl = nn.KLDivLoss(reduction="sum")
        model.eval()
        batch_size = len(x_natural)
        logits = model(x_natural)
        if epoch >= self.es:
            prob = F.softmax(logits.detach(), dim=1)
            self.soft_labels[index] = self.momentum * self.soft_labels[index] + (1 - self.momentum) * prob
            soft_labels_batch = self.soft_labels[index] / self.soft_labels[index].sum(1, keepdim=True)
        x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
        for _ in range(self.perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                logits_adv = model(x_adv)
                loss_kl = criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
                if epoch >= self.es:
                    loss = (self.beta / batch_size) * loss_kl + weight * ((F.softmax(logits_adv, dim=1) - soft_labels_batch) ** 2).mean()
                else:
                    loss = loss_kl
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + self.step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x_natural - self.epsilon), x_natural + self.epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        model.train()
        optimizer.zero_grad()
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
        logits = model(x_natural)
        logits_adv = model(x_adv)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
        if epoch >= self.es:
            loss = loss_natural + self.beta * loss_robust + weight * ((F.softmax(logits, dim=1) - soft_labels_batch) ** 2).mean()
        else:
            loss = loss_natural + self.beta * loss_robust
        return loss, x_adv


def drop_in_trades_te_step(model, x, y, index, epoch, optimizer, te, eps, step, steps, beta):
    """The same step written with the drop-in API: ``update_from``, ``trades_attack_loss`` and ``te(...)``."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    te.update_from(model, x, index, epoch)
    penalty = te.attack_penalty(index, epoch)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        logits_adv = model(x_adv)
        loss_kl = criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
        grad = torch.autograd.grad(trades_attack_loss(loss_kl, logits_adv, beta, penalty), [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    model.train()
    optimizer.zero_grad()
    logits = model(x)
    logits_adv = model(x_adv)
    loss_natural = F.cross_entropy(logits, y)  # before loss_robust: autograd sums the gradients in this order
    loss_robust = (1.0 / len(x)) * criterion_kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
    return loss_natural + beta * loss_robust + te(logits, index, epoch), x_adv


def test_te_follows_the_official_trades_te_loop_bit_for_bit():
    """Next to the PGD_TE lockstep: the official TRADES_TE loop and the drop-in API from the same weights
    and random state are bit-identical over 5 epochs (losses, adversarial batches, ensemble, weights,
    BatchNorm buffers), before and after TE starts; the ``trades-te`` method, run on the official
    model's weights at every step, makes the same adversarial batch and ensemble. Pixels lie in
    [0.1, 0.9], where torchattacks' projection and start round as the official code's (see the PGD_TE test)."""
    import copy as copying

    from at_memorization.methods import TrainingSetup, get_method

    epochs, start, end = 5, 2, 4
    eps, step, steps = 8 / 255, 2 / 255, 4
    x_all, y_all = synthetic(low=0.1, high=0.9)
    batches = [torch.arange(i, i + 10) for i in range(0, N, 10)]
    official_model, model = net(seed=8), net(seed=8)
    official_opt = torch.optim.SGD(official_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    official = OfficialTRADES_TE(N, C, MOMENTUM, es=start, step_size=step, epsilon=eps, perturb_steps=steps, beta=BETA)
    te = TELoss(N, C, momentum=MOMENTUM, reg_weight=REG, start_epoch=start, end_epoch=end)
    setup = TrainingSetup(num_samples=N, num_classes=C, epochs=epochs, eps=eps, step_size=step, steps=steps)
    method = get_method("trades-te")(setup, beta=BETA, te_start=start, te_end=end, te_weight=REG, te_momentum=MOMENTUM)
    for epoch in range(1, epochs + 1):
        weight = official_ramp(epoch, start, end) * REG
        official_model.train()
        model.train()
        for index in batches:
            x, y = x_all[index], y_all[index]
            before_step = copying.deepcopy(official_model)
            rng = torch.get_rng_state()
            official_loss, official_adv = official(x, y, index, epoch, official_model, official_opt, weight)
            official_loss.backward()
            official_opt.step()

            torch.set_rng_state(rng)
            loss, x_adv = drop_in_trades_te_step(model, x, y, index, epoch, opt, te, eps, step, steps, BETA)
            loss.backward()
            opt.step()
            assert torch.equal(loss, official_loss), (epoch, loss.item(), official_loss.item())
            assert torch.equal(x_adv, official_adv) and torch.equal(te.ensemble, official.soft_labels)

            torch.set_rng_state(rng)
            method_adv = method.attack(before_step, x, y, index, epoch)
            assert torch.equal(method_adv, official_adv), (epoch, (method_adv - official_adv).abs().max())
            assert torch.equal(method.extension("te").te.ensemble, official.soft_labels)
    assert float(te.ensemble.sum()) > 0
    for ours, theirs in zip(model.state_dict().values(), official_model.state_dict().values()):
        assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- (g) fast_adversarial's FGSM-RS
# locuslab/fast_adversarial CIFAR10/train_fgsm.py: normalization in the loader (transforms.Normalize),
# epsilon and alpha per channel in normalized units ((8 / 255) / std), a random start drawn per channel,
# epochs from 0, CyclicLR stepped every iteration (a one-cycle schedule peaking at half the run). Apex's
# amp.scale_loss is left out (``loss.backward()``), ``.cuda()`` dropped.
FAST_MEAN, FAST_STD = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
fast_upper_limit, fast_lower_limit = (1 - FAST_MEAN) / FAST_STD, (0 - FAST_MEAN) / FAST_STD


class NormalizingDataset(torch.utils.data.Dataset):
    """A loader's ``transforms.Normalize(cifar10_mean, cifar10_std)``: items come out normalized."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i] - FAST_MEAN) / FAST_STD, self.y[i]


def fgsm_rs_epoch(model, loader, opt, scheduler, epsilon, alpha, epoch, te=None, official=None):
    """One epoch of train_fgsm.py's loop. ``te``: the drop-in lines marked ``# TE``; ``official``: the
    official TE formulas computed inline instead (epochs from 1 there: ``epoch + 1``)."""
    losses = []
    for X, y, index in loader:
        if te is not None:
            te.update_from(model, X, index, epoch)                               # TE: X as the model takes it
            penalty = te.attack_penalty(index, epoch)                            # TE
        if official is not None:
            model.eval()
            with torch.no_grad():
                official.update(model(X), index, epoch + 1)
            model.train()
            te_on = epoch + 1 >= official.start
        delta = torch.zeros_like(X)
        for j in range(len(epsilon)):
            delta[:, j, :, :].uniform_(-epsilon[j][0][0].item(), epsilon[j][0][0].item())
        delta.data = clamp(delta, fast_lower_limit - X, fast_upper_limit - X)
        delta.requires_grad = True
        output = model(X + delta[:X.size(0)])
        loss = F.cross_entropy(output, y)
        if te is not None:
            loss = loss + penalty(output)                                        # TE
        if official is not None and te_on:
            loss = loss + official.penalty(output, index, epoch + 1)
        loss.backward()
        grad = delta.grad.detach()
        delta.data = clamp(delta + alpha * torch.sign(grad), -epsilon, epsilon)
        delta.data[:X.size(0)] = clamp(delta[:X.size(0)], fast_lower_limit - X, fast_upper_limit - X)
        delta = delta.detach()
        output = model(X + delta[:X.size(0)])
        loss = F.cross_entropy(output, y)
        if te is not None:
            loss = loss + te(output, index, epoch)                               # TE
        if official is not None and te_on:
            loss = loss + official.penalty(output, index, epoch + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.detach())
    return losses


def test_fast_adversarial_fgsm_rs_with_te_matches_the_official_te_maths_step_by_step():
    """FGSM-RS as fast_adversarial writes it, with TE through the drop-in API, next to the same loop
    computing the official TE formulas inline: every step's loss, the ensemble, and in the end the
    weights and BatchNorm buffers are identical (0.0 difference); before TE starts both are the
    untouched script. TE's schedule comes from the one-cycle learning rate (``te_schedule``)."""
    epochs, batch_size = 6, 10
    x_all, y_all = synthetic()
    train_set = WithIndex(NormalizingDataset(x_all, y_all))                        # TE
    epsilon, alpha = (8 / 255) / FAST_STD, (10 / 255) / FAST_STD
    te = TELoss.for_run(len(train_set), C, epochs=epochs, epoch_origin=0,          # TE: epochs from 0,
                        lr_schedule="one-cycle", peak=epochs / 2)                  # TE: CyclicLR peaks at half
    # 45% and 75% of the annealing half after the peak: 3 + 1.35 -> 4 and 3 + 2.25 -> 5, counted from 1.
    assert (te.start_epoch, te.end_epoch) == (3, 4)
    official = OfficialTE(te.start_epoch + 1, te.end_epoch + 1)

    runs = []
    for use_te in (True, False):
        torch.manual_seed(0)  # the same shuffles and random starts for both loops
        model = net(seed=9)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
        lr_steps = epochs * len(loader)
        scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.0, max_lr=0.2, step_size_up=lr_steps / 2,
                                                      step_size_down=lr_steps / 2, cycle_momentum=False)
        losses, ensembles = [], []
        for epoch in range(epochs):
            losses += fgsm_rs_epoch(model, loader, opt, scheduler, epsilon, alpha, epoch,
                                    te=te if use_te else None, official=None if use_te else official)
            ensembles.append(te.ensemble.clone() if use_te else official.soft.clone())
        runs.append((model, losses, ensembles))
    (model, losses, ensembles), (reference, expected, expected_ensembles) = runs
    assert len(losses) == epochs * 4
    for step, (loss, reference_loss) in enumerate(zip(losses, expected)):
        assert torch.equal(loss, reference_loss), (step, loss.item(), reference_loss.item())
    for ours, theirs in zip(ensembles, expected_ensembles):
        assert torch.equal(ours, theirs)
    assert float(ensembles[-1].sum()) > 0 and float(ensembles[te.start_epoch - 1].sum()) == 0  # TE from epoch 3 on
    for ours, theirs in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)
    # The loader normalizes: giving update_from mean=/std= as well would normalize twice, and is refused.
    X, _, index = next(iter(torch.utils.data.DataLoader(train_set, batch_size=batch_size)))
    with pytest.raises(ValueError, match="normalized twice"):
        te.update_from(model, X, index, epochs - 1, mean=CIFAR_MEAN, std=CIFAR_STD)
