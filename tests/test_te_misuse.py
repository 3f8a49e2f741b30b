"""Issue 31: every natural misuse of the drop-in TE API is refused (or warned about once) with one line
that names the fix, instead of silently training something else. Each test below fails on the code
before issue 31 (the call was accepted, or failed with a raw torch/torchattacks error)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from at_memorization import TELoss, TEPGD, WithIndex, without_index
from at_memorization.plugins.temporal_ensembling import (TEDeviceError, TERepeatedUpdateWarning, TEScheduleWarning,
                                                         te_penalty)

N, C = 16, 4
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def one_line(info) -> str:
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def model_and_batch(batch=8, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, C))
    x, y = torch.rand(batch, 3, 8, 8), torch.arange(batch) % C
    return model, x, y, torch.arange(batch)


def te_on(**kwargs):
    return TELoss(N, C, start_epoch=1, end_epoch=2, **kwargs)


# --------------------------------------------------------------------------- item 2: double normalization
def test_update_from_refuses_a_batch_normalized_twice():
    model, x, _, index = model_and_batch()
    normalized = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)  # a Normalize in the loader
    te = te_on()
    with pytest.raises(ValueError, match="normalized twice") as info:
        te.update_from(model, normalized, index, 1, mean=MEAN, std=STD)
    assert "drop mean=/std=" in one_line(info)
    assert not te.ensemble.any()  # nothing was updated
    assert te.update_from(model, normalized, index, 1)  # the right call: the model takes the loader's batch
    # Pixel-space batches with mean/std, and 0-255 batches with 0-255 statistics, are fine.
    assert te.update_from(model, x, index + 8, 1, mean=MEAN, std=STD)
    scaled = te_on()
    assert scaled.update_from(model, x * 255, index, 1, mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])


# --------------------------------------------------------------------------- item 3: index without epoch
def test_tepgd_refuses_index_without_epoch():
    model, x, y, index = model_and_batch()
    te = te_on()
    te.update_from(model, x, index, 2)
    attack = TEPGD(model, te, steps=2)
    with pytest.raises(ValueError, match="index= without epoch=") as info:
        attack(x, y, index=index)  # TE is on at epoch 2: this used to be plain PGD, silently
    assert "pass epoch=" in one_line(info)
    with pytest.raises(ValueError, match="index="):
        attack(x, y, epoch=2)  # the converse, refused before issue 31 already
    assert attack(x, y).shape == x.shape  # neither: plain PGD, as documented


# --------------------------------------------------------------------------- item 5: the misuses
def test_duplicate_indices_are_refused_and_can_be_allowed():
    model, x, y, _ = model_and_batch()
    te = te_on()
    for call in (lambda: te.update_from(model, x, y, 1),  # the labels passed as the index
                 lambda: te.update(torch.randn(8, C), y, 1),
                 lambda: te(torch.randn(8, C), y, 1),
                 lambda: te.attack_penalty(y, 1),
                 lambda: TEPGD(model, te, steps=1)(x, y, index=y, epoch=1)):
        with pytest.raises(ValueError, match="index repeats sample") as info:
            call()
        assert "allow_duplicate_indices=True" in one_line(info)
    assert not te.ensemble.any()
    sampled = te_on(allow_duplicate_indices=True)  # a sampler drawing with replacement
    index = torch.tensor([3, 3, 5, 6, 7, 8, 9, 10])
    assert sampled.update_from(model, x, index, 1)
    assert sampled.ensemble[3].sum() > 0


def test_a_penalty_on_a_stale_ensemble_is_refused():
    model, x, _, index = model_and_batch()
    te = te_on()
    te.update_from(model, x, index, 1)
    logits = torch.randn(8, C)
    # update_from skipped at epoch 2: the rows still hold epoch 1's ensemble.
    for call in (lambda: te(logits, index, 2), lambda: te.attack_penalty(index, 2)(logits)):
        with pytest.raises(ValueError, match="stale ensemble") as info:
            call()
        assert "update_from(model, x, index, epoch)" in one_line(info) and "last at epoch 1" in one_line(info)
    # update_from placed after the penalty: the same.
    penalty = te.attack_penalty(index, 2)
    with pytest.raises(ValueError, match="stale ensemble"):
        penalty(logits)
    te.update_from(model, x, index, 2)
    torch.testing.assert_close(penalty(logits), te_penalty(logits, te.target(index), te.weight(2)))
    # A loaded ensemble has no record of this run's updates: the next penalty needs an update first.
    loaded = te_on()
    loaded.load_state_dict(te.state_dict())
    with pytest.raises(ValueError, match="never since the ensemble was loaded"):
        loaded(logits, index, 2)
    loaded.validate = False  # a trainer that guarantees the order skips the check
    torch.testing.assert_close(loaded(logits, index, 2), te(logits, index, 2))


@pytest.mark.parametrize("epoch", [1.5, 2.25, torch.tensor(1.5), float("nan")])
def test_fractional_epochs_are_refused(epoch):
    model, x, _, index = model_and_batch()
    te = te_on()
    for call in (lambda: te.update_from(model, x, index, epoch), lambda: te(torch.randn(8, C), index, epoch),
                 lambda: te.attack_penalty(index, epoch)):
        with pytest.raises(ValueError, match="whole number") as info:
            call()
        assert "int(epoch)" in one_line(info)
    assert te.update_from(model, x, index, 2.0)  # a whole number in a float is that epoch
    assert te.update_from(model, x, index + 8, torch.tensor(2))


def test_epochs_going_back_are_refused():
    model, x, _, index = model_and_batch()
    te = te_on()
    te.update_from(model, x, index, 3)
    for call in (lambda: te.update_from(model, x, index, 2), lambda: te(torch.randn(8, C), index, 2),
                 lambda: TEPGD(model, te, steps=1)(x, torch.zeros(8, dtype=torch.long), index=index, epoch=2)):
        with pytest.raises(ValueError, match="comes after epoch 3") as info:
            call()
        assert "new TELoss" in one_line(info)
    assert te.update_from(model, x, index, 4)


def test_without_index_refuses_a_loader_that_was_never_indexed():
    x, y = torch.rand(8, 2), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="never indexed") as info:
        list(without_index(plain))  # it would have dropped the labels
    assert "WithIndex" in one_line(info)
    indexed = torch.utils.data.DataLoader(WithIndex(torch.utils.data.TensorDataset(x, y)), batch_size=4)
    assert all(torch.equal(b[1], y[:4]) or torch.equal(b[1], y[4:]) for b in without_index(indexed))
    subset = torch.utils.data.DataLoader(torch.utils.data.Subset(WithIndex(torch.utils.data.TensorDataset(x, y)),
                                                                 [0, 1, 2]), batch_size=3)
    assert len(list(without_index(subset))) == 1

    class OwnIndex(torch.utils.data.Dataset):  # a data set that yields its own index (as this package's)
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return x[i], y[i], i

    own = torch.utils.data.DataLoader(OwnIndex(), batch_size=4, shuffle=True)
    assert [len(batch) for batch in without_index(own)] == [2, 2]


def test_with_index_takes_negative_positions_and_refuses_slices():
    data = WithIndex([10, 11, 12])
    assert data[-1] == (12, 2) and data[-3] == (10, 0)  # the last item is at position 2, its ensemble row
    with pytest.raises(TypeError, match="one integer position") as info:
        data[0:2]
    assert "DataLoader" in one_line(info)
    with pytest.raises(IndexError, match="out of range"):
        data[-4]
    with pytest.raises(IndexError, match="out of range"):
        data[3]


def test_update_then_update_from_in_one_step_updates_once():
    model, x, _, index = model_and_batch()
    te, once = te_on(), te_on()
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    once.update(logits, index, 1)
    te.update(logits, index, 1)
    with pytest.warns(TERepeatedUpdateWarning, match="already updated in this step") as caught:
        assert not te.update_from(model, x, index, 1)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert torch.equal(te.ensemble, once.ensemble)
    # The other order, and with step=, too.
    other = te_on()
    other.update_from(model, x, index, 1, step=0)
    with pytest.warns(TERepeatedUpdateWarning):
        other.update(logits, index, 1)
    assert torch.equal(other.ensemble, once.ensemble)
    stepped = te_on()
    stepped.update(logits, index, 1)
    with pytest.warns(TERepeatedUpdateWarning):
        stepped.update_from(model, x, index, 1, step=0)
    assert torch.equal(stepped.ensemble, once.ensemble)
    # The low-level update alone keeps its old meaning: every call updates.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twice = te_on()
        twice.update(logits, index, 1)
        twice.update(logits, index, 1)
    assert not torch.equal(twice.ensemble, once.ensemble)


def test_teloss_without_a_schedule_warns():
    with pytest.warns(TEScheduleWarning, match="never switches TE on") as caught:
        TELoss(N, C)
    assert "TELoss.for_run" in str(caught[0].message) and "\n" not in str(caught[0].message)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TELoss.for_run(N, C, epochs=10, epoch_origin=0)
        TELoss(N, C, start_epoch=3, end_epoch=5)


def test_tepgd_takes_a_per_channel_eps_and_step():
    model, x, y, index = model_and_batch()
    model.eval()
    te = te_on()
    te.update_from(model, x, index, 2)
    eps = torch.tensor([8 / 255, 4 / 255, 2 / 255])
    for shape in ((3,), (3, 1, 1), (1, 3, 1, 1)):
        attack = TEPGD(model, te, eps=eps.view(shape), alpha=(eps / 4).view(shape), steps=5)
        adv = attack(x, y, index=index, epoch=2)
        reach = (adv - x).abs().amax(dim=(0, 2, 3))
        assert bool((reach <= eps + 1e-6).all()) and bool((reach > eps / 2).all())
        assert adv.min() >= 0 and adv.max() <= 1
    # Equal radii per channel is the scalar attack (up to rounding of the random start).
    torch.manual_seed(1)
    per_channel = TEPGD(model, te, eps=torch.full((3,), 8 / 255), alpha=torch.full((3,), 2 / 255), steps=3)(
        x, y, index=index, epoch=2)
    torch.manual_seed(1)
    scalar = TEPGD(model, te, eps=8 / 255, alpha=2 / 255, steps=3)(x, y, index=index, epoch=2)
    assert (per_channel - scalar).abs().max() <= 2 / 255 + 1e-6
    with pytest.raises(ValueError, match="normalized units") as info:  # fast_adversarial's (8/255)/std, pixel images
        TEPGD(model, te, eps=(8 / 255) / torch.tensor(STD), mean=MEAN, std=STD)
    assert "pass eps=0.03137" in one_line(info)  # 8 / 255, in pixel space
    with pytest.raises(ValueError, match="for norm='Linf'"):
        TEPGD(model, te, eps=eps, norm="L2")
    with pytest.raises(ValueError, match="has 3 channels"):
        TEPGD(model, te, eps=eps, steps=1)(x[:, :1].expand(-1, 1, -1, -1).contiguous(), y)
    with pytest.raises(ValueError, match=r"shape \(C,\)"):
        TEPGD(model, te, eps=torch.full((2, 3), 0.03))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_cuda_on_a_machine_without_a_gpu_is_the_packages_error():
    te = te_on()
    for call in (lambda: te.to("cuda"), lambda: te.cuda(), lambda: te.to(torch.device("cuda", 0))):
        with pytest.raises(TEDeviceError, match="no usable CUDA GPU") as info:
            call()
        assert "te.to('cpu')" in one_line(info)
    assert te.to("cpu") is te and te.to(torch.float64).ensemble.dtype == torch.float32


def test_channels_last_and_uint8_images_are_the_packages_errors():
    model, x, _, index = model_and_batch()
    te = te_on()
    with pytest.raises(ValueError, match="channels last") as info:
        te.update_from(model, x.permute(0, 2, 3, 1), index, 1)
    assert "x.permute(0, 3, 1, 2)" in one_line(info)
    with pytest.raises(TypeError, match="uint8") as info:
        te.update_from(model, (x * 255).to(torch.uint8), index, 1)
    assert "x.float() / 255" in one_line(info)
    with pytest.raises(TypeError, match="uint8"):
        te.update_from(model, (x * 255).to(torch.uint8), index, 1, mean=MEAN, std=STD)
    # torch's channels_last memory format is an (N, C, H, W) tensor like any other: accepted.
    assert te.update_from(model, x.contiguous(memory_format=torch.channels_last), index, 1)


@pytest.mark.parametrize("norm, expected", [("linf", "Linf"), ("LINF", "Linf"), ("l_inf", "Linf"), ("l2", "L2"),
                                            ("L2", "L2"), ("l_2", "L2")])
def test_tepgd_norm_is_case_insensitive(norm, expected):
    model, x, y, _ = model_and_batch()
    attack = TEPGD(model, te_on(), eps=0.1, alpha=0.05, steps=2, norm=norm)
    assert attack.norm == expected
    torch.manual_seed(0)
    adv = attack(x, y)
    torch.manual_seed(0)
    assert torch.equal(adv, TEPGD(model, te_on(), eps=0.1, alpha=0.05, steps=2, norm=expected)(x, y))
    with pytest.raises(ValueError, match="norm must be 'Linf' or 'L2'"):
        TEPGD(model, te_on(), norm="l1")


def test_the_ensemble_accessor_and_state_dict_key_are_documented():
    te = te_on()
    te.update(torch.randn(3, C), torch.tensor([0, 4, 7]), 1)
    assert set(te.state_dict()) == {"ensemble", "_extra_state"}
    assert torch.equal(te.state_dict()["ensemble"], te.ensemble)
    assert te.ensemble.shape == (N, C) and te.ensemble.dtype == torch.float32
    assert torch.allclose(te.ensemble[[0, 4, 7]].sum(1), torch.full((3,), 0.1))  # (1 - m) * softmax, m = 0.9
    doc = TELoss.__doc__
    assert "te.ensemble" in doc and '"ensemble"' in doc and "<prefix>.ensemble" in doc
    parent = torch.nn.Module()
    parent.te = te
    assert "te.ensemble" in parent.state_dict()
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "drop_in.md").read_text()
    assert "te.ensemble" in page and '"ensemble"' in page


def test_a_logit_penalty_is_unchanged_for_correct_loops():
    """The checks refuse misuse only: the official order (update, attack, loss) at every step passes."""
    model, x, y, index = model_and_batch()
    te = TELoss.for_run(N, C, epochs=4, epoch_origin=0)
    for epoch in range(4):
        for batch in (index, index + 8):
            te.update_from(model, x, batch, epoch)
            adv = TEPGD(model, te, steps=1)(x, y, index=batch, epoch=epoch)
            loss = F.cross_entropy(model(adv), y) + te(model(adv), batch, epoch)
            assert torch.isfinite(loss)
