"""The one SGD step of the package: torch.optim.SGD, built here, and its momentum as plain tensors.

The step on parameter w with gradient g (torch's SGD, coupled L2 weight decay):

    g <- g + weight_decay * w
    v <- g at the first step, else momentum * v + (1 - dampening) * g
    w <- w - lr * v            (Nesterov: w <- w - lr * (g + momentum * v))

Every trainer uses it: the training methods (one optimizer per model), the ensemble of a cell's
seeds (one optimizer over the stacked parameters: the update is elementwise, so it is each
member's own step) and the mode-connectivity bend (plain tensors as parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

FUSED_DEVICES = ("cpu", "cuda")  # where torch.optim.SGD has a fused kernel


def sgd(params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
        dampening: float = 0.0, nesterov: bool = False, fused: bool = False, maximize: bool = False
        ) -> torch.optim.SGD:
    """torch.optim.SGD over `params` (leaf tensors) with the step above.

    `fused`: torch's fused kernel where every parameter is a floating tensor on a CPU or CUDA device
    (else torch's default). The fused step is the same update in one pass per tensor: the values
    of torch's foreach step up to rounding (some elements differ in the last bit: the kernel rounds
    the tail of its vector loop differently; tests/test_ensemble.py). Without it, on a CPU, torch's
    per-tensor step, whose rounding is the formula's, operation by operation.
    """
    params = list(params)
    use_fused = fused and bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES
                                               for p in params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                           nesterov=nesterov, maximize=maximize, fused=use_fused or None)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group of `opt`."""
    for group in opt.param_groups:
        group["lr"] = lr


def momentum_of(opt: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: v} for the parameters {name: w} of `opt` that have a momentum buffer (none before the first step
    or without momentum)."""
    out = {}
    for name, p in params.items():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf
    return out


def set_momentum(opt: torch.optim.Optimizer, params: Mapping[str, torch.Tensor],
                 velocity: Mapping[str, torch.Tensor]) -> None:
    """Give parameter params[name] of `opt` the momentum buffer velocity[name] (a copy), for every name in
    `velocity`: the state a resumed run continues from."""
    for name, v in velocity.items():
        opt.state[params[name]]["momentum_buffer"] = v.detach().clone()
