"""`loss_acc`: cross-entropy and accuracy over the whole train and test splits, eval mode."""

from __future__ import annotations

from dataclasses import dataclass

from phasediagram.metrics.base import MetricData, check, evaluate, key


@dataclass(frozen=True)
class LossAccOptions:
    batch_size: int = 1000  # evaluation batch size (does not change the result)

    def __post_init__(self):
        check("loss_acc", "batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "integer >= 1",
              self.batch_size)


def loss_acc(model, data: MetricData, options: LossAccOptions, generator) -> dict[str, float]:
    """L = (1/N) sum_i CE(f(x_i), y_i) and acc = 100 (1/N) sum_i [argmax f(x_i) = y_i] on train and test."""
    out = {}
    for split in ("train", "test"):
        loss, acc = evaluate(model, data.split(split), options.batch_size)
        out[key(split, "loss")] = loss
        out[key(split, "acc")] = acc
    return out
