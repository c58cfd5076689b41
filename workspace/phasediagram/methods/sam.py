"""Sharpness-Aware Minimisation (Foret et al., ICLR 2021) and its adaptive variant ASAM (Kwon et al., 2021).

SAM minimises max_{||e|| <= rho} L(w + e) by a first-order approximation of the inner maximum.
With L the objective of one batch (cross-entropy plus the regularizer's penalty, if any) and
g = grad L(w), one step is

    e     = rho * g / ||g||_2                       (SAM; ||.||_2 over all trainable parameters)
    e     = rho * T^2 g / ||T g||_2, T = |w| + eta  (ASAM, `adaptive=True`; elementwise)
    g_SAM = grad L(w + e)
    w    <- torch.optim.SGD step at w with gradient g_SAM:
            v <- momentum * v + g_SAM + weight_decay * w,   w <- w - lr * v

so weight decay enters exactly as in plain SGD (coupled L2 at w, not inside the ascent), and the
ascent and descent passes both see the regularizer. A zero gradient gives e = 0 (Foret et al.'s
1e-12 guard in the denominator). With rho = 0 the step is plain SGD, bit for bit: the second
pass runs at the same weights on the same batch.

BatchNorm: the running statistics are updated by the first pass (at w, as in SGD) only; the
buffers are restored after the pass at w + e. The loss returned is the cross-entropy at w.
ASAM's reference radius is larger than SAM's (Kwon et al. use rho around 0.5-2 on CIFAR).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phasediagram.methods.base import restore_buffers, snapshot_buffers
from phasediagram.methods.sgd import SGD
from phasediagram.options import flag, real, validate

GRAD_NORM_EPS = 1e-12


# ------------------------------------------------------------------ helpers shared by the methods
@dataclass(frozen=True)
class SAMOptions:
    rho: float = real(0.05, low=0)  # radius of the ascent step (Foret et al.'s default)
    adaptive: bool = flag(False)  # ASAM: scale the ascent elementwise by T = |w| + eta
    eta: float = real(0.01, low=0)  # ASAM's offset in T (Kwon et al.'s default)
    nesterov: bool = flag(False)  # Nesterov momentum in the descent step, as for plain SGD

    def __post_init__(self):
        validate(self, "optimizer_options")


class SAM(SGD):
    """SAM / ASAM: the SGD-momentum step at w with the gradient taken at w + e (module docstring)."""

    def __init__(self, model, *, lr, momentum, weight_decay, epochs=None, seed=0, options: SAMOptions = SAMOptions(),
                 regularizer=None):
        super().__init__(model, lr=lr, momentum=momentum, weight_decay=weight_decay, options=options,
                         regularizer=regularizer)
        self.options = options
        self.params = [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def ascent(self) -> list[torch.Tensor]:
        """The perturbation e of every parameter, from the gradients currently in `.grad`."""
        o = self.options
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        scales = [(p.abs() + o.eta) if o.adaptive else None for p in self.params]
        scaled = [g if t is None else t * g for g, t in zip(grads, scales)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled])) if scaled else 0.0
        factor = o.rho / (norm + GRAD_NORM_EPS)
        return [factor * (g if t is None else t * t * g) for g, t in zip(grads, scales)]

    def step(self, x, y, epoch: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss, total = self.objective(x, y, epoch)
        total.backward()
        buffers = snapshot_buffers(self.model)
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, e in zip(self.params, self.ascent()):
                p.add_(e)
        self.opt.zero_grad(set_to_none=True)
        self.objective(x, y, epoch)[1].backward()
        with torch.no_grad():
            for p, w in zip(self.params, saved):
                p.copy_(w)
        restore_buffers(self.model, buffers)
        self.opt.step()
        return float(loss.detach())
