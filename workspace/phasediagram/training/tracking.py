"""The landscape during training: quantities of the training loss measured at chosen steps of a run.

At step k of a run (after k optimizer steps; k = 0 is the initial model, the steps are
`schedule`'s) and on a fixed subset S of the training set (`subset_of`: the same examples for every
run of a study), with theta the trainable parameters and the model in eval mode (BatchNorm reads
its running statistics), L(theta) = (1/|S|) sum_{i in S} l(f_theta(x_i), y_i), l the cross-entropy:

- `loss`: L; `accuracy`: the percentage of S's labelled targets classified right (as the table's `acc`);
- `lambda_max`: the largest eigenvalue of H = d^2 L / d theta^2, by Lanczos (`linalg.lanczos_eigs`,
  stopped when the gap bound is within `tol` of it) on Hessian-vector products (`hvp.HessianOperator`),
  warm-started from the previous point's top Ritz vector u: H changes little between points, so u
  is already near the new top eigenvector and few products are needed (the first point starts from
  the gradient plus a random vector). Stored beside it: `two_over_lr` = 2 / lr and `lr_lambda_max` =
  lr lambda_max, lr the step's learning rate: gradient descent on the quadratic model of L is stable
  along u iff lr lambda_max < 2 (edge of stability: lambda_max ~ 2 / lr, Cohen et al. 2021);
- `trace`: tr(H) by Hutchinson, `trace_probes` Rademacher probes;
- `grad_norm`: |G|, G = dL/dtheta;
- `noise_scale`: B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A), Sigma the
  per-example gradient covariance, from two batch sizes: E|G_B|^2 = |G|^2 + tr(Sigma) / B for a
  batch of B examples, measured at B = |S| (the subset's gradient) and at b = `noise_batch` (the mean
  of |G_b|^2 over the |S| // b consecutive batches of S), so
      |G|^2 ~ (|S| |G_S|^2 - b |G_b|^2) / (|S| - b),   tr(Sigma) ~ (|G_b|^2 - |G_S|^2) / (1/b - 1/|S|);
- `weight_norm`: |theta|; `distance`: |theta - theta_0|, theta_0 the run's initial parameters.

A point where L is not finite records only what needs no derivative (the others are NaN), and one
where a Hessian-vector product is not finite records lambda_max as NaN (warm start kept). Nothing
of the model changes (weights, buffers, gradients, train/eval flags) and no global random number is
drawn: the Lanczos restarts and the probes come from a generator seeded by (seed, step), so a
resumed run measures what an uninterrupted one does, given the tracker's state (`Tracker.state_dict`:
its rows and the warm-start vector).

A run's trajectory is rows (step, epoch, quantity, value), epoch = step / (steps per epoch).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from phasediagram.data.datasets import Split
from phasediagram.data.sequences import IGNORE
from phasediagram.models.modes import eval_mode
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator, flatten, trainable
from phasediagram.seeding import stable_seed
from phasediagram.spec.tracking import TrackOptions
from phasediagram.storage.checkpoints import atomic_write_json

COLUMNS = ("step", "epoch", "quantity", "value")
DERIVED = ("lambda_max", "trace", "grad_norm", "noise_scale")  # quantities that need the gradient


def schedule(options: TrackOptions, steps_per_epoch: int, epochs: int) -> list[int]:
    """The steps tracked in a run of `epochs` epochs of `steps_per_epoch` steps (see `spec.tracking`)."""
    total = steps_per_epoch * epochs
    steps = {0}
    if options.log_points and total:
        steps |= {int(round(float(s))) for s in np.geomspace(1, total, options.log_points)}
    if options.every_epoch:
        steps |= {e * steps_per_epoch for e in range(1, epochs + 1)}
    if options.every_steps:
        steps |= set(range(0, total + 1, options.every_steps))
    return sorted(s for s in steps if s <= total)


def subset_of(train: Split, options: TrackOptions) -> Split:
    """S: `options.subset` examples of the training split drawn by a generator seeded by a fixed name
    (the whole split when it is smaller or the subset is None)."""
    if options.subset is None:
        return train
    return train.batch(options.subset, torch.Generator().manual_seed(stable_seed("track_subset")))


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, options: TrackOptions, lr: float,
            init: torch.Tensor, generator: torch.Generator, start: torch.Tensor | None = None,
            loss: Callable = F.cross_entropy) -> tuple[dict[str, float], torch.Tensor | None]:
    """({quantity: value} of `options.quantities` and their companions, the top Ritz vector) at the
    model's parameters on the batch (x, y) (see the module docstring); `start` is the warm start of
    lambda_max's Lanczos, `init` theta_0, `loss(outputs, targets)` the mean loss."""
    want = options.quantities
    theta = flatten([p.detach() for p in trainable(model)])
    with eval_mode(model), torch.no_grad():
        outputs = model(x)
        value = float(loss(outputs, y))
        out = {"loss": value,
               "accuracy": (100.0 * float((outputs.argmax(1) == y).sum()) / max(int((y != IGNORE).sum()), 1)
                            if "accuracy" in want else math.nan),
               "weight_norm": float(torch.linalg.vector_norm(theta)),
               "distance": float(torch.linalg.vector_norm(theta - init.to(theta)))}
    out = {q: out.get(q, math.nan) for q in want}
    if "lambda_max" in want:
        out.update(two_over_lr=2.0 / lr, lr_lambda_max=math.nan)
    if not math.isfinite(value) or not any(q in DERIVED for q in want):
        return out, start
    op = HessianOperator(model, x, y, None, "double_backward", loss=loss)
    dtype, device = theta.dtype, theta.device
    if "lambda_max" in want:
        try:
            eigs = linalg.lanczos_eigs(finite(op), op.dim, 1, options.lanczos_iters, options.tol, generator, device,
                                       dtype=dtype, hint=op.gradient() if start is None else None, start=start,
                                       magnitude=False)
            start = eigs.vectors[0]
            out.update(lambda_max=float(eigs.top[0]), lr_lambda_max=lr * float(eigs.top[0]))
        except NonFinite:
            pass
    if "trace" in want:
        out["trace"] = linalg.hutchinson(op, op.dim, options.trace_probes, 0.0, generator, device, "stderr",
                                         dtype).value
    if "grad_norm" in want or "noise_scale" in want:
        big = float(torch.linalg.vector_norm(op.gradient())) ** 2
        if "grad_norm" in want:
            out["grad_norm"] = math.sqrt(big)
        if "noise_scale" in want:
            out["noise_scale"] = noise_scale(model, x, y, options.noise_batch, big, loss)
    return out, start


