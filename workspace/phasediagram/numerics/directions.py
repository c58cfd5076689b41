"""Directions in weight space for loss slices: filter-normalised random directions and moves along them.

Filter normalisation (Li, Xu, Taylor, Studer, Goldstein, NeurIPS 2018, "Visualizing the loss
landscape of neural nets"; tomgoldstein/loss-landscape, `net_plotter.create_random_direction`
with its defaults dir_type="weights", norm="filter", ignore="biasbn"):

    d ~ N(0, I) shaped like the weights w (one tensor per parameter tensor),
    for a tensor of two or more dimensions, each filter i (the slice d[i] along the first, output
    dimension: an output channel of a convolution, a row of a linear layer, i.e. a 1x1 convolution)
        d[i] <- d[i] * ||w[i]|| / ||d[i]||,
    for a tensor of at most one dimension (biases, BatchNorm weights and biases)
        d <- 0          (ignore="biasbn")    or    d <- w      (ignore="none", the reference's other rule).

So every filter of d has the Frobenius norm of the corresponding filter of w, and the loss along
w + t d is insensitive to the per-filter rescalings that leave a ReLU network's function unchanged.
The reference divides by ||d[i]|| + 1e-10; here the division is exact (a Gaussian filter is nonzero
with probability one; an all-zero one stays zero). BatchNorm running statistics are buffers, not
parameters, so no direction touches them (see `metrics.loss_slice`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

IGNORES = ("biasbn", "none")


def gaussian_like(params: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """{name: z}, z ~ N(0, I) shaped like each tensor: one CPU float64 `randn` per tensor, in order, so a
    seed gives the same direction on every device and dtype."""
    return {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in params.items()}


def filter_norms(t: torch.Tensor) -> torch.Tensor:
    """||t[i]||_2 for every filter i (slice along the first dimension), in float64; for a tensor of at
    most one dimension, its whole norm (one value)."""
    t = t.detach().to(torch.float64)
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t).reshape(1)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def filter_normalise(direction: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                     ignore: str = "biasbn") -> dict[str, torch.Tensor]:
    """The direction with each filter rescaled to the norm of the weights' filter (module docstring).

    `direction` and `params` map the same names to tensors of the same shapes; the result is in the
    dtype and on the device of `params`, computed in float64. Neither input is modified.
    """
    if ignore not in IGNORES:
        raise ValueError(f"ignore must be one of {IGNORES}, got {ignore!r}")
    out = {}
    for name, w in params.items():
        d = direction[name].detach().to(torch.float64).cpu()
        w64 = w.detach().to(torch.float64).cpu()
        if w.dim() <= 1:
            d = torch.zeros_like(d) if ignore == "biasbn" else w64.clone()
        else:
            d_norm = filter_norms(d)
            scale = torch.where(d_norm > 0, filter_norms(w64) / torch.where(d_norm > 0, d_norm, 1.0), 0.0)
            d = d * scale.reshape(-1, *([1] * (d.dim() - 1)))
        out[name] = d.to(device=w.device, dtype=w.dtype)
    return out


def random_filter_normalised(params: Mapping[str, torch.Tensor], generator: torch.Generator,
                             ignore: str = "biasbn") -> dict[str, torch.Tensor]:
    """A filter-normalised Gaussian direction for the weights `params` (`gaussian_like`, then
    `filter_normalise`); every tensor gets its draw, so `ignore` does not change the others'."""
    return filter_normalise(gaussian_like(params, generator), params, ignore)


def moved(params: Mapping[str, torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]],
          steps: Sequence[float]) -> dict[str, torch.Tensor]:
    """{name: w + sum_k steps[k] * directions[k][name]}: the point of the slice at coordinates `steps`."""
    if len(directions) != len(steps):
        raise ValueError(f"{len(directions)} directions but {len(steps)} steps")
    out = {}
    for name, w in params.items():
        total = w.detach().clone()
        for d, s in zip(directions, steps):
            total.add_(d[name], alpha=float(s))
        out[name] = total
    return out
