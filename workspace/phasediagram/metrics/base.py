"""The metric contract shared by every registered metric.

A metric is a function of one model (`kind="single"`) or of two models (`kind="pair"`, e.g. two
seeds of one cell), the data and its options:

    compute(model, data, options, generator) -> dict[str, float]            # single
    compute(model_a, model_b, data, options, generator) -> dict[str, float]  # pair

Keys name a split and a quantity, optionally a coordinate along a curve: `key("train", "loss")`
is "train/loss", `key("train", "err", 0.25)` is "train/err@0.25"; the table splits them into the
columns split, metric and coord. A metric leaves the parameters and the train/eval mode of its
models as it found them, and given the same generator state it returns the same values.
Options are a frozen dataclass whose defaults are the reference settings; each field declares
what it accepts (`integer(...)`, `real(...)`, `flag`, `choice`, ... of `phasediagram.options`) and
`__post_init__` calls `validate(self, "metric_options.<name>")`, which raises a `SpecError` for the
first value out of range. Plot defaults live in `panels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.data.datasets import Split
from phasediagram.data.sequences import IGNORE
from phasediagram.errors import SpecError
from phasediagram.models.modes import eval_mode

NO_SPLIT = "-"
PAIR_SELECTIONS = ("all", "adjacent", "first")  # the seed pairs of a cell a pair metric may measure
VALUE, STDERR, DIAGNOSTIC = "value", "stderr", "diagnostic"
LABEL = "label"  # a published annotation of a cell (e.g. a failure-source label), never a measurement
ROW_KINDS = (VALUE, STDERR, DIAGNOSTIC, LABEL)


@dataclass(frozen=True)
class Panel:
    """How to draw one quantity of a metric in the phase-diagram figure."""

    quantity: str
    split: str
    label: str
    log: bool = False
    cmap: str = "viridis"
    vmin: float | None = None
    vmax: float | None = None
    center: float | None = None  # diverging colormap centred here
    fallback: "Panel | None" = None  # drawn instead where a table lacks this quantity (e.g. a published table)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "single" or "pair"
    compute: Callable[..., dict[str, float]]
    options: type
    panels: tuple[Panel, ...] = ()
    description: str = ""
    # single metrics only, optional: compute_seeds(models, datas, options, generators) -> [dict per model],
    # the values `compute` gives each model with datas[i] (its state folder) and its generator, for several
    # of a cell's seeds at once
    compute_seeds: Callable[..., list[dict[str, float]]] | None = None
    # pair metrics only, optional: compute_pairs(pairs, datas, options, generators) -> [dict per pair], the
    # values `compute` gives each pair (a, b) with datas[i] (its state folder) and its generator, for several
    # of a cell's pairs at once
    compute_pairs: Callable[..., list[dict[str, float]]] | None = None
    # with compute_seeds or compute_pairs: group_size(spec, cell, options, units) -> how many of a cell's
    # seeds or pairs one call takes (0: `compute`, one by one); the policies are in `accel.policy`
    group_size: Callable[..., int] | None = None
    # pair metrics: whether the options' `pairs` field ("all", "adjacent", "first") selects the seed pairs
    # (otherwise every pair is measured)
    selects_pairs: bool = False
    # quantities that are not measurements: standard errors of one, and run diagnostics (product
    # counts, convergence flags, coordinates of an extremum); figures, phases and correlations skip them
    stderrs: tuple[str, ...] = ()
    diagnostics: tuple[str, ...] = ()
    # the model families the metric can measure (None: any nn.Module, plugged-in families included);
    # a spec naming another family with this metric is refused when it is checked
    families: tuple[str, ...] | None = None
    # optional: check_model(model, example) raises a SpecError naming why the metric cannot measure a
    # plugged-in family's model (built at the spec's smallest width; `example` a batch of two inputs),
    # run when the spec is checked
    check_model: Callable[[nn.Module, torch.Tensor], None] | None = None
    # options that keep the registry-wide tests fast on a tiny model (tests/test_metric_contract.py)
    test_options: Mapping[str, Any] = field(default_factory=dict)

    def quantity_kind(self, quantity: str) -> str:
        """"stderr", "diagnostic" or "value" (a measurement) for one of this metric's quantities."""
        return STDERR if quantity in self.stderrs else DIAGNOSTIC if quantity in self.diagnostics else VALUE


