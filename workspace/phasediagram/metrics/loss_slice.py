"""`loss_slice`: the loss along lines and a plane through the trained weights.

With L the mean cross-entropy over a split (eval mode) as a function of the trainable weights w,
and a direction d, the slice is the loss rise

    dL_d(t) = L(w + t d) - L(w),        t on the grid t_j = r j / steps, j = -steps..steps,

stored for the directions (`slices`):

- "eigen": d = v_1, the unit eigenvector of the top (largest algebraic) eigenvalue of the training-loss
  Hessian, as PyHessian's examples draw it (L(w + t v) for t in [-0.5, 0.5]); "eigen_bottom": the
  unit eigenvector of the smallest eigenvalue (negative curvature where there is any). Both come from
  `hessian.top_eigenvectors` on one fixed batch of `hessian_batch_size` training examples (the
  `hessian` metric's batch, Lanczos with the residual rule at `eig_tol`), sign fixed so that the entry
  of largest magnitude is positive; radius r = `eigen_radius`, in parameter units.
- "random": d = d_1, a filter-normalised Gaussian direction (Li et al. 2018, `numerics.directions`:
  each filter of d scaled to the norm of the weights' filter, biases and BatchNorm weights set to
  zero with `ignore` "biasbn"); radius r = `random_radius` (t = 1 moves each filter by its own norm).
- "random2d": the plane w + a d_1 + b d_2 (d_2 a second such direction), the 2D contour of Li et al.,
  on the grid (a, b) in {r i / steps_2d}^2, r = `random_radius`.

BatchNorm: the directions move the parameters only (the reference's dir_type "weights"). The running
statistics are buffers, so every point is evaluated in eval mode with the trained model's running
mean and variance, as loss-landscape's `evaluation.eval_loss` does (`net.eval()`); the metric never
runs a training-mode forward, so the running statistics are left as they were. The loss at each point
is evaluated with `torch.func.functional_call` on the moved weights: the model's own tensors are not
written.

The directions are drawn from the generator first (d_1 then d_2, one float64 `randn` per parameter
tensor each, whichever slices are asked for), then the Hessian batch, then the Lanczos starts.

Rows, for each split of `splits` (the whole split, or a fixed subset of `n_examples`, seed 0):

- `<split>/slice_<kind>@t`: dL(t) on the grid of the 1D slice <kind> ("eigen", "eigen_bottom", "random");
  `<split>/slice_random2d(x=a)@b`: dL at (a, b) of the plane (`quantity_2d`, `parse_quantity_2d`).
- Cell values of each 1D slice: `slice_<kind>_rise` = (dL(r) + dL(-r)) / 2, the mean rise at the
  radius; `slice_<kind>_curvature` = d^T H_split d = d^2/dt^2 L(w + t d) at t = 0, exact (one
  Hessian-vector product on the split; for the top eigenvector the Rayleigh quotient, which is
  lambda_max when the split is the Hessian batch); `slice_<kind>_slope` = grad L(w)^T d = dL/dt at 0.
- `<split>/slice_base_loss`: L(w) on the split; `train/slice_eigenvalue`, `train/slice_eigenvalue_bottom`:
  the Lanczos eigenvalues of the eigenvector directions (on the Hessian batch).
- Diagnostics: `train/slice_eig_converged` 1 if every Lanczos run passed its stopping test, else 0;
  `-/hvp_slice` the Hessian-vector products used (Lanczos and the curvatures).

A loss that is not finite at w (on a split or on the Hessian batch) gives NaN for every cell value.
With `save_directions` and a state folder (`MetricData.state_dir`, `Layout.directions_path`), the
directions and the eigenvectors' eigenvalues are written there as `directions.npz`
(`storage.vectors.save_vectors`; read it with `load_vectors`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from phasediagram.metrics.base import NO_SPLIT, Metric, MetricData, Panel, key, per_example_logits
from phasediagram.metrics.hessian import EIGENVECTOR_OPTIONS, hessian_batch, top_eigenvectors
from phasediagram.metrics.local_energy import split_loss_fn, subset_of
from phasediagram.models.modes import eval_mode
from phasediagram.numerics.directions import IGNORES, moved, random_filter_normalised
from phasediagram.numerics.hvp import HessianOperator, flatten
from phasediagram.options import choice, flag, integer, real, subset, validate
from phasediagram.storage.layout import DIRECTIONS_FILE
from phasediagram.storage.vectors import save_vectors

NAME = "loss_slice"
SLICES = ("eigen", "eigen_bottom", "random", "random2d")
LINES = ("eigen", "eigen_bottom", "random")  # the 1D slices
SPLITS = ("train", "test")
EIGENVALUE = {"eigen": "slice_eigenvalue", "eigen_bottom": "slice_eigenvalue_bottom"}  # diagnostic quantities
PLANE = "slice_random2d"
_PLANE_QUANTITY = re.compile(rf"^{PLANE}\(x=(?P<x>[^)]+)\)$")


@dataclass(frozen=True)
class LossSliceOptions:
    slices: tuple[str, ...] = subset(("eigen", "eigen_bottom", "random"), SLICES)  # the directions sliced along
    splits: tuple[str, ...] = subset(("train",), SPLITS)  # the splits whose loss is sliced
    # None: the whole split; else a fixed subset (seed 0) of this size
    n_examples: int | None = integer(None, low=1, optional=True)
    batch_size: int = integer(1000, low=1)  # evaluation batch size (changes only rounding)
    steps: int = integer(10, low=1)  # grid points on each side of 0 of a 1D slice (2 steps + 1 in all)
    steps_2d: int = integer(5, low=1)  # grid points on each side of 0 per axis of the plane
    eigen_radius: float = real(0.5, low=0, open_low=True)  # eigenvector slices: t in [-r, r] (PyHessian 0.5)
    random_radius: float = real(1.0, low=0, open_low=True)  # random slices: t in [-r, r] (Li et al. 1)
    ignore: str = choice("biasbn", IGNORES)  # tensors of <= 1 dimension: "biasbn" zero, "none" = w
    # the eigenvectors' fixed batch of training examples (the `hessian` metric's); None: whole split
    hessian_batch_size: int | None = integer(200, low=1, optional=True)
    lanczos_iters: int = integer(100, low=1)  # most Lanczos steps per eigenvector
    eig_tol: float = real(1e-3, low=0, high=1, open_low=True)  # residual rule, relative to max |Ritz value|
    save_directions: bool = flag(False)  # write the directions to the state folder (directions.npz)

    def __post_init__(self):
        validate(self, f"metric_options.{NAME}")
        object.__setattr__(self, "slices", tuple(self.slices))
        object.__setattr__(self, "splits", tuple(self.splits))


def grid(radius: float, steps: int) -> np.ndarray:
    """t_j = radius j / steps for j = -steps..steps (0 exactly in the middle)."""
    return radius * np.arange(-steps, steps + 1, dtype=np.float64) / steps


def quantity_2d(x: float) -> str:
    """The quantity of the plane's row at first coordinate x (its second coordinate is the row's coord)."""
    return f"{PLANE}(x={x:.6g})"


def parse_quantity_2d(quantity: str) -> float | None:
    """x of a `quantity_2d` name, None for any other quantity."""
    m = _PLANE_QUANTITY.match(quantity)
    return float(m.group("x")) if m else None


@torch.no_grad()
def slice_1d(loss_fn, params: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor],
             ts: np.ndarray) -> np.ndarray:
    """[L(w + t d) - L(w) for t in ts] in float64, `loss_fn(params) -> scalar tensor`, w = `params`."""
    base = float(loss_fn(dict(params)))
    return np.array([0.0 if t == 0 else float(loss_fn(moved(params, [direction], [t]))) - base for t in ts])


@torch.no_grad()
def slice_2d(loss_fn, params: Mapping[str, torch.Tensor], d1: Mapping[str, torch.Tensor],
             d2: Mapping[str, torch.Tensor], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """[[L(w + a d1 + b d2) - L(w) for b in ys] for a in xs] in float64."""
    base = float(loss_fn(dict(params)))
    return np.array([[0.0 if a == 0 and b == 0 else float(loss_fn(moved(params, [d1, d2], [a, b]))) - base
                      for b in ys] for a in xs])


def _not_finite(options: LossSliceOptions) -> dict[str, float]:
    return {key(split, f"slice_{kind}_{what}"): math.nan for split in options.splits
            for kind in options.slices if kind in LINES for what in ("rise", "curvature", "slope")}


def _eigen_directions(model, data: MetricData, options: LossSliceOptions, generator, out: dict[str, float]
                      ) -> dict[str, dict[str, torch.Tensor]] | None:
    """{"eigen": v_1, "eigen_bottom": v_n} as asked for, from one Hessian batch; None if its loss is not finite."""
    wanted = [k for k in ("eigen", "eigen_bottom") if k in options.slices]
    if not wanted:
        return {}
    eig_options = replace(EIGENVECTOR_OPTIONS, batch_size=options.hessian_batch_size,
                          lanczos_iters=options.lanczos_iters, tol=options.eig_tol)
    batch = hessian_batch(data.train, eig_options, generator)
    on_batch = replace(data, train=batch)
    eig_options = replace(eig_options, batch_size=None)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not math.isfinite(float(split_loss_fn(model, batch, len(batch))(params)[0])):
        return None
    found, converged = {}, True
    for kind in wanted:
        pairs = top_eigenvectors(model, on_batch, 1, eig_options, generator, bottom=kind == "eigen_bottom")
        found[kind] = pairs.tensors(0)
        out[key("train", EIGENVALUE[kind])] = float(pairs.values[0])
        out[key(NO_SPLIT, "hvp_slice")] = out.get(key(NO_SPLIT, "hvp_slice"), 0.0) + pairs.n_products
        converged = converged and pairs.converged
    out[key("train", "slice_eig_converged")] = float(converged)
    return found


def loss_slice(model, data: MetricData, options: LossSliceOptions, generator) -> dict[str, float]:
    """Loss slices along the top (and bottom) Hessian eigenvector and filter-normalised random directions,
    with their rises, curvatures and slopes at 0 (module docstring), on each split of `options.splits`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in named}
    d1 = random_filter_normalised(params, generator, options.ignore)
    d2 = random_filter_normalised(params, generator, options.ignore)
    out: dict[str, float] = {}
    with eval_mode(model):
        eigen = _eigen_directions(model, data, options, generator, out)
        if eigen is None:
            return _not_finite(options)
        directions = {**eigen, **({"random": d1} if "random" in options.slices or "random2d" in options.slices else {})}
        for split in options.splits:
            part = subset_of(data.split(split), options.n_examples)
            evaluate = split_loss_fn(model, part, options.batch_size)

            def loss_fn(p, evaluate=evaluate):
                return evaluate(p)[0]

            base = float(loss_fn(params))
            if not math.isfinite(base):
                return _not_finite(options)
            out[key(split, "slice_base_loss")] = base
            op = HessianOperator(model, part.x, part.y, options.batch_size)
            gradient = op.gradient()
            for kind in (k for k in LINES if k in options.slices):
                d = directions[kind]
                radius = options.random_radius if kind == "random" else options.eigen_radius
                ts = grid(radius, options.steps)
                rise = slice_1d(loss_fn, params, d, ts)
                out.update({key(split, f"slice_{kind}", float(t)): float(v) for t, v in zip(ts, rise)})
                flat = flatten([d[n] for n, _ in named]).to(gradient.dtype)
                out[key(split, f"slice_{kind}_rise")] = float((rise[0] + rise[-1]) / 2)
                out[key(split, f"slice_{kind}_curvature")] = float(flat @ op.matvec(flat))
                out[key(split, f"slice_{kind}_slope")] = float(gradient @ flat)
            out[key(NO_SPLIT, "hvp_slice")] = out.get(key(NO_SPLIT, "hvp_slice"), 0.0) + op.n_products
            if "random2d" in options.slices:
                axis = grid(options.random_radius, options.steps_2d)
                plane = slice_2d(loss_fn, params, d1, d2, axis, axis)
                out.update({key(split, quantity_2d(float(a)), float(b)): float(plane[i, j])
                            for i, a in enumerate(axis) for j, b in enumerate(axis)})
    if options.save_directions and data.state_dir is not None:
        saved = {**directions, **({"random2d_y": d2} if "random2d" in options.slices else {})}
        eigenvalues = {k: out[key("train", EIGENVALUE[k])] for k in eigen}
        save_vectors(Path(data.state_dir) / DIRECTIONS_FILE, saved, eigenvalues)
    return out


METRIC = Metric(
    "loss_slice", "single", loss_slice, LossSliceOptions,
    panels=(Panel("slice_eigen_rise", "train", "loss rise at t = +-eigen_radius along the top Hessian eigenvector",
                  cmap="magma"),
            Panel("slice_random_rise", "train", "loss rise at t = +-random_radius along a filter-normalised direction",
                  cmap="magma")),
    description="loss slices L(w + t d) - L(w) along the top Hessian eigenvector and filter-normalised random "
                "directions (1D, 2D), with the rise at the radius and the curvature at 0",
    diagnostics=("slice_eig_converged", "hvp_slice"),
    check_model=per_example_logits,
    test_options={"slices": ("eigen", "eigen_bottom", "random", "random2d"), "steps": 2, "steps_2d": 1,
                  "n_examples": 64, "hessian_batch_size": 64, "lanczos_iters": 10},
)
