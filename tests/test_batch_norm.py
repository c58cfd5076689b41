"""`batch_norm`: training-mode BatchNorm from sums equals torch's, values, gradients and running statistics.

Reference: torch's `nn.BatchNorm2d` on the same (1, C, L, B) input, float64, tolerance 1e-12
relative to the largest entry (observed ~1e-15).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phasediagram.accel import batch_norm
from phasediagram.accel.ensemble_models import FoldableBatchNorm2d


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def pair(channels: int, momentum: float | None) -> tuple[nn.BatchNorm2d, FoldableBatchNorm2d]:
    ref = nn.BatchNorm2d(channels, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        ref.bias.normal_(generator=torch.Generator().manual_seed(2))
    ours = FoldableBatchNorm2d(channels, momentum=momentum).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("sums", [True, False])  # the sums, or torch's kernel called directly (small activations)
def test_equals_torch_batch_norm_over_several_steps(monkeypatch, momentum, sums):
    monkeypatch.setattr(batch_norm, "MIN_ELEMENTS", 0 if sums else 10**9)
    ref, ours = pair(6, momentum)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = (torch.randn(1, 6, 5, 7, generator=g, dtype=torch.float64) * 3 + 10 * step).requires_grad_()
        assert batch_norm.applies(ours, x) and batch_norm.uses_sums(x) == sums
        upstream = torch.randn(1, 6, 5, 7, generator=g, dtype=torch.float64)
        y_ref, y = ref(x), ours(x)
        assert close(y, y_ref)
        grads_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), upstream)
        grads = torch.autograd.grad(y, (x, ours.weight, ours.bias), upstream)
        assert all(close(a, b) for a, b in zip(grads, grads_ref))
        for k, v in ref.state_dict().items():  # running mean, unbiased running variance, batches tracked
            assert close(ours.state_dict()[k].double(), v.double()), k


def test_statistics_are_two_pass_exact_for_a_large_mean():
    """x = 1e4 + small noise in float32: E[x^2] - mu^2 would lose the variance; the two-pass one keeps it."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 2000, generator=g, dtype=torch.float64)
    x = (1e4 + noise).float()
    _, mean, var = batch_norm.batch_norm_channels(x, torch.ones(4), torch.zeros(4), 1e-5)
    exact = x.double().var(1, correction=0)
    assert torch.allclose(var.double(), exact, rtol=1e-3)
    assert torch.allclose(mean.double(), x.double().mean(1), rtol=1e-6)


def test_used_only_where_it_applies():
    norm = FoldableBatchNorm2d(4)
    big, small = torch.randn(1, 4, 64, batch_norm.MIN_ELEMENTS // 256 + 1), torch.randn(1, 4, 3, 5)
    assert batch_norm.applies(norm, big) and batch_norm.uses_sums(big)
    assert batch_norm.applies(norm, small) and not batch_norm.uses_sums(small)  # small: torch's kernel is faster
    assert not batch_norm.applies(norm, torch.randn(2, 4, 64, 1024))  # a sample axis: not a (C, n) view
    assert not batch_norm.applies(norm, big.transpose(2, 3))  # not contiguous
    norm.eval()
    assert not batch_norm.applies(norm, big)  # eval mode: running statistics (folded into the conv)


def test_second_derivatives_raise(monkeypatch):
    monkeypatch.setattr(batch_norm, "MIN_ELEMENTS", 0)
    _, ours = pair(3, 0.1)
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ours(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), x)


def test_one_value_per_channel_is_refused(monkeypatch):
    monkeypatch.setattr(batch_norm, "MIN_ELEMENTS", 0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        FoldableBatchNorm2d(3)(torch.randn(1, 3, 1, 1))
