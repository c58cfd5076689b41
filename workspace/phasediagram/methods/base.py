"""The training-method contract.

A method owns the model(s) being trained and performs one optimisation step on a batch:

    method = OPTIMIZERS[name].build(model, lr=..., momentum=..., weight_decay=..., epochs=..., seed=...,
                                    options=..., regularizer=...)
    loss = method.step(x, y, epoch)     # the batch's cross-entropy before the step (float)
    method.set_lr(lr)
    method.model                        # the model to evaluate and checkpoint
    method.state_dict() / method.load_state_dict(state)   # tensors and plain values only

A regularizer adds a differentiable penalty to the cross-entropy of a batch:

    regularizer = REGULARIZERS[name].build(options, seed=...)
    penalty = regularizer(model, x, y, logits, epoch)   # a scalar tensor (0 when inactive)

Randomness a method draws comes from generators seeded by `seed`, and whatever a resumed run
needs (momentum buffers, generator states, replicas) is in `state_dict()`.

Options are frozen dataclasses; each field declares what it accepts (`integer(...)`, `real(...)`,
`flag`, `choice`, ... of `phasediagram.options`) and `__post_init__` calls
`validate(self, "optimizer_options")` (or "regularizer_options"), which raises a `SpecError` for
the first value out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from phasediagram.errors import SpecError


@dataclass(frozen=True)
class MethodEntry:
    build: Callable[..., Any]
    options: type
    ensemble_ok: bool = False  # can the seeds of a cell be trained as one ensemble model?
    description: str = ""


def make_options(group: str, cls: type, given: dict):
    import dataclasses

    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SpecError(group, f"unknown option(s) {unknown}; allowed: {sorted(allowed) or 'none'}")
    try:
        return cls(**given)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(group, str(exc)) from None


def snapshot_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's buffers (BatchNorm running statistics and counters)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


@torch.no_grad()
def restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        b.copy_(saved[name])


def regularizer_state(regularizer):
    """The regularizer's resumable state (None if it keeps none)."""
    return regularizer.state_dict() if hasattr(regularizer, "state_dict") else None


def load_regularizer_state(regularizer, state) -> None:
    if state is not None and hasattr(regularizer, "load_state_dict"):
        regularizer.load_state_dict(state)
