"""`loss_acc`: cross-entropy and accuracy over the whole train and test splits, eval mode."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ensemble_models
from .base import MetricData, check, evaluate, key


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


def loss_acc_cell(models, data: MetricData, options: LossAccOptions, generators) -> list[dict[str, float]]:
    """`loss_acc` of every model of a cell (one arch and width) at once: for model s and split D,
    loss = (1/|D|) sum_i CE(f_s(x_i), y_i) and acc = 100 (1/|D|) sum_i [argmax f_s(x_i) = y_i], in eval
    mode, with one ensemble forward per batch for all s (`ensemble_models.evaluate_members`) when the
    models have a 1D ensemble form (MLP, 1D ResNet), else one model after another. The models are not
    modified (their weights are copied into the ensemble)."""
    if not ensemble_models.batched_evaluation_pays(models[0]):
        return [loss_acc(m, data, options, g) for m, g in zip(models, generators)]
    out: list[dict[str, float]] = [{} for _ in models]
    for split in ("train", "test"):
        part = data.split(split)
        for row, (loss, acc) in zip(out, ensemble_models.evaluate_members(models, part.x, part.y, options.batch_size)):
            row[key(split, "loss")] = loss
            row[key(split, "acc")] = acc
    return out
