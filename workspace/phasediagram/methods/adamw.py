"""AdamW (Loshchilov and Hutter 2019): Adam with decoupled weight decay, and a linear warmup.

With g_t the gradient of the batch's objective (cross-entropy plus the regularizer's penalty, if
any) at step t = 1, 2, ..., beta1 the spec's `momentum` and eta_t the learning rate of the step,

    w <- w (1 - eta_t weight_decay)
    m <- beta1 m + (1 - beta1) g_t,   v <- beta2 v + (1 - beta2) g_t^2
    w <- w - eta_t (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)     (torch.optim.AdamW)

eta_t = lr min(1, t / warmup_steps): a linear warmup from lr / warmup_steps to the lr the training
loop sets (`set_lr`: the spec's schedule of epochs, "cosine" for the cosine decay), then that lr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phasediagram.methods.sgd import SGD
from phasediagram.options import integer, real, validate


@dataclass(frozen=True)
class AdamWOptions:
    beta2: float = real(0.999, low=0, high=1, open_high=True)  # decay of the second-moment average
    eps: float = real(1e-8, low=0, open_low=True)  # added to the root of the second moment
    warmup_steps: int = integer(0, low=0)  # steps of the linear warmup (0: none)

    def __post_init__(self):
        validate(self, "optimizer_options")


class AdamW(SGD):
    """The AdamW step above; `objective` (cross-entropy plus penalty) is SGD's."""

    def __init__(self, model, *, lr, momentum, weight_decay, epochs=None, seed=0,
                 options: AdamWOptions = AdamWOptions(), regularizer=None):
        self.model = model
        self.regularizer = regularizer
        self.warmup_steps = options.warmup_steps
        self.steps = 0
        self.lr = lr
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(momentum, options.beta2), eps=options.eps,
                                     weight_decay=weight_decay, foreach=False)

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def step(self, x, y, epoch: int) -> float:
        self.steps += 1
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, self.steps / self.warmup_steps) if self.warmup_steps else self.lr
        return super().step(x, y, epoch)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps = int(state["steps"])
