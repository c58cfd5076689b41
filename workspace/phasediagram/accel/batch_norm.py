"""Training-mode batch normalisation of channel-major activations: large ones' statistics from sums.

For x viewed as (C, n) (channel c's n values in row c; member-major ensemble activations
(1, S*C, L, B) are this view without a copy), with mu_c = (1/n) sum_i x_ci,
sigma_c^2 = (1/n) sum_i (x_ci - mu_c)^2 (biased, as BatchNorm normalises) and
r_c = 1 / sqrt(sigma_c^2 + eps), the forward is y_ci = w_c r_c (x_ci - mu_c) + b_c: mu from a sum,
sigma^2 two-pass as ||x_c - mu_c||^2 / n (no cancellation from E[x^2] - mu^2), then y in one pass
by torch's batch norm given mu and sigma^2 as its statistics (its eval-mode affine map).
The backward is torch's own batch-norm backward given (x, mu, r):
dL/db_c = sum_i g_ci, dL/dw_c = r_c sum_i g_ci (x_ci - mu_c), dL/dx_ci = w_c r_c (g_ci - mean_j g_cj
- (x_ci - mu_c) r_c^2 mean_j g_cj (x_cj - mu_c)) for g = dL/dy.

Why: torch's CPU batch norm computes the statistics with Welford's update, slow on large
channels: these passes are used from `MIN_ELEMENTS` values on, where bench/bench_batch_norm.py
finds them faster (docs/performance.md); below that, torch's single fused call is called directly. First derivatives only: a
second derivative raises (`once_differentiable`); the ensemble trains with first derivatives, and in
eval mode, where Hessian-vector products differentiate twice, its BatchNorm is folded away.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

MIN_ELEMENTS = 2**17  # below this many activation values torch's batch norm is as fast (bench_batch_norm.py)


class _ChannelBatchNorm(torch.autograd.Function):
    """(y, mu, sigma^2) of `batch_norm_channels` for x (C, n); gradients flow through y only.
    Saved for the backward: x, mu and r (the temporary x - mu only serves the variance)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        c, n = x.shape
        mean = x.sum(1) / n
        var = torch.linalg.vector_norm(x - mean[:, None], dim=1).square_().div_(n)
        y = torch.batch_norm(x.view(1, c, n), weight, bias, mean, var, False, 0.0, eps,
                             torch.backends.cudnn.enabled).view(c, n)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _mean, _var):
        x, weight, mean, rstd = ctx.saved_tensors
        c, n = x.shape
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            g.reshape(1, c, n), x.view(1, c, n), weight, None, None, mean, rstd, True, 0.0,
            list(ctx.needs_input_grad[:3]))
        return (grad_x.view(c, n) if grad_x is not None else None), grad_w, grad_b, None


def batch_norm_channels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mu, sigma^2) for x of shape (C, n): y = w r (x - mu) + b per channel, as in the module docstring."""
    return _ChannelBatchNorm.apply(x, weight, bias, eps)


def applies(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> bool:
    """Whether `train_forward` serves `norm` on x: training mode, affine, running statistics tracked,
    one sample axis of size 1 (x is (1, C, *positions)), contiguous, a floating dtype."""
    return (norm.training and norm.affine and norm.track_running_stats and x.dim() >= 3 and x.shape[0] == 1
            and x.is_contiguous() and x.is_floating_point() and x.shape[1] == norm.num_features)


def uses_sums(x: torch.Tensor) -> bool:
    """Whether `train_forward` computes the statistics from sums (`MIN_ELEMENTS` values or more) rather
    than with torch's batch-norm kernel."""
    return x.numel() >= MIN_ELEMENTS


def train_forward(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm`(x) in training mode for x (1, C, *positions) (`applies`), and its running statistics
    updated as torch's BatchNorm does: running <- (1 - m) running + m stat, with the unbiased
    variance n / (n - 1) sigma^2, m = momentum (or 1 / batches tracked when momentum is None).
    Below `MIN_ELEMENTS` values, torch's kernel called directly (`torch.batch_norm`, the call
    `nn.BatchNorm2d` ends in, without its Python checks); else the sums (`batch_norm_channels`)."""
    c = x.shape[1]
    flat = x.view(c, -1)
    n = flat.shape[1]
    if n < 2:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    with torch.no_grad():
        norm.num_batches_tracked.add_(1)
    m = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    if not uses_sums(x):
        return torch.batch_norm(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, m, norm.eps,
                                torch.backends.cudnn.enabled)
    y, mean, var = batch_norm_channels(flat, norm.weight, norm.bias, norm.eps)
    with torch.no_grad():
        norm.running_mean.mul_(1 - m).add_(mean, alpha=m)
        norm.running_var.mul_(1 - m).add_(var, alpha=m * n / (n - 1))
    return y.view_as(x)
