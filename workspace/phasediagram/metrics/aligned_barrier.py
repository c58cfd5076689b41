"""`aligned_barrier`: the linear-path barrier between two seeds after aligning their hidden units
(Ainsworth et al. 2023, "Git Re-Basin", weight matching), beside the barrier without alignment.

Model B's hidden units are permuted to match model A's (`numerics.weight_matching`: coordinate
descent over linear assignment problems, its order drawn from the metric's generator), which leaves
B's function unchanged. Along the straight line theta(t) = (1 - t) theta_A + t theta_B at
t_k = k / (points - 1), each point's BatchNorm running statistics are reset and recomputed on the
training examples (`curve.model_at`: cumulative average over one in-order pass, batches of
`batch_size`), then loss and error (percent) are measured on train and test in eval mode. For a
model without BatchNorm (the `mlp` family) and with `repair`, a third line is measured: the aligned
line with REPAIR (`numerics.repair`: each hidden unit's output rescaled to the interpolated mean and
standard deviation of the endpoints' on the same training examples); for BatchNorm models the
statistics reset above is that correction, and no third line is recorded. With e(t) the training
error, as `curve`'s mc,

    barrier = e(t*) - (e(0) + e(1)) / 2,   t* = argmax_{t_k} |e(t_k) - (e(0) + e(1)) / 2|,

in percentage points of training error: barrier = -mc, so barrier > 0 is a barrier (poorly
connected), ~0 well connected, < 0 endpoints that are not minima. `linear_barrier` is this on the
line to B itself (with the same grid and examples it equals -`mc_linear` of `curve`),
`aligned_barrier` on the line to the permuted B, `repaired_barrier` on that line with REPAIR. The
permuted B computes B's function, and REPAIR leaves the endpoints unchanged, so the lines share the
endpoint evaluations (those of the unaligned line).

The families `mlp`, `resnet1d` and `resnet18` have hand-written permutation specs; any other model
(a plugged-in architecture) has its spec traced from its forward on two training examples
(`numerics.permutation_trace`: Linear, Conv, BatchNorm and LayerNorm layers, residual additions,
pooling, reshapes). A model the tracer cannot follow is refused (`UnsupportedModel`, naming the
operation), by `check_model` when a spec is checked and by the metric itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from phasediagram.data.datasets import Split
from phasediagram.metrics.base import PAIR_SELECTIONS, Metric, MetricData, Panel, evaluate, key
from phasediagram.metrics.curve import line, mode_connectivity, model_at
from phasediagram.numerics.repair import NotRepairable, endpoint_stats, repaired
from phasediagram.numerics.weight_matching import align, permutation_spec
from phasediagram.options import choice, flag, integer, validate

NAME = "aligned_barrier"
PAIRS = PAIR_SELECTIONS


@dataclass(frozen=True)
class AlignedBarrierOptions:
    """`points` evenly spaced values of t in [0, 1] (5: 0, .25, .5, .75, 1, the grid of `curve`);
    `batch_size` the batches of the BatchNorm recomputation, `eval_batch_size` those of the
    evaluation; `eval_examples` caps the examples of each split (the first ones; 0: all);
    `max_sweeps` caps the coordinate-descent sweeps of weight matching; `pairs` which seed pairs of
    a cell are measured; `repair` adds the REPAIRed aligned line for models without BatchNorm."""

    points: int = integer(5, low=3)
    batch_size: int = integer(128, low=2)
    eval_batch_size: int = integer(1000, low=1)
    eval_examples: int = integer(0, low=0, note="0: all")
    max_sweeps: int = integer(100, low=1)
    pairs: str = choice("adjacent", PAIRS)
    repair: bool = flag(True)

    def __post_init__(self):
        validate(self, f"metric_options.{NAME}")

    @property
    def ts(self) -> list[float]:
        return [k / (self.points - 1) for k in range(self.points)]


def _evaluate(template: nn.Module, params: Mapping[str, torch.Tensor], train: Split, test: Split,
              options: AlignedBarrierOptions) -> tuple[float, float, float, float]:
    """(train loss, train err %, test loss, test err %) of `params`, BatchNorm statistics recomputed on `train`."""
    return _measure(model_at(template, params, train, options.batch_size), train, test, options)


def _measure(model: nn.Module, train: Split, test: Split, options: AlignedBarrierOptions
             ) -> tuple[float, float, float, float]:
    train_loss, train_acc = evaluate(model, train, options.eval_batch_size)
    test_loss, test_acc = evaluate(model, test, options.eval_batch_size)
    return train_loss, 100.0 - train_acc, test_loss, 100.0 - test_acc


def aligned_barrier(model_a: nn.Module, model_b: nn.Module, data: MetricData, options: AlignedBarrierOptions,
                    generator: torch.Generator) -> dict[str, float]:
    """Linear-path barriers from A to B and from A to B aligned by weight matching (module docstring).

    Keys: `train/aligned_barrier`, `train/linear_barrier` and their t* (`..._t`);
    `{train,test}/{loss,err}_aligned@t` and `{train,test}/{loss,err}_linear@t` along both lines;
    with `repair` and no BatchNorm, `train/repaired_barrier`, its t* and `{train,test}/{loss,err}_repaired@t`;
    `-/wm_converged` (1.0 when weight matching stopped after a sweep that changed no permutation, 0.0
    when it ran out of `max_sweeps`).
    """
    permuted_b, matching = align(model_a, model_b, generator, options.max_sweeps, data.train.x[:2])
    theta_a = {n: p.detach() for n, p in model_a.named_parameters()}
    theta_b = {n: p.detach() for n, p in model_b.named_parameters()}
    cap = options.eval_examples or None
    train, test = (Split(s.x[:cap], s.y[:cap]) for s in (data.train, data.test))
    ts = options.ts
    unaligned = [_evaluate(model_a, line(theta_a, theta_b, t), train, test, options) for t in ts]
    theta_pb = {n: permuted_b[n] for n in theta_a}
    inner = [_evaluate(model_a, line(theta_a, theta_pb, t), train, test, options) for t in ts[1:-1]]
    paths = {"linear": unaligned, "aligned": [unaligned[0], *inner, unaligned[-1]]}
    if options.repair:
        paths.update(_repaired_line(model_a, theta_a, theta_pb, unaligned, train, test, options))
    out: dict[str, float] = {}
    for path, results in paths.items():
        for t, (trl, tre, tel, tee) in zip(ts, results):
            out[key("train", f"loss_{path}", t)], out[key("train", f"err_{path}", t)] = trl, tre
            out[key("test", f"loss_{path}", t)], out[key("test", f"err_{path}", t)] = tel, tee
        mc, k = mode_connectivity([r[1] for r in results])
        out[key("train", f"{path}_barrier")], out[key("train", f"{path}_barrier_t")] = -mc + 0.0, ts[k]
    out[key("-", "wm_converged")] = float(matching.converged)
    return out


def check_model(model: nn.Module, example: torch.Tensor) -> None:
    """Raise `UnsupportedModel` (a `SpecError` on "arch", naming the operation) if weight matching has
    no permutation spec for `model`, traced on `example` (a batch of inputs) outside the families."""
    permutation_spec(model, example)


def _repaired_line(model_a: nn.Module, theta_a, theta_pb, unaligned: list, train: Split, test: Split,
                   options: AlignedBarrierOptions) -> dict[str, list]:
    """{"repaired": the evaluations along the aligned line with REPAIR}, or {} for a BatchNorm model."""
    try:
        ends = endpoint_stats(model_at(model_a, theta_a, None), model_at(model_a, theta_pb, None), train,
                              options.batch_size)
    except NotRepairable:
        return {}
    inner = [_measure(repaired(model_at(model_a, line(theta_a, theta_pb, t), None), ends, t, train,
                               options.batch_size), train, test, options) for t in options.ts[1:-1]]
    return {"repaired": [unaligned[0], *inner, unaligned[-1]]}


METRIC = Metric(
    "aligned_barrier", "pair", aligned_barrier, AlignedBarrierOptions,
    panels=(Panel("aligned_barrier", "train", "linear barrier after weight matching (train error %)",
                  cmap="RdBu_r", center=0.0),
            Panel("linear_barrier", "train", "linear barrier (train error %)", cmap="RdBu_r", center=0.0)),
    description="linear-path barrier (train error %) after permuting one seed's units to the other's "
                "(weight matching, Git Re-Basin; permutation groups traced for plugged-in families), and "
                "without; with REPAIR for models without BatchNorm",
    selects_pairs=True,
    check_model=check_model,
    diagnostics=("aligned_barrier_t", "linear_barrier_t", "repaired_barrier_t", "wm_converged"),
    test_options={"points": 3, "eval_examples": 64, "batch_size": 32},
)