class NonFinite(ArithmeticError):
    """A Hessian-vector product that is not finite (weights on their way to divergence)."""


def finite(matvec: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`matvec` raising `NonFinite` where a product is not finite, so that Lanczos stops there (lambda_max NaN)."""
    def checked(v: torch.Tensor) -> torch.Tensor:
        hv = matvec(v)
        if not bool(torch.isfinite(hv).all()):
            raise NonFinite
        return hv
    return checked


def noise_scale(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, b: int, big: float,
                loss: Callable = F.cross_entropy) -> float:
    """B_simple from |G_S|^2 = `big` on the whole batch and the mean |G_b|^2 over its consecutive batches
    of b examples (module docstring); NaN when the batch holds fewer than 2 b examples."""
    n = len(y)
    if n < 2 * b:
        return math.nan
    params = trainable(model)
    small = []
    with eval_mode(model), torch.enable_grad():
        for i in range(0, n - b + 1, b):
            grads = torch.autograd.grad(loss(model(x[i:i + b]), y[i:i + b]), params)
            small.append(float(torch.linalg.vector_norm(flatten(grads))) ** 2)
    g_small = sum(small) / len(small)
    g2 = (n * big - b * g_small) / (n - b)
    trace_sigma = (g_small - big) / (1.0 / b - 1.0 / n)
    return trace_sigma / g2 if g2 != 0 else math.nan


def tracker_of(options: TrackOptions, seed: int, model: torch.nn.Module, state: dict | None = None) -> "Tracker":
    """The tracker of run `seed`, theta_0 read from `model` (its initial parameters), continued from `state`
    (`Tracker.state_dict`) when given."""
    tracker = Tracker(options, seed, flatten([p.detach() for p in trainable(model)]).clone())
    if state is not None:
        tracker.load_state_dict(state)
    return tracker


@dataclass
class Tracker:
    """The tracked rows of one run (seed) so far and the warm start of its next Lanczos run."""

    options: TrackOptions
    seed: int
    init: torch.Tensor  # theta_0, flat
    rows: list = field(default_factory=list)  # [step, epoch, quantity, value]
    vector: torch.Tensor | None = None  # the last point's top Ritz vector

    def measure(self, model: torch.nn.Module, data: Split, step: int, steps_per_epoch: int, lr: float,
                loss: Callable = F.cross_entropy) -> dict[str, float]:
        """Measure the model at `step` on `data` (the subset, on the model's device and dtype); append the rows."""
        generator = torch.Generator().manual_seed(stable_seed("track", self.seed, step))
        values, self.vector = measure(model, data.x, data.y, self.options, lr, self.init, generator, self.vector,
                                      loss)
        epoch = step / steps_per_epoch if steps_per_epoch else 0.0
        self.rows.extend([step, epoch, q, v] for q, v in values.items())
        return values

    def state_dict(self) -> dict:
        return {"rows": [list(r) for r in self.rows], "vector": self.vector}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [list(r) for r in state["rows"]]
        self.vector = state["vector"]


def save_trajectory(path: str | Path, tracker: Tracker, status: str, **about) -> None:
    """Write the trajectory file of a run atomically: its rows, `status` and `about` (cell, seed, hash)."""
    atomic_write_json(path, {**about, "status": status, "columns": list(COLUMNS), "rows": tracker.rows})


def load_trajectory(path: str | Path) -> dict | None:
    """The trajectory file at `path` (`save_trajectory`), or None when it is missing or not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("columns") != list(COLUMNS) or not isinstance(data.get("rows"), list):
        return None
    return data
