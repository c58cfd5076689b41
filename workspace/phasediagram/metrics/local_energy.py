"""`local_energy`: the local energy of Pittorino et al. (ICLR 2021).

With multiplicative Gaussian noise on every trainable parameter,

    dE(w, sigma) = E_z[ L(w + sigma z * w) ] - L(w),      z ~ N(0, I) element-wise,

where L is the mean cross-entropy over a split (BatchNorm in eval mode, i.e. its running
statistics are kept and not perturbed). A flat minimum has a small dE over a wide range of sigma.
The same quantity with L replaced by the classification error in percent (Pittorino et al. plot
the training error) is stored as `local_energy_err`.

Estimator. M Monte Carlo samples z_1..z_M; for every sigma of the grid

    dE_hat(sigma) = (1/M) sum_m [L(w + sigma z_m * w) - L(w)],   SE = std_m[...] / sqrt(M)

(sample standard deviation, ddof = 1). The same z_m serve every sigma (common random numbers),
so the curve is smooth in sigma while each point stays an unbiased estimate. At sigma = 0 the
perturbed weights are w itself, so dE = 0 and SE = 0 are returned without evaluation. Sample m is
drawn from the generator as one `randn` per parameter tensor, in parameter order, sample after
sample, so the values do not depend on how the samples are batched.

Rows: `<split>/local_energy@<sigma>` and `<split>/local_energy_se@<sigma>` (the curve, and the same
for `local_energy_err`), plus the cell values `<split>/local_energy`, `<split>/local_energy_se` and
`<split>/local_energy_err` at `sigma_value` (added to the grid if it is not on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from phasediagram.accel import ensemble_models
from phasediagram.data.datasets import Split
from phasediagram.metrics.base import Metric, MetricData, Panel, key, per_example_logits
from phasediagram.models.modes import eval_mode
from phasediagram.options import choice, integer, is_real, real, rule, subset, validate

SPLITS = ("train", "test")
REFERENCE_SIGMAS = (0.0, 0.025, 0.05, 0.075, 0.1)
SUBSET_SEED = 0
# "loop": sample after sample; "ensemble": `sample_chunk` perturbed copies as one ensemble model
# (batched matmuls, `ensemble_models`); "vmap": torch.func.vmap over `sample_chunk` samples. On a
# CPU with evaluation batches of 1000 the loop is the fastest but for the smallest models
# (bench/bench_metrics_batched.py, docs/performance.md); the batched forms are for accelerators,
# where one large operation beats many small ones.
BATCHINGS = ("loop", "ensemble", "vmap")


@dataclass(frozen=True)
class LocalEnergyOptions:
    # the curve's grid (reference: sweep of [0, 0.1])
    sigmas: tuple[float, ...] = rule(REFERENCE_SIGMAS, lambda v: isinstance(v, (list, tuple)) and len(v) >= 1
                                     and all(is_real(s, 0, 10) for s in v), "a non-empty list of numbers in [0, 10]")
    # the cell value is dE at this sigma (added to the grid if missing)
    sigma_value: float = real(0.05, low=0, high=10)
    n_samples: int = integer(100, low=2)  # M, Monte Carlo samples of z (reference 100)
    splits: tuple[str, ...] = subset(SPLITS, SPLITS)
    # None: the whole split; else a fixed subset (seed 0) of this size
    n_examples: int | None = integer(None, low=1, optional=True)
    batch_size: int = integer(1000, low=1)  # evaluation batch size (does not change the result)
    batching: str = choice("loop", BATCHINGS)  # how the samples are evaluated: see BATCHINGS
    sample_chunk: int = integer(10, low=1)  # samples evaluated together (ensemble or vmap)

    def __post_init__(self):
        validate(self, "metric_options.local_energy")
        object.__setattr__(self, "sigmas", tuple(sorted({float(s) for s in self.sigmas})))
        object.__setattr__(self, "splits", tuple(self.splits))

    @property
    def grid(self) -> tuple[float, ...]:
        """The sigmas evaluated: `sigmas` with `sigma_value` added."""
        return tuple(sorted(set(self.sigmas) | {float(self.sigma_value)}))


def draw_noise(params: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One sample z ~ N(0, I) shaped like `params`: one CPU `randn` per tensor, in order, then moved."""
    return {n: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for n, p in params.items()}


