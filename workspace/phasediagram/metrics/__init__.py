"""The metric registry: one explicit dict, one contract (see `base`).

To add a metric: write `metrics/<name>.py` with its compute function, its options dataclass and its
registration `METRIC = Metric(...)` (kind, panels, description, diagnostics, test options: `base.Metric`),
and name the module's METRIC in the tuple below. The registry-wide contract tests then cover it.
"""

from __future__ import annotations

from phasediagram.metrics import (
    aligned_barrier,
    cka,
    curve,
    dist,
    esd_alpha,
    fisher,
    grad_norm,
    hessian,
    local_energy,
    loss_acc,
    loss_slice,
    nrs,
)
from phasediagram.metrics.base import DIAGNOSTIC, ROW_KINDS, STDERR, VALUE, Metric, MetricData, Panel, key, parse_key

METRICS: dict[str, Metric] = {m.name: m for m in (
    loss_acc.METRIC,
    dist.METRIC,
    cka.METRIC,
    curve.METRIC,
    aligned_barrier.METRIC,
    hessian.METRIC,
    fisher.METRIC,
    local_energy.METRIC,
    nrs.METRIC,
    grad_norm.METRIC,
    loss_slice.METRIC,
    esd_alpha.METRIC,
)}

TRAIN_DIAGNOSTICS = ("epochs", "diverged_epoch", "diverged_step")  # rows of the train stage that are bookkeeping


def row_kind(source: str, quantity: str) -> str:
    """What a table row of `source` (a metric, "train", or another tool's name) and `quantity` holds:
    "value" (a measurement), "stderr" (the standard error of one) or "diagnostic" (of the run)."""
    if source in METRICS:
        return METRICS[source].quantity_kind(quantity)
    return DIAGNOSTIC if source == "train" and quantity in TRAIN_DIAGNOSTICS else VALUE


__all__ = ["DIAGNOSTIC", "METRICS", "ROW_KINDS", "STDERR", "VALUE", "Metric", "MetricData", "Panel", "key",
           "parse_key", "row_kind"]
