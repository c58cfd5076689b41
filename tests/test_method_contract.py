"""The training-method contract, for every registered optimizer and regularizer: a new method gets these
tests for free. A step returns the batch's finite loss and moves the weights; the same seed gives the
same steps; `state_dict` goes through `torch.save`/`torch.load(weights_only=True)` and a method resumed
from it takes the step the uninterrupted one takes; a regularizer is a differentiable scalar. Every option
declares its rule, and the options reject values just outside its bounds and accept its inclusive bounds."""

from __future__ import annotations

import io
import math

import pytest
import torch

from phasediagram.methods import OPTIMIZERS, REGULARIZERS
from phasediagram.models import families as models
from phasediagram.options import Rule, rules

from .test_metric_contract import check_declared_bounds

CASES = [(opt, "none") for opt in OPTIMIZERS] + [("sgd", reg) for reg in REGULARIZERS if reg != "none"]
GROUPS = ([("optimizer_options", name) for name in OPTIMIZERS]
          + [("regularizer_options", name) for name in REGULARIZERS])


def options_class(group: str, name: str) -> type:
    return (OPTIMIZERS if group == "optimizer_options" else REGULARIZERS)[name].options


def batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]


def build(optimizer: str, regularizer: str, seed: int = 7):
    torch.manual_seed(0)
    model = models.create("mlp", 4, (40,), 10).double()
    opt, reg = OPTIMIZERS[optimizer], REGULARIZERS[regularizer]
    return opt.build(model, lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=3, seed=seed, options=opt.options(),
                     regularizer=reg.build(reg.options(), seed=seed))


def weights(method) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in method.model.parameters()])


def test_every_entry_has_options_and_a_description():
    for entry in [*OPTIMIZERS.values(), *REGULARIZERS.values()]:
        assert entry.description and entry.options() is not None


@pytest.mark.parametrize("group, name", GROUPS)
def test_every_option_declares_a_rule_its_default_obeys(group, name):
    cls = options_class(group, name)
    assert all(isinstance(rule, Rule) for rule in rules(cls).values()), rules(cls)
    default = cls()
    assert all(rule.accepts(getattr(default, field)) for field, rule in rules(cls).items())


@pytest.mark.parametrize("group, name", GROUPS)
def test_options_reject_values_outside_their_declared_bounds(group, name):
    check_declared_bounds(options_class(group, name), group)


@pytest.mark.parametrize("optimizer, regularizer", CASES)
def test_method_contract(optimizer, regularizer):
    data = batches()
    method = build(optimizer, regularizer)
    before = weights(method)
    losses = [method.step(x, y, epoch=0) for x, y in data[:2]]
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert not torch.equal(weights(method), before)
    again = build(optimizer, regularizer)
    assert [again.step(x, y, epoch=0) for x, y in data[:2]] == losses and torch.equal(weights(again), weights(method))
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    resumed = build(optimizer, regularizer, seed=7)
    resumed.model.load_state_dict(method.model.state_dict())
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    method.set_lr(0.02)
    resumed.set_lr(0.02)
    for x, y in data[2:]:
        assert resumed.step(x, y, epoch=1) == method.step(x, y, epoch=1)
    assert torch.equal(weights(resumed), weights(method))


@pytest.mark.parametrize("regularizer", [r for r in REGULARIZERS if r != "none"])
def test_regularizer_is_a_differentiable_scalar(regularizer):
    torch.manual_seed(0)
    model = models.create("mlp", 4, (40,), 10).double()
    reg = REGULARIZERS[regularizer]
    penalty_of = reg.build(reg.options(), seed=3)
    x, y = batches(1)[0]
    penalty = penalty_of(model, x, y, model(x), 10)
    assert penalty.dim() == 0 and torch.isfinite(penalty)
    grads = torch.autograd.grad(penalty, [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
