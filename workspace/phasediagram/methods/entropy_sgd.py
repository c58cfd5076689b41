"""Entropy-SGD (Chaudhari et al., ICLR 2017), with gamma scoping as in Pittorino et al. (ICLR 2021).

Entropy-SGD descends the local entropy F(w) = -log int exp(-L(w') - gamma/2 ||w' - w||^2) dw',
whose gradient is gamma (w - <w'>), <.> the mean under the Gibbs measure around w. One outer step
on a batch (x, y), with L(.) that batch's cross-entropy plus the regularizer's penalty:

    w'_0 = mu_0 = w
    for l = 1..L:                                               (SGLD inner loop, no momentum)
        w'_l  = w'_{l-1} - eta' [grad L(w'_{l-1}) + gamma_t (w'_{l-1} - w)] + sqrt(eta') eps xi_l,
                xi_l ~ N(0, I) from a generator seeded by the run's seed
        mu_l  = (1 - alpha) mu_{l-1} + alpha w'_l
    d  = w - mu_L                         (`scale_by_gamma=False`, the default)
    d  = gamma_t (w - mu_L)               (`scale_by_gamma=True`: the local-entropy gradient itself)
    w <- torch.optim.SGD step at w with gradient d:  v <- momentum v + d + weight_decay w,  w <- w - lr v

Outer step. By default the gradient fed to SGD is w - mu, i.e. w <- w - lr (w - mu) without
momentum, as in Chaudhari et al.'s reference code: the outer lr then measures how far w moves
towards mu, whatever gamma is, so growing gamma (scoping) does not shrink the outer step and the
lr grid of a phase diagram means the same for this method as for SGD. `scale_by_gamma=True`
feeds the true local-entropy gradient gamma (w - mu) instead (Pittorino et al.'s code rescales
the outer lr by gamma, the same thing). Weight decay acts in the outer step only, at w, as in SGD.

Scoping. gamma_t = gamma_0 (1 + gamma_1)^t with t the epoch (0-based), constant within an epoch.
Per epoch rather than per outer step, so the coupling schedule is the same in every cell of a
grid whose temperature axis is the batch size (per-step scoping would make gamma grow faster
for small batches), and a run resumed at an epoch boundary needs no step counter.

Batches. The contract hands one batch per step; all L inner steps use that same batch. The batch
size therefore keeps its meaning (the minibatch of every gradient evaluation), an epoch makes as
many outer steps as SGD, and costs L times as many gradient evaluations.

BatchNorm. The running statistics are updated by the first inner forward pass only (at w' = w,
as an SGD step would); later inner passes at w' != w leave them as they were.

Closed form (tested): with L = 1 and eps = 0, w'_1 = w - eta' grad L(w) and
mu_1 = w - alpha eta' grad L(w), so d = s grad L(w) with s = alpha eta' (times gamma_t when
`scale_by_gamma`): Entropy-SGD is then exactly SGD (same momentum and weight decay) on the
objective s L.

Defaults: L = 5, eta' = 0.1, eps = 1e-4, alpha = 0.25 (Chaudhari et al.'s code keeps 0.75 of the
old mean), gamma_0 = 0.03 and gamma_1 = 0.1 per epoch (about 17x growth over 30 epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from phasediagram.methods.base import (
    load_regularizer_state,
    regularizer_state,
    restore_buffers,
    snapshot_buffers,
)
from phasediagram.numerics.sgd import set_lr, sgd
from phasediagram.options import flag, integer, real, validate
from phasediagram.seeding import stable_seed


@dataclass(frozen=True)
class EntropySGDOptions:
    L: int = integer(5, low=1)  # SGLD steps per outer step
    inner_lr: float = real(0.1, low=0, open_low=True)  # eta', the SGLD step size
    noise: float = real(1e-4, low=0)  # epsilon, the thermal noise scale (0: no noise)
    alpha: float = real(0.25, low=0, high=1, open_low=True)  # weight of the newest w' in the running mean mu
    gamma0: float = real(0.03, low=0)  # coupling at epoch 0
    gamma1: float = real(0.1, low=0)  # scoping rate: gamma_t = gamma0 (1 + gamma1)^epoch
    scale_by_gamma: bool = flag(False)  # outer gradient gamma (w - mu) instead of (w - mu)
    nesterov: bool = flag(False)  # Nesterov momentum in the outer step

    def __post_init__(self):
        validate(self, "optimizer_options")


class EntropySGD:
    """Entropy-SGD: an SGLD inner loop around w, then an SGD-momentum step along w - mu (module docstring)."""

    def __init__(self, model, *, lr, momentum, weight_decay, epochs=None, seed=0,
                 options: EntropySGDOptions = EntropySGDOptions(), regularizer=None):
        self.model = model
        self.options = options
        self.regularizer = regularizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = sgd(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       nesterov=options.nesterov and momentum > 0)
        self.generator = torch.Generator().manual_seed(stable_seed("entropy_sgd", seed))

    def set_lr(self, lr: float) -> None:
        set_lr(self.opt, lr)

    def gamma(self, epoch: int) -> float:
        """gamma_t = gamma0 (1 + gamma1)^epoch."""
        return self.options.gamma0 * (1.0 + self.options.gamma1) ** epoch

    def _noise(self, p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)

    def step(self, x, y, epoch: int) -> float:
        o = self.options
        gamma = self.gamma(epoch)
        noise_scale = math.sqrt(o.inner_lr) * o.noise
        with torch.no_grad():
            w = [p.detach().clone() for p in self.params]
            mu = [p.detach().clone() for p in self.params]
        first_loss, buffers = None, None
        for _ in range(o.L):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            total = loss if self.regularizer is None else loss + self.regularizer(self.model, x, y, logits, epoch)
            grads = torch.autograd.grad(total, self.params, allow_unused=True)
            if first_loss is None:
                first_loss, buffers = float(loss.detach()), snapshot_buffers(self.model)
            with torch.no_grad():
                for p, g, w0, m in zip(self.params, grads, w, mu):
                    d = (p - w0).mul_(gamma)
                    if g is not None:
                        d.add_(g)
                    p.add_(d, alpha=-o.inner_lr)
                    if noise_scale > 0:
                        p.add_(self._noise(p), alpha=noise_scale)
                    m.mul_(1.0 - o.alpha).add_(p, alpha=o.alpha)
        restore_buffers(self.model, buffers)
        scale = gamma if o.scale_by_gamma else 1.0
        with torch.no_grad():
            for p, w0, m in zip(self.params, w, mu):
                p.copy_(w0)
                p.grad = (w0 - m).mul_(scale)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return first_loss

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "generator": self.generator.get_state(),
                "regularizer": regularizer_state(self.regularizer)}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.generator.set_state(state["generator"])
        load_regularizer_state(self.regularizer, state.get("regularizer"))
