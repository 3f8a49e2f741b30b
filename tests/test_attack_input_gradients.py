"""Issue 21, item 1: the training attack computes input gradients only, eager, compiled and bf16.

Eager ``autograd.grad(loss, x_adv)`` already skips weight gradients. A model compiled with
``torch.compile`` did not: AOTAutograd compiles one backward for every graph input that requires
grad, so each attack step computed (and threw away) every weight gradient: ~200 extra cuDNN
weight-gradient kernels per PGD-10 step on an H200 (docs/benchmarks.md). The attack now runs with
the parameters frozen (``attacks.input_gradients_only``).

The compiled checks use a Python-only AOTAutograd backend (no C++ toolchain needed) that looks at
each backward graph AOTAutograd produces, as inductor would receive it: how many gradients it
returns, and how many ``convolution_backward`` calls in it compute a weight gradient
(``output_mask[1]``). The eager checks count the same operator in a ``TorchDispatchMode``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from at_memorization.attacks import pgd20
from at_memorization.data import load_data
from at_memorization.methods import TrainingSetup, get_method
from at_memorization.models import build_model
from at_memorization.training import RunConfig, Trainer

TE_ARGS = {"te_start": 1, "te_end": 2}
METHODS = [("pgd-at", {}), ("pgd-at-te", TE_ARGS), ("trades", {}), ("trades-te", TE_ARGS), ("mart", {})]
CONV_BACKWARD = torch.ops.aten.convolution_backward.default


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_data("mnist", mnist_dir, train_size=96, test_size=32)


def _counting_backend(records: list, phase: list):
    """An AOTAutograd backend that runs the graphs as they are and records, for every call of a
    compiled backward: ``phase[0]`` at that moment, the number of gradients it returns, and its
    weight-gradient convolutions."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def forward_compiler(gm, example_inputs):
        return make_boxed_func(gm.forward)

    def backward_compiler(gm, example_inputs):
        weight_grads = sum(1 for node in gm.graph.nodes
                           if node.op == "call_function" and node.target is CONV_BACKWARD and node.args[-1][1])
        (outputs,) = [node.args[0] for node in gm.graph.nodes if node.op == "output"]
        grads = sum(1 for output in outputs if output is not None)
        compiled = make_boxed_func(gm.forward)

        def run(args):
            records.append({"phase": phase[0], "grads": grads, "conv_weight_grads": weight_grads})
            return compiled(args)

        run._boxed_call = True
        return run

    return aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler)


class ConvBackwardMasks(TorchDispatchMode):
    """Counts eager ``convolution_backward`` calls that compute a weight gradient."""

    def __init__(self):
        super().__init__()
        self.calls = self.weight_grads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is CONV_BACKWARD:
            self.calls += 1
            self.weight_grads += bool((args[-1] if len(args) == 11 else kwargs["output_mask"])[1])
        return func(*args, **kwargs)


def _method(name, args, n):
    return get_method(name)(TrainingSetup(num_samples=n, num_classes=10, epochs=2, steps=2), **args)


def _batch(mnist, n=16):
    images, y, index = mnist.train.batch(torch.arange(n))
    return images.float() / 255, y, index


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,args", METHODS)
def test_compiled_attack_computes_no_weight_gradients(name, args, bf16, mnist):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("preactresnet18_w16", 10, 1, 28)  # convolutions and BatchNorm
    params = list(model.parameters())
    records, phase = [], ["attack"]
    compiled = torch.compile(model, backend=_counting_backend(records, phase), dynamic=False)
    method = _method(name, args, len(mnist.train))
    x, y, index = _batch(mnist)
    with _autocast(bf16):
        x_adv = method.attack(compiled, x, y, index, 2)  # epoch 2: TE active, full weight
    assert records, "no compiled backward ran: the check would prove nothing"
    # One gradient per backward, the input's; no weight-gradient convolution at any attack step.
    assert {(r["grads"], r["conv_weight_grads"]) for r in records} == {(1, 0)}, records
    assert len(records) == 2  # one backward per attack step (steps=2)
    assert all(p.requires_grad and p.grad is None for p in params)
    assert 0 < (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    torch._dynamo.reset()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,args", METHODS)
def test_eager_attack_computes_no_weight_gradients(name, args, bf16, mnist):
    torch.manual_seed(0)
    model = build_model("preactresnet18_w16", 10, 1, 28)
    method = _method(name, args, len(mnist.train))
    x, y, index = _batch(mnist)
    with _autocast(bf16), ConvBackwardMasks() as counted:
        method.attack(model, x, y, index, 2)
    assert counted.calls > 0 and counted.weight_grads == 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_compiled_training_step_computes_weight_gradients_in_the_update_only(mnist, tmp_path, monkeypatch):
    """The trainer's own ``--compile`` path (one compiled module for attack and update)."""
    records, phase = [], ["update"]
    real_compile = torch.compile

    def compile_counting(model, **kwargs):
        return real_compile(model, **{**kwargs, "backend": _counting_backend(records, phase)})

    monkeypatch.setattr(torch, "compile", compile_counting)
    torch._dynamo.reset()
    config = RunConfig(method="pgd-at-te", dataset="mnist", model="preactresnet18_w16", epochs=2, batch_size=32,
                       steps=2, eval_steps=2, milestones=[1], eps=0.1, step_size=0.025, lr=0.05, seed=0,
                       method_args=dict(TE_ARGS), compile=True)
    trainer = Trainer(config, tmp_path / "run", device="cpu", data=mnist)
    n_params = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    real_attack = trainer.method.attack

    def attack(*args, **kwargs):
        phase[0] = "attack"
        try:
            return real_attack(*args, **kwargs)
        finally:
            phase[0] = "update"

    monkeypatch.setattr(trainer.method, "attack", attack)
    try:
        trainer.train_epoch(2)
    finally:
        trainer.close()
        torch._dynamo.reset()
    attack_calls = [r for r in records if r["phase"] == "attack"]
    update_calls = [r for r in records if r["phase"] == "update"]
    assert len(attack_calls) == 3 * 2 and len(update_calls) == 3  # 3 steps of PGD-2
    assert all(r["grads"] == 1 and r["conv_weight_grads"] == 0 for r in attack_calls), attack_calls
    # The update still differentiates every parameter (the counter sees weight gradients where they belong).
    assert all(r["grads"] == n_params and r["conv_weight_grads"] > 0 for r in update_calls), update_calls
    assert all(p.requires_grad for p in trainer.model.parameters())


def test_frozen_flags_are_restored_on_error_and_untouched_when_already_frozen():
    from at_memorization.attacks import input_gradients_only

    model = build_model("smallcnn", 10, 1, 28)
    first, *rest = list(model.parameters())
    first.requires_grad_(False)  # a user's frozen layer stays frozen
    with pytest.raises(RuntimeError, match="inside"):
        with input_gradients_only(model):
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("inside")
    assert not first.requires_grad and all(p.requires_grad for p in rest)

    def failing_penalty(logits):
        raise ValueError("penalty failed")

    attack = pgd20(model)
    with pytest.raises(ValueError, match="penalty failed"):
        attack(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), penalty=failing_penalty)
    assert not first.requires_grad and all(p.requires_grad for p in rest)
