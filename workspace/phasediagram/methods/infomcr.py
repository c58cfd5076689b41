"""The InfoMCR regularizer (Jia & Su, ICML 2020): a penalty on the sub-batch gradient norms.

The batch (x, y) is cut into M contiguous sub-batches (torch.tensor_split; min(M, batch size) of
them, sizes differing by at most one). With L_m(w) the mean cross-entropy of sub-batch m and
g_m = grad L_m(w) treated as a constant (stop-gradient),

    penalty(w) = beta * (1/M) sum_m [ L_m(w) - L_m(w - alpha g_m) ]          (~ beta alpha mean_m ||g_m||^2)
    grad penalty(w) = beta * (1/M) sum_m [ g_m - grad L_m(w - alpha g_m) ]    (~ beta alpha mean_m H_m g_m)

Reference setting: alpha = 1e-4, beta = 10, M = 8; the penalty is 0 before epoch `start_epoch`
(the reference switches it on after a warm-up). The penalty is small, so the two losses nearly
cancel: in float32 its value and gradient keep about three significant digits at alpha = 1e-4.

Every forward pass here goes through torch.func.functional_call with the model's parameters (or
the shifted ones) and *copies* of its buffers: in train mode BatchNorm uses each sub-batch's own
statistics for both L_m(w) and L_m(w - alpha g_m), and the model's running statistics are left
untouched. The logits of the training forward pass are not reused, so that both terms of a
sub-batch are evaluated the same way. Cost: per batch, 2M sub-batch forward passes and M
backward passes on top of the training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.nn import functional as F

from phasediagram.options import integer, real, validate


@dataclass(frozen=True)
class InfoMCROptions:
    alpha: float = real(1e-4, low=0, open_low=True)  # step along -g_m for the shifted loss
    beta: float = real(10.0, low=0)  # weight of the penalty
    M: int = integer(8, low=1)  # number of sub-batches
    start_epoch: int = integer(0, low=0)  # the penalty is 0 in epochs before this one (0-based)

    def __post_init__(self):
        validate(self, "regularizer_options")


class InfoMCR:
    """regularizer(model, x, y, logits, epoch) -> beta mean_m [L_m(w) - L_m(w - alpha sg(g_m))] (module docstring)."""

    def __init__(self, options: InfoMCROptions = InfoMCROptions(), seed: int = 0):
        self.options = options

    def __call__(self, model, x, y, logits, epoch: int) -> torch.Tensor:
        o = self.options
        if epoch < o.start_epoch or o.beta == 0:
            return logits.new_zeros(())
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], [p for _, p in named]
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        m = min(o.M, len(y))
        total = logits.new_zeros(())
        for xm, ym in zip(x.tensor_split(m), y.tensor_split(m)):
            loss = F.cross_entropy(functional_call(model, {**dict(named), **frozen, **buffers}, (xm,)), ym)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            shifted = {n: p if g is None else p - o.alpha * g.detach() for n, p, g in zip(names, params, grads)}
            shifted_loss = F.cross_entropy(functional_call(model, {**shifted, **frozen, **buffers}, (xm,)), ym)
            total = total + (loss - shifted_loss)
        return o.beta * total / m
