"""Where the ensemble form pays: how many of a cell's seeds (or seed pairs) run as one ensemble.

One policy for training and metrics, each rule a function of the arch, the width and the batch
size. The thresholds come from the benchmarks named at each rule (their current figures are in
docs/performance.md); `spec.ensemble` "on" and "off" override "auto" everywhere.

- Training (`group_size`): resnet1d groups stay within RESNET1D_GROUP_BUDGET activations (members x
  width x batch), one member alone in the ensemble form up to width RESNET1D_ALONE_MAX_WIDTH,
  sequential runs beyond (bench/bench_ensemble.py); mlp all seeds where width^2 x batch <=
  MLP_BUDGET[0] and batch <= MLP_BUDGET[1]; other archs sequential.
- Metrics with `compute_seeds` (`seed_group`): resnet1d all seeds up to width
  METRIC_GROUP_MAX_WIDTH, one at a time in the ensemble form beyond; other archs seed by seed
  (bench/bench_metrics_batched.py, section 4).
- Metrics with `compute_pairs` (`bend_group`): the training rule at the metric's own batch size,
  since training a bend is SGD (bench/bench_metrics_batched.py, section 5).
"""

from __future__ import annotations

from phasediagram.accel import ensemble_models
from phasediagram.spec.experiment import Cell, ExperimentSpec

RESNET1D_GROUP_BUDGET = 16_384
RESNET1D_ALONE_MAX_WIDTH = 64
MLP_BUDGET = (1_048_576, 512)
METRIC_GROUP_MAX_WIDTH = {"resnet1d": 8}


def group_size(arch: str, width: int, batch_size: int, seeds: int) -> int:
    """Seeds trained together as one ensemble in auto mode; 0: ordinary sequential runs (`train.train_seed`).

    resnet1d: the largest g <= seeds with g * width * batch_size <= RESNET1D_GROUP_BUDGET if that is 2 or
    more; else 1 (one member alone in the ensemble form) up to width RESNET1D_ALONE_MAX_WIDTH, 0 beyond.
    mlp: all seeds if width^2 * batch_size <= 2^20 and batch_size <= 512, else 0. Other archs: 0.
    """
    if arch == "resnet1d":
        g = min(seeds, RESNET1D_GROUP_BUDGET // (width * batch_size))
        return g if g >= 2 else int(width <= RESNET1D_ALONE_MAX_WIDTH)
    if arch == "mlp":
        budget, max_batch = MLP_BUDGET
        return seeds if width * width * batch_size <= budget and batch_size <= max_batch else 0
    return 0


def metric_group_size(spec: ExperimentSpec, cell: Cell) -> int:
    """Seeds per call of a metric's `compute_seeds` (`Metric.compute_seeds`); 0: `compute`, seed by seed.

    `ensemble` "off": 0; "on": all seeds wherever the arch has an ensemble form; "auto": resnet1d
    all seeds up to METRIC_GROUP_MAX_WIDTH, one seed (the ensemble form alone) beyond; others 0.
    """
    if spec.ensemble == "off" or not ensemble_models.supports(spec.arch):
        return 0
    if spec.ensemble == "on":
        return len(spec.seeds)
    if spec.arch not in METRIC_GROUP_MAX_WIDTH:
        return 0
    return len(spec.seeds) if cell.width <= METRIC_GROUP_MAX_WIDTH[spec.arch] else 1


def pair_group_size(spec: ExperimentSpec, cell: Cell, batch_size: int, pairs: int) -> int:
    """Pairs per call of a pair metric's `compute_pairs` (`Metric.compute_pairs`: the `curve`'s bends,
    trained as one ensemble); 0: `compute`, pair by pair.

    `ensemble` "off": 0; "on": all pairs wherever the arch has an ensemble form; "auto": the training
    policy, `group_size`(arch, width, batch_size, pairs), since training a bend is SGD at `batch_size`.
    """
    if spec.ensemble == "off" or not ensemble_models.supports(spec.arch):
        return 0
    if spec.ensemble == "on":
        return pairs
    return group_size(spec.arch, cell.width, batch_size, pairs)


def seed_group(spec: ExperimentSpec, cell: Cell, options, seeds: int) -> int:
    """`Metric.group_size` of a metric whose seeds run together: `metric_group_size`."""
    return metric_group_size(spec, cell)


def bend_group(spec: ExperimentSpec, cell: Cell, options, pairs: int) -> int:
    """`Metric.group_size` of a metric training one bend per pair at `options.batch_size`: `pair_group_size`."""
    return pair_group_size(spec, cell, options.batch_size, pairs)
