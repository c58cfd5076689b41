"""`nrs`: the Neighborhood Region Smoothing divergence (Zhao & Zhang 2022) as a flatness measure.

    NRS(w) = E_delta[ (1/N) sum_i KL( p(x_i; w) || p(x_i; w + delta) ) ],

p(x; w) = softmax(f(x; w)), BatchNorm in eval mode (running statistics kept, not perturbed), the
mean over the N examples of a split. Small values: the outputs barely change in the neighbourhood
of w, a flat region in function space.

Neighbour sampling (`sample_neighbour`, shared with the NRS regularizer). For every trainable
parameter tensor w_l independently,

    delta_l = rho * ||w_l||_2 * u_l / ||u_l||_2,     u_l ~ N(0, I),

so delta_l is uniform in direction on the sphere of radius rho ||w_l|| around w_l: the radius is
relative to each tensor's norm (invariant to the rescalings BatchNorm makes harmless), and a tensor
of norm 0 is not perturbed. Reference radius rho = 0.05, the neighbourhood size of SAM.

KL direction: KL(p(w) || p(w + delta)), the unperturbed model's prediction as the reference
distribution, as in the NRS regularizer.

Estimator: K neighbours delta_1..delta_K drawn from the generator; the metric is the mean over
neighbours of the per-neighbour mean KL, with its standard error std_k / sqrt(K) (ddof = 1; 0 when
K = 1). At rho = 0 the neighbour is w itself and the value is exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from phasediagram.metrics.base import Metric, MetricData, Panel, key
from phasediagram.metrics.local_energy import SPLITS, subset_of
from phasediagram.models.modes import eval_mode
from phasediagram.numerics.perturbation import kl_divergence, sample_neighbour
from phasediagram.options import integer, real, subset, validate


@dataclass(frozen=True)
class NRSOptions:
    rho: float = real(0.05, low=0, high=10)  # relative radius: ||delta_l|| = rho ||w_l|| per parameter tensor
    n_neighbours: int = integer(10, low=1)  # K, neighbours averaged over
    splits: tuple[str, ...] = subset(SPLITS, SPLITS)
    # None: the whole split; else a fixed subset (seed 0) of this size
    n_examples: int | None = integer(None, low=1, optional=True)
    batch_size: int = integer(1000, low=1)  # evaluation batch size (does not change the result)

    def __post_init__(self):
        validate(self, "metric_options.nrs")
        object.__setattr__(self, "splits", tuple(self.splits))


@torch.no_grad()
def nrs(model, data: MetricData, options: NRSOptions, generator) -> dict[str, float]:
    """Mean over K neighbours of the mean KL(p(x; w) || p(x; w + delta)) on each split (module docstring).

    The splits are done in order, each with its own K neighbours drawn from `generator`.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    out = {}
    with eval_mode(model):
        for split in options.splits:
            part = subset_of(data.split(split), options.n_examples)
            base = [model(b.x) for b in part.batches(options.batch_size)]
            kls = []
            for _ in range(options.n_neighbours):
                nb = sample_neighbour(params, options.rho, generator)
                total = sum(float(kl_divergence(z, functional_call(model, (nb, buffers), (b.x,)))) * len(b)
                            for z, b in zip(base, part.batches(options.batch_size)))
                kls.append(total / len(part))
            k = torch.tensor(kls, dtype=torch.float64)
            out[key(split, "nrs")] = float(k.mean())
            out[key(split, "nrs_se")] = float(k.std(correction=1) / math.sqrt(len(kls))) if len(kls) > 1 else 0.0
    return out


METRIC = Metric(
    "nrs", "single", nrs, NRSOptions,
    panels=(Panel("nrs", "train", "NRS divergence KL(p(w) || p(w + delta)), train", log=True, cmap="magma"),),
    description="mean KL between the outputs of w and of random neighbours at relative radius rho",
    stderrs=("nrs_se",),
    test_options={"n_neighbours": 2},
)
