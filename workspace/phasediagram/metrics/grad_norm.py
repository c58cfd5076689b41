"""`grad_norm`: the norm of the loss gradient at the trained checkpoint, in eval mode.

    g = grad_w L(w),  L(w) = (1/N) sum_i CE(f(x_i; w), y_i)  over a split of N examples,
    grad_norm = ||g||_2 over every trainable parameter,  grad_norm_rel = ||g||_2 / ||w||_2.

A minimum has g = 0; a run stopped before it (few epochs, a large learning rate) does not. Eval
mode (BatchNorm with its running statistics) makes L a function of w alone, the same function the
`hessian` metric differentiates twice. The gradient is accumulated batch by batch (sums of
per-batch gradients of summed losses), so `batch_size` changes only rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from phasediagram.metrics.base import Metric, MetricData, Panel, key
from phasediagram.metrics.local_energy import subset_of
from phasediagram.models.modes import eval_mode
from phasediagram.numerics.hvp import gradients
from phasediagram.options import integer, subset, validate

SPLITS = ("train", "test")


@dataclass(frozen=True)
class GradNormOptions:
    splits: tuple[str, ...] = subset(("train",), SPLITS)  # the splits whose loss gradient is measured
    # None: the whole split; else a fixed subset (seed 0) of this size
    n_examples: int | None = integer(None, low=1, optional=True)
    batch_size: int = integer(1000, low=1)  # accumulation batch size (changes only rounding)

    def __post_init__(self):
        validate(self, "metric_options.grad_norm")
        object.__setattr__(self, "splits", tuple(self.splits))


def loss_gradient(model: torch.nn.Module, split, batch_size: int) -> list[torch.Tensor]:
    """grad_w (1/N) sum_i CE(f(x_i; w), y_i) for every trainable parameter, in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    with eval_mode(model), torch.enable_grad():
        for batch in split.batches(batch_size):
            loss = F.cross_entropy(model(batch.x), batch.y, reduction="sum")
            for acc, g in zip(total, gradients(loss, params)):
                acc.add_(g)
    return [g / len(split) for g in total]


def grad_norm(model, data: MetricData, options: GradNormOptions, generator) -> dict[str, float]:
    """||grad L(w)||_2 and ||grad L(w)||_2 / ||w||_2 on each of `options.splits` (module docstring)."""
    weight_norm = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters() if p.requires_grad))
    out = {}
    for name in options.splits:
        split = subset_of(data.split(name), options.n_examples)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in loss_gradient(model, split, options.batch_size)))
        out[key(name, "grad_norm")] = float(norm)
        out[key(name, "grad_norm_rel")] = float(norm / weight_norm)
    return out


METRIC = Metric(
    "grad_norm", "single", grad_norm, GradNormOptions,
    panels=(Panel("grad_norm", "train", "gradient norm of the training loss", log=True, cmap="magma"),),
    description="norm of the training-loss gradient at the checkpoint (0 at a minimum), and relative to the weights",
    test_options={"n_examples": 64},
)