@torch.no_grad()
def local_energy_curve(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                       params: Mapping[str, torch.Tensor], sigmas: Sequence[float], n_samples: int,
                       generator: torch.Generator, *,
                       loss_many: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
                       sample_chunk: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo estimate of dE(sigma) = E_z[L(w + sigma z * w)] - L(w) and its standard error.

    Args:
        loss_fn: params -> L (a scalar, or a 1-D tensor of several losses estimated together).
        params: the point w, a dict of tensors (not modified).
        sigmas: noise scales; sigma = 0 gives exactly 0 without evaluation.
        n_samples: M, the number of Monte Carlo samples z_m (the same z_m for every sigma).
        generator: the source of z (CPU generator; see `draw_noise`).
        loss_many: optional, K stacked parameter sets {name: (K, *shape)} -> (K, *L.shape), the
            losses of all K at once (e.g. `vmap(loss_fn)` or an ensemble evaluation); used for up to
            `sample_chunk` samples per call instead of `loss_fn` sample after sample.

    Returns:
        (dE, SE), each of shape (len(sigmas), *L.shape), in float64.
    """
    params = dict(params)
    base = loss_fn(params).to(torch.float64)
    nonzero = [s for s in sigmas if s != 0]
    diffs = []  # one (len(nonzero), *L.shape) tensor per sample
    for start in range(0, n_samples, sample_chunk):
        zs = [draw_noise(params, generator) for _ in range(min(sample_chunk, n_samples - start))]
        if not nonzero:
            continue
        if loss_many is not None:
            per_sigma = []
            for s in nonzero:
                stacked = {n: p + s * torch.stack([z[n] for z in zs]) * p for n, p in params.items()}
                per_sigma.append(loss_many(stacked).to(torch.float64))
            diffs.extend(torch.stack(per_sigma, dim=1) - base)
        else:
            for z in zs:
                diffs.append(torch.stack([loss_fn({n: p + s * z[n] * p for n, p in params.items()}).to(torch.float64)
                                          for s in nonzero]) - base)
    mean = torch.zeros((len(sigmas), *base.shape), dtype=torch.float64, device=base.device)
    se = torch.zeros_like(mean)
    if nonzero:
        d = torch.stack(diffs)  # (M, len(nonzero), ...)
        idx = [i for i, s in enumerate(sigmas) if s != 0]
        mean[idx] = d.mean(0)
        se[idx] = d.std(0, correction=1) / math.sqrt(n_samples)
    return mean, se


def split_loss_fn(model: nn.Module, split: Split, batch_size: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """params -> [mean cross-entropy, error in %] of `model` with those parameters over `split`.

    Buffers (BatchNorm running statistics) and parameters not in the dict are the model's own;
    call the result with the model in eval mode.
    """
    buffers = dict(model.named_buffers())
    n = len(split)

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        total, wrong = 0.0, 0.0
        for batch in split.batches(batch_size):
            out = functional_call(model, (p, buffers), (batch.x,), strict=False)
            total = total + F.cross_entropy(out, batch.y, reduction="sum")
            wrong = wrong + (out.argmax(-1) != batch.y).sum().to(out.dtype)
        return torch.stack([total / n, 100.0 * wrong / n])

    return loss_fn


def subset_of(split: Split, n_examples: int | None) -> Split:
    """The split itself, or a subset of `n_examples` chosen with the fixed seed SUBSET_SEED (the same
    examples for every cell and seed, so their values are comparable)."""
    if n_examples is None or n_examples >= len(split):
        return split
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(SUBSET_SEED))[:n_examples]
    idx = idx.sort().values.to(split.y.device)
    return Split(split.x[idx], split.y[idx])


def ensemble_loss_many(model: nn.Module, split: Split, batch_size: int
                       ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """stacked params {name: (K, *shape)} -> (K, 2): [mean cross-entropy, error in %] of the K models
    (`model` with each parameter set, its own buffers), evaluated as one ensemble over `split`
    (`ensemble_models.evaluate_ensemble`); equals `split_loss_fn` per set up to summation order."""
    ensembles: dict[int, nn.Module] = {}
    p = next(model.parameters())

    def loss_many(stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        k = next(iter(stacked.values())).shape[0]
        if k not in ensembles:
            ensembles[k] = ensemble_models.like(model, k).to(device=p.device, dtype=p.dtype)
        ens = ensembles[k]
        ensemble_models.load_stacked(ens, model, stacked)
        loss, correct = ensemble_models.evaluate_ensemble(ens, k, split.x, split.y, batch_size)
        return torch.stack([loss, 100.0 - 100.0 * correct.double() / len(split)], dim=1)

    return loss_many


def local_energy(model, data: MetricData, options: LocalEnergyOptions, generator) -> dict[str, float]:
    """dE(sigma) and its standard error on each split for the grid of `options` (module docstring).

    The splits are done in order, each with its own M samples drawn from `generator`.
    """
    grid = options.grid
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, float] = {}
    with eval_mode(model):
        for split in options.splits:
            part = subset_of(data.split(split), options.n_examples)
            loss_fn = split_loss_fn(model, part, options.batch_size)
            loss_many = (vmap(loss_fn) if options.batching == "vmap" else
                         ensemble_loss_many(model, part, options.batch_size) if options.batching == "ensemble" else None)
            mean, se = local_energy_curve(loss_fn, params, grid, options.n_samples, generator, loss_many=loss_many,
                                          sample_chunk=options.sample_chunk)
            for i, s in enumerate(grid):
                for j, name in enumerate(("local_energy", "local_energy_err")):
                    out[key(split, name, s)] = float(mean[i, j])
                    out[key(split, name + "_se", s)] = float(se[i, j])
            at = grid.index(float(options.sigma_value))
            out[key(split, "local_energy")] = float(mean[at, 0])
            out[key(split, "local_energy_se")] = float(se[at, 0])
            out[key(split, "local_energy_err")] = float(mean[at, 1])
    return out


METRIC = Metric(
    "local_energy", "single", local_energy, LocalEnergyOptions,
    panels=(Panel("local_energy", "train", "local energy dE at sigma_value (train loss)", cmap="magma"),
            Panel("local_energy", "test", "local energy dE at sigma_value (test loss)", cmap="magma")),
    description="Pittorino et al. local energy under multiplicative Gaussian weight noise, curve over sigma",
    stderrs=("local_energy_se", "local_energy_err_se"),
    check_model=per_example_logits,
    test_options={"n_samples": 3, "n_examples": 64},
)
