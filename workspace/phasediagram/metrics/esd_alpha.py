"""`esd_alpha`: WeightWatcher's data-free alpha, the power-law exponent of each layer's weight spectrum.

Martin & Mahoney (JMLR 2021; Nature Communications 2021): the eigenvalues lambda of W^T W (the
squared singular values of a layer's weight matrix W) have a heavy tail p(lambda) ~ lambda^-alpha
for lambda >= xmin; well-trained layers have alpha in about [2, 6], smaller alpha a heavier tail.
Every definition below is that of `weightwatcher.WeightWatcher(model).analyze()` of weightwatcher
0.7.7 with its defaults (pooled eigenvalues, `conv2d_norm`, its own power-law fit, no glorot fix,
no `fix_fingers`, no randomisation), on the weights rounded to float32 as WeightWatcher reads them.

Layers and their eigenvalues. `nn.Linear` and `nn.Embedding`: W, min(out, in) eigenvalues.
`nn.Conv2d`, weight (out, in, k_h, k_w): the rf = k_h k_w matrices W[:, :, i, j], one per kernel
position, each scaled by 1/sqrt(2) (WeightWatcher's `conv2d_norm`, sqrt(c / 2) with c = 1 when the
slices' eigenvalues are pooled), their rf min(out, in) eigenvalues pooled: half those of the raw
slices. `nn.Conv1d`, weight (out, in, k), is read as the Conv2d (out, in, k, 1) (WeightWatcher's own
reading of a Conv1d does not slice it and counts min(out, in, k) eigenvalues, so that it skips every
Conv1d with k < 8). Other modules (BatchNorm, Conv3d, transposed convolutions) are not read.

Skipped layers, as WeightWatcher leaves them out of its table: those with M rf < `min_eigenvalues`
(8), M rf > `max_eigenvalues` (15000; null: no limit) or N > 50000, where (N, M) = (max, min) of
(out, in), except that for a convolution with out < in whose rf is even or whose out + in < k_h + k_w,
WeightWatcher's slicing leaves (N, M) = (out, in), so that it counts in * rf eigenvalues.

Fit. x_1 <= ... <= x_n are the layer's eigenvalues above 1e-5 (WeightWatcher's absolute threshold).
A candidate xmin = x_i with i < n (ties are separate candidates) has the tail x_i..x_n of
m = n - i + 1 >= 2 values, S_i = sum_{j >= i} ln(x_j / x_i), and the Kolmogorov-Smirnov distance
between the fitted CDF and the lower step of the empirical one,

    D_i = max_{j = i..n} |1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / m|.

- n >= 20: the maximum-likelihood alpha_i = 1 + m / S_i, over the candidates with S_i > 0;
- n < 20 (WeightWatcher 0.7.7's small-N rule): the bias-corrected alpha_i = 1 + (m - 1) / S_i, over
  the candidates with m >= min(8, n) and S_i > 1e-12 (its `WWFit` also scores each candidate by
  D_i - 0.868 / sqrt(m), but its constructor then takes the candidate of least D_i, as here).

xmin is the candidate of least D_i, the first on ties. A layer has no fit when no candidate qualifies
(WeightWatcher then reports alpha = -1, "failed", when at most one eigenvalue is above 1e-5, and a
placeholder alpha of 0 or inf for a constant spectrum; none enters these rows). Standard error
(alpha - 1) / sqrt(m).

Rows (split "-", the weights alone), over the L fitted layers:

- `esd_alpha`: the mean of alpha_l;
- `esd_alpha_weighted`: sum_l alpha_l log10(lambda_max,l) / L, lambda_max,l the layer's largest eigenvalue;
- `esd_alpha_layer@k`: alpha of the k-th layer read (k counts every layer above in
  `model.named_modules()` order, from 0, skipped layers included, so k names the same layer of an
  architecture at every width);
- `esd_layers_skipped` (diagnostic): the layers read but skipped or without a fit. When every layer
  is, only this row is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from phasediagram.metrics.base import NO_SPLIT, Metric, MetricData, Panel, key
from phasediagram.options import integer, validate

LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)
CONV_SCALE = 0.5  # eigenvalue scale of a convolution's slices (conv2d_norm)
MAX_N = 50000  # the largest matrix dimension WeightWatcher reads (max_N)
THRESHOLD = 1e-5  # eigenvalues at most this are left out of the fit (EVALS_THRESH)
SMALL_N = 20  # below this many eigenvalues, the small-N rule (SMALL_N_CUTOFF)
SMALL_N_TAIL = 8  # the fewest values of a small-N tail (k_min)
SMALL_N_MIN_SUM = 1e-12  # the smallest S of a small-N candidate


@dataclass(frozen=True)
class ESDAlphaOptions:
    """`min_eigenvalues`, `max_eigenvalues`: layers that WeightWatcher counts fewer or more eigenvalues
    of are skipped (its `min_evals`, `max_evals` and their defaults; module docstring)."""

    min_eigenvalues: int = integer(8, low=1)
    max_eigenvalues: int | None = integer(15000, low=1, optional=True, note="null: no limit")

    def __post_init__(self):
        validate(self, "metric_options.esd_alpha")


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    lambda_min: float
    ks_distance: float
    n_tail: int

    @property
    def stderr(self) -> float:
        """(alpha - 1) / sqrt(n_tail), the asymptotic standard error of the MLE."""
        return (self.alpha - 1.0) / math.sqrt(self.n_tail)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every Linear, Embedding, Conv1d and Conv2d of `model`, in `named_modules()` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def kernel_weight(module: nn.Module) -> torch.Tensor:
    """The weight as WeightWatcher reads it: (out, in) for Linear and Embedding, (out, in, k_h, k_w)
    for a convolution (a Conv1d's (out, in, k) as (out, in, k, 1)), rounded to float32."""
    w = module.weight.detach().float()
    return w.unsqueeze(-1) if w.dim() == 3 else w


def counted_shape(module: nn.Module) -> tuple[int, int, int]:
    """(N, M, rf) by which WeightWatcher decides whether to read a layer (module docstring)."""
    w = kernel_weight(module)
    out, inn = w.shape[:2]
    if w.dim() == 2:
        return max(out, inn), min(out, inn), 1
    rf = w.shape[2] * w.shape[3]
    if out < inn and (rf % 2 == 0 or out + inn < w.shape[2] + w.shape[3]):
        return out, inn, rf
    return max(out, inn), min(out, inn), rf


def weight_matrices(module: nn.Module) -> list[torch.Tensor]:
    """The layer's matrices: W for Linear and Embedding, the (out, in) slice W[:, :, i, j] at each
    kernel position of a convolution (float32 values, float64 dtype)."""
    w = kernel_weight(module).double()
    if w.dim() == 2:
        return [w]
    slices = w.reshape(w.shape[0], w.shape[1], -1)
    return [slices[:, :, i] for i in range(slices.shape[2])]


def layer_eigenvalues(module: nn.Module) -> np.ndarray:
    """The layer's eigenvalues, sorted (float64): the squared singular values of its matrices, pooled,
    times 1/2 for a convolution."""
    scale = 1.0 if kernel_weight(module).dim() == 2 else CONV_SCALE
    s = torch.cat([torch.linalg.svdvals(w) for w in weight_matrices(module)]).cpu().numpy()
    return np.sort(scale * s * s)


def fit_power_law(values: np.ndarray) -> PowerLawFit | None:
    """WeightWatcher's power-law fit of `values` (all > 0; module docstring): the MLE, or below 20 values
    the bias-corrected MLE; xmin of least KS distance; None when no candidate xmin qualifies."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = len(x)
    small = n < SMALL_N
    min_tail, min_sum = (min(SMALL_N_TAIL, max(n, 2)), SMALL_N_MIN_SUM) if small else (2, 0.0)
    logs = np.log(x)
    best = None
    for i in range(n - min_tail + 1):
        m = n - i
        total = np.sum(logs[i:]) - m * logs[i]
        if not total > min_sum:
            continue
        alpha = 1.0 + (m - 1 if small else m) / total
        d = float(np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - alpha) - np.arange(m) / m)))
        if best is None or d < best.ks_distance:
            best = PowerLawFit(float(alpha), float(x[i]), d, m)
    return best


def esd_alpha(model: nn.Module, data: MetricData, options: ESDAlphaOptions, generator) -> dict[str, float]:
    """Per-layer power-law exponents of the weight spectra, their mean and the weighted alpha (module docstring).

    Data-free: `data` and `generator` are not used.
    """
    out, alphas, weighted, skipped = {}, [], [], 0
    for index, (_, module) in enumerate(weight_layers(model)):
        n, m, rf = counted_shape(module)
        fit = None
        if options.min_eigenvalues <= m * rf <= (options.max_eigenvalues or math.inf) and n <= MAX_N:
            lam = layer_eigenvalues(module)
            fit = fit_power_law(lam[lam > THRESHOLD])
        if fit is None:
            skipped += 1
            continue
        alphas.append(fit.alpha)
        weighted.append(fit.alpha * math.log10(float(lam[-1])))
        out[key(NO_SPLIT, "esd_alpha_layer", index)] = fit.alpha
    if alphas:
        out[key(NO_SPLIT, "esd_alpha")] = float(np.mean(alphas))
        out[key(NO_SPLIT, "esd_alpha_weighted")] = float(np.mean(weighted))
    out[key(NO_SPLIT, "esd_layers_skipped")] = float(skipped)
    return out


METRIC = Metric(
    "esd_alpha", "single", esd_alpha, ESDAlphaOptions,
    panels=(Panel("esd_alpha", "-", "weight-spectrum power-law alpha (layer mean)", cmap="viridis"),
            Panel("esd_alpha_weighted", "-", "weighted alpha sum alpha log10 lambda_max / L", cmap="viridis")),
    description="WeightWatcher's data-free alpha as weightwatcher 0.7.7's analyze() computes it: power-law "
                "exponent of each layer's W^T W spectrum, its layer mean and weighted alpha",
    diagnostics=("esd_layers_skipped",),
)
