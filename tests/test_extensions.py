"""Extensions compose with any method that writes the three parts (issue 11): a TE variant of a new
base method is a class declaration, its loss is the base loss plus the one TE penalty, its attack
gets the penalty; hooks run in order and unwind in reverse; only stateful extensions are saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from at_memorization.methods import Extension, LoggedValue, MethodError, TrainingSetup
from at_memorization.methods.pgd_at import PGDAT
from at_memorization.plugins.mart.attack import MARTPGD
from at_memorization.plugins.mart.loss import mart_terms
from at_memorization.plugins.mart.methods import MART
from at_memorization.plugins.temporal_ensembling import TemporalEnsembling
from at_memorization.plugins.temporal_ensembling.loss import te_penalty


class MARTTE(MART):  # the whole TE variant of MART
    name = "mart-te"
    extensions = (TemporalEnsembling,)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 2, 2, generator=generator)
    y = torch.randint(0, 4, (6,), generator=generator)
    return x, y, torch.arange(6)


def test_a_te_variant_of_a_new_method_is_a_declaration():
    setup = TrainingSetup(num_samples=6, num_classes=4, epochs=4, eps=0.1, step_size=0.03, steps=3)
    method = MARTTE(setup, te_start=1, te_end=2, te_weight=1e5)  # large: it must move the attack
    assert [h.name for h in MARTTE.hyperparameters] == ["mart_beta", "te_momentum", "te_weight", "te_start", "te_end"]
    assert method.settings["mart_beta"] == 6.0 and method.settings["te_weight"] == 1e5
    model, (x, y, index) = _net(), _batch()
    epoch = 2  # TE at full weight

    torch.manual_seed(3)
    x_adv = method.attack(model, x, y, index, epoch)
    te = method.extension("te").te
    assert te.ensemble[index].sum() > 0  # fed with the clean predictions before the attack
    # The attack is MART's, maximizing CE + the TE penalty on the adversarial logits.
    target, weight = te.target(index), te.weight(epoch)
    torch.manual_seed(3)
    expected_adv = MARTPGD(model, eps=0.1, alpha=0.03, steps=3)(x, y, penalty=lambda z: te_penalty(z, target, weight))
    assert torch.equal(x_adv, expected_adv)
    torch.manual_seed(3)
    plain_adv = MARTPGD(model, eps=0.1, alpha=0.03, steps=3)(x, y)
    assert not torch.equal(x_adv, plain_adv)  # the penalty changed the attack

    loss, logs = method.loss(model, x, x_adv, y, index, epoch)
    loss_adv, loss_robust = mart_terms(model(x), model(x_adv), y)
    expected = loss_adv + 6.0 * loss_robust + te_penalty(model(x_adv), target, weight)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)
    assert set(logs) == {"train_adv_acc", "mart_adv_loss", "mart_kl_loss", "te_loss"} and logs["te_loss"] > 0
    assert method.on_epoch_start(epoch) == {"te_weight_now": 1e5}
    assert set(method.state_dict()) == {"te"}


class Recorder(Extension):
    key = "first"
    calls: list = []

    def before_loss(self, model, x, x_adv, y, index, epoch):
        self.calls.append(("before_loss", self.key))

    def before_step(self, model, optimizer, epoch):
        self.calls.append(("before_step", self.key))

    def loss_term(self, logits, index, epoch):
        return logits.pow(2).mean() * 0.0 + 1.0, {f"{self.key}_term": torch.tensor(1.0)}

    def on_epoch_start(self, epoch):
        return {f"{self.key}_epoch": float(epoch)}


class SecondRecorder(Recorder):
    key = "second"
    has_state = True

    def state_dict(self):
        return {"count": torch.tensor(7)}

    def load_state_dict(self, state):
        self.loaded = state


class TwoExtensions(PGDAT):
    name = "two"
    extensions = (Recorder, SecondRecorder)


def test_hooks_run_in_order_and_unwind_in_reverse_and_terms_add_up():
    Recorder.calls = []
    method = TwoExtensions(TrainingSetup(num_samples=6, num_classes=4, epochs=2))
    model, (x, y, index) = _net(), _batch()
    method.before_loss(model, x, x, y, index, 1)
    method.before_step(model, None, 1)
    assert Recorder.calls == [("before_loss", "first"), ("before_loss", "second"),
                              ("before_step", "second"), ("before_step", "first")]
    loss, logs = method.loss(model, x, x, y, index, 1)
    assert torch.allclose(loss, F.cross_entropy(model(x), y) + 2.0)
    assert {"first_term", "second_term", "train_adv_acc"} == set(logs)
    assert method.on_epoch_start(3) == {"first_epoch": 3.0, "second_epoch": 3.0}
    # Only the stateful extension is saved, under its key; a checkpoint without it is refused.
    assert list(method.state_dict()) == ["second"]
    method.load_state_dict({"second": {"count": torch.tensor(7)}})
    assert method.extension("second").loaded["count"].item() == 7
    with pytest.raises(MethodError, match="no 'second' state"):
        method.load_state_dict({})
    with pytest.raises(KeyError, match="has no extension 'te'"):
        method.extension("te")


def test_composition_mistakes_fail_when_the_class_is_written():
    class NoKey(Extension):
        pass

    with pytest.raises(TypeError, match="own non-empty key"):
        type("Bad", (PGDAT,), {"name": "bad", "extensions": (NoKey,)})
    with pytest.raises(TypeError, match="own non-empty key"):
        type("Twice", (PGDAT,), {"name": "twice", "extensions": (TemporalEnsembling, TemporalEnsembling)})

    def loss(self, model, x, x_adv, y, index, epoch):
        return model(x_adv).sum(), {}

    # an overridden loss would skip the extensions' terms while their attack penalty still applied
    with pytest.raises(TypeError, match="writes run_attack, training_logits and base_loss"):
        type("Halves", (PGDAT,), {"name": "halves", "extensions": (TemporalEnsembling,), "loss": loss})


def test_an_extension_with_undeclared_state_is_refused_rather_than_lost_on_resume():
    class Forgetful(Extension):
        key = "forgetful"

        def state_dict(self):
            return {"count": torch.tensor(1)}

    method = type("F", (PGDAT,), {"name": "f", "extensions": (Forgetful,)})(
        TrainingSetup(num_samples=6, num_classes=4, epochs=2))
    with pytest.raises(TypeError, match="does not declare has_state"):
        method.state_dict()


def test_an_extensions_logged_values_are_declared_on_every_method_that_lists_it():
    class Shown(Extension):
        key = "shown"
        logged = (LoggedValue("shown_now", "shown"), LoggedValue("te_weight_now", "a second TE weight"))

    method_class = type("S", (MARTTE,), {"name": "s", "extensions": (TemporalEnsembling, Shown)})
    assert MART.logged == () and MARTTE.logged == TemporalEnsembling.logged
    # each key once: the first declaration (TE's own) wins
    assert method_class.logged == TemporalEnsembling.logged + (Shown.logged[0],)


# --------------------------------------------------------------------------- the attack's mode (--attack-bn)
class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.modes = _net(), []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_attack_mode_is_set_through_the_method(mode):
    model = ModeRecorder().train()  # as the trainer's, whose attacks run in eval mode by default
    method = MART(TrainingSetup(num_samples=6, num_classes=4, epochs=2, eps=0.1, step_size=0.03, steps=2))
    method.set_attack_mode(model, mode)
    x, y, index = _batch()
    method.attack(model, x, y, index, 1)
    assert model.modes == [mode == "train"] * 2 and model.training  # back in train mode afterwards


def test_the_attack_mode_of_a_method_without_a_torchattacks_attack_is_refused():
    class OwnAttack(PGDAT):
        name = "own-attack"

        def build_attack(self, model):
            raise NotImplementedError

        def run_attack(self, model, x, y, penalty=None, clean_logits=None):
            return x

    method = OwnAttack(TrainingSetup(num_samples=6, num_classes=4, epochs=2))
    method.set_attack_mode(_net(), "eval")  # nothing to set
    with pytest.raises(MethodError) as info:
        method.set_attack_mode(_net(), "train")
    assert str(info.value) == ("--attack-bn train: method own-attack does not build a torchattacks attack "
                               "(build_attack), so its attack mode cannot be set; use --attack-bn eval")
    with pytest.raises(MethodError, match="--attack-bn must be one of eval, train, got 'sideways'"):
        method.set_attack_mode(_net(), "sideways")


def test_a_declared_derivation_fills_the_settings_left_out():
    """A method setting's run-dependent default is its declaration's ``derived`` (as for run settings):
    TE's schedule from the epochs, AWP's warm-up from the epochs and the method class."""
    from at_memorization.methods import TrainingSetup, get_method
    from at_memorization.plugins.temporal_ensembling.loss import default_schedule

    setup = TrainingSetup(num_samples=4, num_classes=10, epochs=10)
    te = get_method("pgd-at-te")(setup)
    assert (te.settings["te_start"], te.settings["te_end"]) == default_schedule(10) == (4, 8)
    assert te.derived == ("te_start", "te_end") and te.notes  # the note names the derived schedule
    given = get_method("pgd-at-te")(setup, te_start=3)
    assert (given.settings["te_start"], given.derived, given.notes) == (3, ("te_end",), [])
    awp = get_method("trades-awp")(TrainingSetup(num_samples=4, num_classes=10, epochs=100))
    assert (awp.settings["awp_gamma"], awp.settings["awp_warmup"]) == (0.005, 4)  # 9 of 200 -> 4 of 100
