"""Plain SGD with momentum and (coupled, L2) weight decay, plus an optional regularizer."""

from __future__ import annotations

from dataclasses import dataclass

from torch.nn import functional as F

from phasediagram.methods.base import load_regularizer_state, regularizer_state
from phasediagram.numerics.sgd import set_lr, sgd
from phasediagram.options import flag, validate


@dataclass(frozen=True)
class SGDOptions:
    # Nesterov momentum (with momentum > 0)
    nesterov: bool = flag(False)

    def __post_init__(self):
        validate(self, "optimizer_options")


class SGD:
    """w <- w - lr * v,  v <- momentum * v + grad(CE + penalty) + weight_decay * w  (`numerics.sgd`)."""

    def __init__(self, model, *, lr, momentum, weight_decay, epochs=None, seed=0, options: SGDOptions = SGDOptions(),
                 regularizer=None):
        self.model = model
        self.regularizer = regularizer
        self.opt = sgd(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                       nesterov=options.nesterov and momentum > 0)

    def set_lr(self, lr: float) -> None:
        set_lr(self.opt, lr)

    def objective(self, x, y, epoch: int):
        """(CE, CE + penalty) of the batch (x, y) at the current weights."""
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        total = loss if self.regularizer is None else loss + self.regularizer(self.model, x, y, logits, epoch)
        return loss, total

    def step(self, x, y, epoch: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss, total = self.objective(x, y, epoch)
        total.backward()
        self.opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "regularizer": regularizer_state(self.regularizer)}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        load_regularizer_state(self.regularizer, state.get("regularizer"))
