"""The Neighborhood Region Smoothing (NRS) regularizer (Zhao & Zhang, 2022).

NRS asks the model's outputs to change little over a neighbourhood of its weights. On a batch x:

    penalty(w) = alpha * (1/K) sum_k KL( p(x; w) || p(x; w + delta_k) ),
    KL(p || q) = (1/N) sum_i sum_c p_ic (log p_ic - log q_ic),   p = softmax of the logits,

with K = `n_neighbours` independent draws delta_k. Our choices, and why:

- Sampling and radius. delta is drawn per parameter tensor T as a uniformly random direction on
  the sphere of radius rho ||w_T||_F:  delta_T = rho ||w_T||_F u_T / ||u_T||_F,  u_T ~ N(0, I)
  (u drawn in float64 on the CPU, so a seed gives the same neighbour on every device).
  The radius is relative to each tensor's norm (layer-wise), so the neighbourhood scales with the
  weights and is unchanged by the per-layer rescalings a ReLU or BatchNorm network is invariant
  to (the reason ASAM and filter-normalised landscape plots use relative radii); a sphere rather
  than a ball fixes ||delta_T|| / ||w_T|| at exactly rho, so rho is the one number to report.
  A tensor of norm 0 (e.g. a bias initialised to zero) is not perturbed. delta is a constant in
  the penalty (drawn without gradient); the gradient flows through both p(x; w) and
  p(x; w + delta). Sampling and the KL are `sample_neighbour` and `kl_divergence` of the `nrs`
  metric (metrics/nrs.py), so the regularizer penalises what that metric measures (the metric:
  BatchNorm in eval mode, K = 10 neighbours, a whole split).
- Number of neighbours: K = 1 by default (one extra forward pass per batch; the penalty is an
  unbiased estimate of its expectation over delta either way, and SGD averages over batches).
- KL direction: KL(p_w || p_{w+delta}), the model's own prediction as the reference
  distribution, as written in Zhao & Zhang's objective: it is the neighbour's excess
  cross-entropy on the model's soft labels, so it weighs most the classes the model predicts.
  The batch's logits of the training forward pass are reused for p(x; w).
- Randomness. The K draws of the c-th call in epoch e come from a generator seeded by
  stable_seed("nrs", seed, e, c): the draws depend on (seed, epoch, call) only, so a run resumed at
  an epoch boundary draws the same neighbours even under an optimizer whose state_dict does not
  carry the regularizer's; `state_dict` holds (epoch, call) for mid-epoch resumes.
- BatchNorm: the neighbour's forward pass runs in the model's current mode (batch statistics in
  training, like the training pass) on copies of the buffers, so running statistics are untouched.

Defaults (ours, to be tuned per study): alpha = 1, rho = 0.05, K = 1. With rho = 0 the penalty is
exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from phasediagram.numerics.perturbation import kl_divergence, sample_neighbour
from phasediagram.options import integer, real, validate
from phasediagram.seeding import stable_seed


@dataclass(frozen=True)
class NRSOptions:
    alpha: float = real(1.0, low=0)  # weight of the penalty
    rho: float = real(0.05, low=0)  # relative radius: ||delta_T|| = rho ||w_T|| for every parameter tensor T
    n_neighbours: int = integer(1, low=1)  # K, neighbours drawn per batch
    start_epoch: int = integer(0, low=0)  # the penalty is 0 in epochs before this one (0-based)

    def __post_init__(self):
        validate(self, "regularizer_options")


class NRS:
    """regularizer(model, x, y, logits, epoch) -> alpha mean_k KL(p(x; w) || p(x; w + delta_k)) (module docstring)."""

    def __init__(self, options: NRSOptions = NRSOptions(), seed: int = 0):
        self.options = options
        self.seed = seed
        self.epoch = None
        self.calls = 0

    def _generator(self, epoch: int) -> torch.Generator:
        if epoch != self.epoch:
            self.epoch, self.calls = epoch, 0
        generator = torch.Generator().manual_seed(stable_seed("nrs", self.seed, epoch, self.calls))
        self.calls += 1
        return generator

    def __call__(self, model, x, y, logits, epoch: int) -> torch.Tensor:
        o = self.options
        if epoch < o.start_epoch or o.alpha == 0:
            return logits.new_zeros(())
        generator = self._generator(epoch)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
        total = logits.new_zeros(())
        for _ in range(o.n_neighbours):
            buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
            neighbour = sample_neighbour(params, o.rho, generator)
            total = total + kl_divergence(logits, functional_call(model, {**neighbour, **frozen, **buffers}, (x,)))
        return o.alpha * total / o.n_neighbours

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.calls = state["epoch"], int(state["calls"])
