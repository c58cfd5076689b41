"""`esd_alpha`: the power-law exponent of each layer's weight spectrum (WeightWatcher's data-free alpha).

Martin & Mahoney (JMLR 2021; Nature Communications 2021): for a layer's weight matrix W (N x M),
the empirical spectral density (ESD) of the correlation matrix W^T W, i.e. the squared singular
values lambda_i = sigma_i(W)^2 (min(N, M) of them), has a heavy tail p(lambda) ~ lambda^-alpha for
lambda >= lambda_min; well-trained layers have alpha in about [2, 6], smaller alpha a heavier tail.

Weight matrices. `nn.Linear`: W (out, in). Convolutions (`nn.Conv1d`, `nn.Conv2d`, ...) with weight
(out, in, k_1, ...), `conv="slices"` (WeightWatcher's rule): the prod(k) matrices W[:, :, i, ...] of
shape (out, in), one per kernel position, whose eigenvalues are pooled into one ESD for the
layer; `conv="flatten"`: one matrix (out, in * prod(k)). Other modules (BatchNorm, biases) have no
matrix. Eigenvalues at most `lambda_max * max(N, M) * eps(float64)` are numerical zeros and dropped.

Fit (Clauset, Shalizi & Newman, SIAM Review 2009, continuous power law). For a candidate lower
bound lambda_min and the m eigenvalues lambda_i >= lambda_min of the tail, the maximum-likelihood
exponent is

    alpha = 1 + m / sum_i ln(lambda_i / lambda_min),

the fitted tail CDF P(lambda) = 1 - (lambda / lambda_min)^(1 - alpha), and the Kolmogorov-Smirnov
distance D = max over the tail of |S(lambda) - P(lambda)| with S the tail's empirical CDF. lambda_min
is the candidate (each distinct eigenvalue leaving at least `min_tail` eigenvalues in the tail)
with the smallest D. Standard error (alpha - 1) / sqrt(m).

Rows (split "-", the weights alone), over the layers fitted:

- `esd_alpha`: the mean of alpha_l over the L fitted layers;
- `esd_alpha_weighted`: WeightWatcher's alpha-hat, sum_l alpha_l log10(lambda_max,l) / L;
- `esd_alpha_layer@k`: alpha of the k-th weight layer (k counts every Linear and convolution in
  `model.named_modules()` order, from 0, skipped layers included, so k names the same layer of an
  architecture at every width);
- `esd_layers_skipped` (diagnostic): the layers with fewer than `min_eigenvalues` positive
  eigenvalues, or without a fit (fewer than `min_tail` eigenvalues, or every candidate tail
  constant). When every layer is skipped only this row is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from phasediagram.metrics.base import NO_SPLIT, MetricData, key
from phasediagram.options import choice, integer, validate

CONV_RULES = ("slices", "flatten")


@dataclass(frozen=True)
class ESDAlphaOptions:
    """`min_eigenvalues`: layers whose ESD has fewer positive eigenvalues are skipped (WeightWatcher's
    `min_evals` default, 10); `min_tail`: the fewest eigenvalues a fitted tail may hold; `conv`: how a
    convolution's weight becomes matrices (module docstring)."""

    min_eigenvalues: int = integer(10, low=2)
    min_tail: int = integer(5, low=2)
    conv: str = choice("slices", CONV_RULES)

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
    """The (name, module) of every `nn.Linear` and convolution of `model`, in `named_modules()` order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def weight_matrices(module: nn.Module, conv: str = "slices") -> list[torch.Tensor]:
    """The matrices of a layer's weight: W (out, in) for a Linear layer; for a convolution the
    (out, in) slice at each kernel position ("slices") or W reshaped to (out, in * prod(k)) ("flatten")."""
    w = module.weight.detach()
    if w.dim() == 2:
        return [w]
    if conv == "flatten":
        return [w.reshape(w.shape[0], -1)]
    slices = w.reshape(w.shape[0], w.shape[1], -1)
    return [slices[:, :, i] for i in range(slices.shape[2])]


def layer_eigenvalues(module: nn.Module, conv: str = "slices") -> np.ndarray:
    """The positive eigenvalues of W^T W (squared singular values, float64) of the layer's matrices, pooled, sorted."""
    values = []
    for w in weight_matrices(module, conv):
        s = torch.linalg.svdvals(w.double()).cpu().numpy()
        lam = s * s
        if lam.size:
            values.append(lam[lam > lam.max() * max(w.shape) * np.finfo(np.float64).eps])
    return np.sort(np.concatenate(values)) if values else np.zeros(0)


def fit_power_law(eigenvalues: np.ndarray, min_tail: int = 5) -> PowerLawFit | None:
    """The Clauset-Shalizi-Newman fit of p(lambda) ~ lambda^-alpha to the tail (module docstring);
    None when no candidate lambda_min leaves at least `min_tail` (>= 2) values with a non-constant tail."""
    x = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    x = x[x > 0]
    logs = np.log(x)
    suffix = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])  # suffix[k] = sum_{j >= k} ln x_j
    best = None
    for k in range(len(x) - max(min_tail, 2) + 1):
        if k > 0 and x[k] == x[k - 1]:
            continue  # a tied lower bound: its tail starts at the first of the ties
        m = len(x) - k
        total = suffix[k] - m * logs[k]
        if not total > 0:
            continue
        alpha = 1.0 + m / total
        cdf = 1.0 - np.exp((1.0 - alpha) * (logs[k:] - logs[k]))
        steps = np.arange(1, m + 1) / m
        d = float(max(np.max(steps - cdf), np.max(cdf - (steps - 1.0 / m))))
        if best is None or d < best.ks_distance:
            best = PowerLawFit(float(alpha), float(x[k]), d, m)
    return best


def esd_alpha(model: nn.Module, data: MetricData, options: ESDAlphaOptions, generator) -> dict[str, float]:
    """Per-layer power-law exponents of the weight ESDs, their mean and WeightWatcher's weighted alpha.

    Data-free: `data` and `generator` are not used. For each weight layer l (module docstring), the
    pooled eigenvalues of W^T W; layers with fewer than `min_eigenvalues` of them, or without a
    finite fit, are skipped and counted; the others give alpha_l and lambda_max,l.
    """
    out, alphas, weighted, skipped = {}, [], [], 0
    for index, (_, module) in enumerate(weight_layers(model)):
        lam = layer_eigenvalues(module, options.conv)
        fit = fit_power_law(lam, options.min_tail) if len(lam) >= options.min_eigenvalues else None
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