@dataclass(frozen=True)
class MetricData:
    """The data a metric sees: both splits, already on the metric's device and dtype.

    `state_dir`, when given, is a folder private to this (metric, cell, seed or pair) where a
    long metric (e.g. the mode-connectivity curve) may keep resumable state between attempts.
    """

    train: Split
    test: Split
    n_classes: int
    state_dir: Path | None = None

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise KeyError(name)
        return self.train if name == "train" else self.test


def metric_data(data, like: nn.Module | None = None) -> MetricData:
    """`data` as the `MetricData` a metric reads, for the public numerical functions
    (`hessian.top_eigenvectors`): a `MetricData` as it is; otherwise one set of examples, given as a
    `Split`, a pair (x, y) of tensors or arrays, a torch Dataset of (x, label) items (a TensorDataset),
    or an iterable of (x, y) batches (a DataLoader, its batches concatenated in order), which then
    serves as both splits, with n_classes = 1 + its largest label. With `like` (a model) the inputs
    move to the device and dtype of its parameters, the labels to its device. `TypeError` for
    anything else."""
    if isinstance(data, MetricData):
        return data
    if isinstance(data, Split):
        x, y = data.x, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = torch.as_tensor(data[0]), torch.as_tensor(data[1])
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        x, y = torch.stack([torch.as_tensor(item[0]) for item in items]), torch.as_tensor([int(i[1]) for i in items])
    elif hasattr(data, "__iter__"):
        batches = [(torch.as_tensor(b[0]), torch.as_tensor(b[1])) for b in data]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    else:
        raise TypeError(f"data must be MetricData, a Split, (x, y), a Dataset of (x, label) items or a DataLoader "
                        f"of (x, y) batches, not {type(data).__name__}")
    split = Split(x, y.long())
    if like is not None:
        p = next(like.parameters())
        split = split.to(p.device, p.dtype)
    return MetricData(split, split, int(split.y.max()) + 1)


def per_example_logits(model: nn.Module, example: torch.Tensor) -> None:
    """A `check_model` for the metrics that take one label per example (per-example losses, a class's
    probabilities): `SpecError` on "arch" when `model` maps the inputs `example` to logits other than
    (N, C), e.g. the token logits (N, C, T) of `transformer_seq`."""
    with torch.no_grad(), eval_mode(model):
        shape = tuple(model(example).shape)
    if len(shape) != 2:
        raise SpecError("arch", f"its logits have shape {shape}; the metric needs one label per example, "
                                "logits (N, C)")


def key(split: str, quantity: str, coord: float | None = None) -> str:
    return f"{split}/{quantity}" + ("" if coord is None else f"@{coord:.6g}")


def parse_key(k: str) -> tuple[str, str, float | None]:
    """Inverse of `key`: 'train/err@0.25' -> ('train', 'err', 0.25)."""
    split, _, rest = k.partition("/")
    quantity, at, coord = rest.partition("@")
    return split, quantity, (float(coord) if at else None)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (percent) of `model` over `split`, in eval mode: per example, or,
    for token labels (N, T) and logits (N, C, T), per labelled token (labels -100, `IGNORE`, skipped)."""
    total_loss, correct, n = 0.0, 0, 0
    with eval_mode(model):
        for batch in split.batches(batch_size):
            out = model(batch.x)
            total_loss += float(F.cross_entropy(out, batch.y, reduction="sum", ignore_index=IGNORE))
            correct += int((out.argmax(1) == batch.y).sum())
            n += int((batch.y != IGNORE).sum())
    return total_loss / n, 100.0 * correct / n
