"""Neighbours of a model's weights and the divergence of two predictive distributions."""

from __future__ import annotations

from typing import Mapping

import torch
from torch.nn import functional as F


def sample_neighbour(params: Mapping[str, torch.Tensor], rho: float,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A neighbour {name: w_l + delta_l}, delta_l = rho ||w_l|| u_l / ||u_l||, u_l ~ N(0, I).

    u_l is drawn on the CPU from `generator` (one `randn` per tensor, in the order of `params`) and
    moved to w_l's device and dtype, so a seed gives the same neighbour on every device. delta_l is
    computed without gradient (from w_l detached), so the returned tensors are differentiable with
    respect to `params` with identity Jacobian: a regularizer's gradient flows through w into both
    w and w + delta. `params` are not modified.
    """
    out = {}
    for name, w in params.items():
        u = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            u_norm = u.norm()
            scale = rho * w.detach().to(torch.float64).norm().cpu() / u_norm if u_norm > 0 else torch.zeros(())
            delta = (scale * u).to(device=w.device, dtype=w.dtype)
        out[name] = w + delta
    return out


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_i KL(p_i || q_i) = (1/N) sum_i sum_c p_ic (log p_ic - log q_ic), p = softmax(logits_p).

    `logits_*` are (N, C); returns a differentiable scalar (computed through log_softmax).
    """
    log_p = F.log_softmax(logits_p, dim=-1)
    log_q = F.log_softmax(logits_q, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()
