"""`dist`: L2 distance between the trainable parameters of two seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phasediagram.metrics.base import NO_SPLIT, Metric, MetricData, Panel, key


@dataclass(frozen=True)
class DistOptions:
    pass


@torch.no_grad()
def dist(model_a, model_b, data: MetricData, options: DistOptions, generator) -> dict[str, float]:
    """||theta_a - theta_b||_2 over all trainable parameters (buffers such as BN statistics excluded)."""
    sq = sum(float(((pa - pb) ** 2).sum()) for pa, pb in zip(model_a.parameters(), model_b.parameters())
             if pa.requires_grad)
    return {key(NO_SPLIT, "dist"): sq ** 0.5}


METRIC = Metric(
    "dist", "pair", dist, DistOptions,
    panels=(Panel("dist", "-", "L2 distance between seeds", cmap="viridis_r"),),
    description="L2 distance between the parameters of two seeds",
)
