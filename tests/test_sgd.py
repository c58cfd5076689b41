"""The one SGD step (`numerics.sgd`): its formula, its fused form, and its momentum as plain tensors.

References: the step written out in float64 (`reference_steps`) and torch's foreach SGD.
"""

from __future__ import annotations

import pytest
import torch

from phasediagram.numerics.sgd import momentum_of, set_lr, set_momentum, sgd

SHAPES = [(7, 3), (5,), (2, 3, 4), (64,), (10_003,)]
SETTINGS = [(0.9, 0.0, False), (0.9, 0.0, True), (0.5, 0.3, False), (0.0, 0.0, False)]


def start_and_grads(dtype, steps=5):
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=gen, dtype=dtype) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=gen, dtype=dtype) for shape in SHAPES] for _ in range(steps)]
    return start, grads


def reference_steps(start, grads, lrs, momentum, dampening, weight_decay, nesterov):
    """The step of numerics.sgd's docstring, operation by operation, on copies of `start`."""
    ws = [w.clone() for w in start]
    vs = [None] * len(ws)
    for step, (gs, lr) in enumerate(zip(grads, lrs)):
        for i, (w, g) in enumerate(zip(ws, gs)):
            g = g.add(w, alpha=weight_decay)
            if momentum:
                vs[i] = g.clone() if step == 0 else vs[i].mul(momentum).add(g, alpha=1 - dampening)
                d = g.add(vs[i], alpha=momentum) if nesterov else vs[i]
            else:
                d = g
            ws[i] = w.add(d, alpha=-lr)
    return ws


def run(opt, params, grads, lrs):
    for gs, lr in zip(grads, lrs):
        set_lr(opt, lr)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("momentum, dampening, nesterov", SETTINGS)
def test_the_step_is_the_formula_bit_for_bit(momentum, dampening, nesterov):
    """Unfused, on a CPU: torch's per-tensor step, whose rounding is the formula's (float64, equal bitwise)."""
    start, grads = start_and_grads(torch.float64)
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01]
    params = [w.clone().requires_grad_() for w in start]
    opt = sgd(params, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=5e-4, nesterov=nesterov)
    assert not opt.defaults["fused"]
    run(opt, params, grads, lrs)
    for p, ref in zip(params, reference_steps(start, grads, lrs, momentum, dampening, 5e-4, nesterov)):
        assert torch.equal(p.detach(), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum, dampening, nesterov", SETTINGS)
def test_fused_step_is_torchs_foreach_step_up_to_rounding(dtype, momentum, dampening, nesterov):
    """The same update as torch's foreach SGD; the fused kernel rounds some elements (its vector loop's
    tail) differently, so the values agree to the last bit or two, over sizes with and without a tail."""
    start, grads = start_and_grads(dtype)
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01]
    ours, other = [[t.clone().requires_grad_() for t in start] for _ in range(2)]
    hyper = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=5e-4, nesterov=nesterov)
    fused, reference = sgd(ours, **hyper, fused=True), torch.optim.SGD(other, **hyper, foreach=True)
    assert fused.defaults["fused"] and not reference.defaults["fused"]
    run(fused, ours, grads, lrs)
    run(reference, other, grads, lrs)
    eps = torch.finfo(dtype).eps
    for a, b in zip(ours, other):
        torch.testing.assert_close(a, b, rtol=8 * eps, atol=8 * eps)
    no_kernel = sgd([torch.zeros(2, dtype=torch.int64)], lr=0.1, fused=True)  # no fused kernel: torch's default
    assert no_kernel.defaults["fused"] is None


def test_momentum_as_tensors_resumes_the_same_run():
    """Stopping after 3 steps, keeping only the weights and momentum_of, and continuing in a new optimizer
    with set_momentum gives the uninterrupted run bit for bit; no buffer exists before a step."""
    start, grads = start_and_grads(torch.float64)
    lrs = [0.1] * 5
    names = [f"p{i}" for i in range(len(start))]
    whole = [w.clone().requires_grad_() for w in start]
    run(sgd(whole, lr=0.1, momentum=0.9, weight_decay=5e-4), whole, grads, lrs)
    first = {n: w.clone().requires_grad_() for n, w in zip(names, start)}
    opt = sgd(first.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert momentum_of(opt, first) == {}
    run(opt, list(first.values()), grads[:3], lrs[:3])
    velocity = {n: v.clone() for n, v in momentum_of(opt, first).items()}
    assert set(velocity) == set(names)
    second = {n: w.detach().clone().requires_grad_() for n, w in first.items()}
    resumed = sgd(second.values(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    set_momentum(resumed, second, velocity)
    run(resumed, list(second.values()), grads[3:], lrs[3:])
    for n, w in zip(names, whole):
        assert torch.equal(second[n].detach(), w.detach())
