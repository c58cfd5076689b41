"""`loss_acc`: cross-entropy and accuracy over the whole train and test splits, eval mode."""

from __future__ import annotations

from dataclasses import dataclass

from phasediagram.metrics.base import Metric, MetricData, Panel, evaluate, key
from phasediagram.options import integer, validate


@dataclass(frozen=True)
class LossAccOptions:
    # evaluation batch size (does not change the result)
    batch_size: int = integer(1000, low=1)

    def __post_init__(self):
        validate(self, "metric_options.loss_acc")


def loss_acc(model, data: MetricData, options: LossAccOptions, generator) -> dict[str, float]:
    """L = (1/N) sum_i CE(f(x_i), y_i) and acc = 100 (1/N) sum_i [argmax f(x_i) = y_i] on train and test."""
    out = {}
    for split in ("train", "test"):
        loss, acc = evaluate(model, data.split(split), options.batch_size)
        out[key(split, "loss")] = loss
        out[key(split, "acc")] = acc
    return out


METRIC = Metric(
    "loss_acc", "single", loss_acc, LossAccOptions,
    panels=(Panel("acc", "test", "test accuracy (%)", cmap="viridis"),
            Panel("loss", "train", "training loss", log=True, cmap="viridis_r")),
    description="cross-entropy and accuracy on train and test",
)
