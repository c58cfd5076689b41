"""Weight matching (Ainsworth et al. 2023, "Git Re-Basin"): permute the hidden units of model B to
align them with those of model A, and the permutation specs of the width-k families.

A permutation spec says, for every entry of a model's state dict, which permutation acts on each
axis (`None`: no permutation, e.g. the input and class axes and the kernel taps). Permuting hidden
units of B by pi (B'[.., i, ..] = B[.., pi[i], ..] along every axis that pi acts on) leaves the
function of B unchanged, as ReLU and BatchNorm act unit by unit and the residual additions join
axes that share one permutation. An axis may hold each unit's entries in a block: a head reading a
flattened feature map of n channels x inner positions holds unit c in the columns c inner + i
(`folds`), and permuting the unit moves its block.

Weight matching maximises the summed inner products of A's weights with the permuted B's,

    max_{pi_1..pi_m}  sum_{(key, axis)}  < W_A[key], pi(W_B)[key] >_F,

over the trainable parameters (weights, biases, BatchNorm weights and biases; the BatchNorm running
statistics are permuted with their units but do not enter the objective). For one permutation p,
with the others fixed, the objective is linear in p: with C_p = sum over the (key, axis) p acts on
of A_k B~_k^T (A_k, B~_k the tensors with that axis first, flattened to rows, B~ with every other
permutation already applied), p maximises sum_i C_p[i, p(i)], a linear assignment problem
(`scipy.optimize.linear_sum_assignment`). Coordinate descent solves these in turn, in an order drawn
afresh from the generator every sweep, replacing a permutation only when its objective grows by more
than `1e-12 * max(1, |objective|)`; it stops after a sweep that replaced none (converged) or after
`max_sweeps` sweeps. Each accepted step increases the objective, so the descent cannot cycle.

Specs: the width-k families (`phasediagram.models.families`) have hand-written ones below; any
other model's is traced from its forward on an example batch (`numerics.permutation_trace`), which
gives the families the same groups under other names (the hand-written ones are kept: each sweep's
order is drawn over the sorted names, so other names would change the matchings found).

- `mlp` (`MLP`): one permutation per hidden layer, on the rows of its Linear weight and bias and the
  columns of the next Linear weight.
- `resnet1d`, `resnet18` (`ResNet` of `BasicBlock`s): the residual stream of a stage shares one
  permutation across the stem (first stage), every block's conv2/bn2 output and shortcut
  projection, and the next layers' inputs; each block's inner channels (conv1/bn1 output, conv2
  input) have their own. A block with a projection shortcut starts a new stage's stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from phasediagram.models.families import MLP, BasicBlock, ResNet
from phasediagram.numerics.permutation_trace import UnsupportedModel, traced_axes

IMPROVEMENT_TOLERANCE = 1e-12  # relative gain of the objective a coordinate step must exceed to be taken

Axes = tuple[str | None, ...]
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """`axes[key]`: the permutation acting on each axis of state-dict entry `key`, or None;
    `sizes[name]`: the number of units permutation `name` permutes; `folds[(key, axis)] = (outer, inner)`
    where that axis holds outer x units x inner entries, unit c at o * units * inner + c * inner + i
    ((1, 1) where absent)."""

    axes: Mapping[str, Axes]
    sizes: Mapping[str, int]
    folds: Mapping[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def fold(self, key: str, axis: int) -> tuple[int, int]:
        return self.folds.get((key, axis), (1, 1))

    def acting(self, name: str) -> list[tuple[str, int]]:
        """The (key, axis) pairs permutation `name` acts on, in state-dict order."""
        return [(k, a) for k, axes in self.axes.items() for a, p in enumerate(axes) if p == name]


# --------------------------------------------------------------------------- the families' specs
def _linear(prefix: str, out: str | None, inp: str | None, module: nn.Linear) -> dict[str, Axes]:
    axes = {f"{prefix}weight": (out, inp)}
    if module.bias is not None:
        axes[f"{prefix}bias"] = (out,)
    return axes


def _conv(prefix: str, out: str, inp: str, module: _ConvNd) -> dict[str, Axes]:
    axes = {f"{prefix}weight": (out, inp, *[None] * (module.weight.dim() - 2))}
    if module.bias is not None:
        axes[f"{prefix}bias"] = (out,)
    return axes


def _norm(prefix: str, units: str, module: _BatchNorm) -> dict[str, Axes]:
    names = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    return {f"{prefix}{n}": (() if n == "num_batches_tracked" else (units,)) for n in names}


def mlp_spec(model: MLP) -> dict[str, Axes]:
    """Hidden layer i of the MLP: permutation `hidden{i}` on its Linear's rows and the next one's columns."""
    children = list(model.net.named_children())
    if any(not isinstance(m, (nn.Flatten, nn.ReLU, nn.Linear)) for _, m in children):
        raise UnsupportedModel(model, "an MLP built from layers other than nn.Flatten, nn.Linear and nn.ReLU")
    linears = [(name, m) for name, m in children if isinstance(m, nn.Linear)]
    axes: dict[str, Axes] = {}
    previous = None
    for i, (name, m) in enumerate(linears):
        out = f"hidden{i}" if i < len(linears) - 1 else None
        axes.update(_linear(f"net.{name}.", out, previous, m))
        previous = out
    return axes


def resnet_spec(model: ResNet) -> dict[str, Axes]:
    """Residual stream `residual{s}` per stage (stem, block outputs, shortcut projections, next inputs),
    `block{b}.inner` for the inner channels of block b."""
    stem = list(model.stem.children())
    layers_ok = (len(stem) == 3 and isinstance(stem[0], _ConvNd) and isinstance(stem[1], _BatchNorm)
                 and isinstance(stem[2], nn.ReLU) and isinstance(model.head, nn.Linear)
                 and all(isinstance(b, BasicBlock) for b in model.stages))
    if not layers_ok:
        raise UnsupportedModel(model, "a ResNet built from layers other than torch's Conv, BatchNorm and Linear")
    stream, stage = "residual0", 0
    axes = {**_conv("stem.0.", stream, None, stem[0]), **_norm("stem.1.", stream, stem[1])}
    for b, block in enumerate(model.stages):
        if not (isinstance(block.conv1, _ConvNd) and isinstance(block.conv2, _ConvNd)
                and isinstance(block.bn1, _BatchNorm) and isinstance(block.bn2, _BatchNorm)):
            raise UnsupportedModel(model, "a BasicBlock built from layers other than torch's Conv and BatchNorm")
        prefix, inner, into = f"stages.{b}.", f"block{b}.inner", stream
        shortcut = list(block.shortcut.children())
        if shortcut:
            stage += 1
            stream = f"residual{stage}"
            axes.update(_conv(f"{prefix}shortcut.0.", stream, into, shortcut[0]))
            axes.update(_norm(f"{prefix}shortcut.1.", stream, shortcut[1]))
        axes.update(_conv(f"{prefix}conv1.", inner, into, block.conv1))
        axes.update(_norm(f"{prefix}bn1.", inner, block.bn1))
        axes.update(_conv(f"{prefix}conv2.", stream, inner, block.conv2))
        axes.update(_norm(f"{prefix}bn2.", stream, block.bn2))
    axes.update(_linear("head.", None, stream, model.head))
    return axes


def family_axes(model: nn.Module) -> dict[str, Axes]:
    """The hand-written axes of a model of the `mlp`, `resnet1d` or `resnet18` family."""
    if isinstance(model, MLP):
        return mlp_spec(model)
    if isinstance(model, ResNet):
        return resnet_spec(model)
    raise UnsupportedModel(model, "not of the mlp, resnet1d or resnet18 family, and no example input to trace it on")


def permutation_spec(model: nn.Module, example: torch.Tensor | None = None) -> PermutationSpec:
    """The permutation spec of `model`: hand-written for the `mlp`, `resnet1d` and `resnet18` families,
    traced on `example` (a batch of inputs) for any other model (`permutation_trace.traced_axes`);
    `UnsupportedModel` (a `SpecError` on "arch") where neither applies or the spec does not cover the
    state dict."""
    try:
        axes, folds = family_axes(model), {}
    except UnsupportedModel:
        if example is None:
            raise
        axes, folds = traced_axes(model, example)
    return spec_of(model, axes, folds)


def spec_of(model: nn.Module, axes: Mapping[str, Axes], folds: Mapping[tuple[str, int], tuple[int, int]]
            ) -> PermutationSpec:
    """The spec of `model` with these axes and folds, each permutation's size read from the state
    dict; `UnsupportedModel` where they do not cover it or disagree with its shapes."""
    state = model.state_dict()
    if set(axes) != set(state):
        missing = sorted(set(state) - set(axes))
        raise UnsupportedModel(model, f"state-dict entries outside the family's layout: {', '.join(missing[:5])}")
    sizes: dict[str, int] = {}
    for k, names in axes.items():
        if len(names) != state[k].dim():
            raise UnsupportedModel(model, f"{k} has {state[k].dim()} axes, the spec {len(names)}")
        for a, name in enumerate(names):
            if name is None:
                continue
            outer, inner = folds.get((k, a), (1, 1))
            units, rest = divmod(state[k].shape[a], outer * inner)
            if rest or sizes.setdefault(name, units) != units:
                raise UnsupportedModel(model, f"permutation {name} meets axes of {sizes.get(name)} units and "
                                              f"{state[k].shape[a]} / ({outer} x {inner}) entries")
    return PermutationSpec({k: axes[k] for k in state}, sizes, folds)


# --------------------------------------------------------------------------- permuting and matching
def permute(state: State, spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
            skip: tuple[str, int] | None = None) -> dict[str, torch.Tensor]:
    """`state` with every axis permuted by its permutation: out[key] = state[key].index_select(axis, perm)
    for each (key, axis) a permutation in `perms` acts on (except `skip`, a (permutation name, axis) pair
    left unpermuted); keys of `state` outside the spec are copied unchanged."""
    out = {}
    for k, tensor in state.items():
        for a, name in enumerate(spec.axes.get(k, ())):
            if name is not None and name in perms and (name, a) != skip:
                tensor = tensor.index_select(a, spread(perms[name], *spec.fold(k, a)).to(tensor.device))
        out[k] = tensor
    return out


def spread(perm: torch.Tensor, outer: int = 1, inner: int = 1) -> torch.Tensor:
    """The entries of an axis of outer x n x inner entries in the order `perm` puts its n units:
    index o * n * inner + perm[c] * inner + i at position o * n * inner + c * inner + i."""
    n = len(perm)
    return (torch.arange(outer)[:, None, None] * n * inner + perm[None, :, None] * inner
            + torch.arange(inner)[None, None, :]).flatten()


def _rows(tensor: torch.Tensor, axis: int, fold: tuple[int, int]) -> np.ndarray:
    """`tensor` as (units, rest) along `axis` (each unit's block of a folded axis in its row), in float64."""
    outer, inner = fold
    t = tensor.detach().movedim(axis, 0)
    return t.reshape(outer, -1, inner, *t.shape[1:]).movedim(1, 0).reshape(t.shape[0] // (outer * inner), -1) \
        .double().cpu().numpy()


def _cost(name: str, params_a: State, params_b: State, spec: PermutationSpec,
          perms: Mapping[str, torch.Tensor]) -> np.ndarray:
    """C[i, j] = sum over the (key, axis) permutation `name` acts on of <A_k[i], B~_k[j]>, B~ with every
    other permutation (and `name` on the other axes of the same tensor, if any) applied."""
    n = spec.sizes[name]
    cost = np.zeros((n, n))
    for k, a in spec.acting(name):
        if k not in params_a:
            continue
        b = permute({k: params_b[k]}, spec, perms, skip=(name, a))[k]
        cost += _rows(params_a[k], a, spec.fold(k, a)) @ _rows(b, a, spec.fold(k, a)).T
    return cost


@dataclass(frozen=True)
class Matching:
    """The permutations found (`perms[name]`: a LongTensor, B'[.., i, ..] = B[.., perms[name][i], ..]),
    the sweeps run, whether the last sweep changed nothing, and the final objective."""

    perms: dict[str, torch.Tensor]
    sweeps: int
    converged: bool
    objective: float


def objective(params_a: State, params_b: State) -> float:
    """sum_k <A_k, B_k>_F over the keys of `params_a`, in float64."""
    return float(sum((params_a[k].detach().double() * params_b[k].detach().double()).sum() for k in params_a))


def weight_matching(params_a: State, params_b: State, spec: PermutationSpec, generator: torch.Generator,
                    max_sweeps: int = 100) -> Matching:
    """The permutations of B's units that align `params_b` to `params_a` by coordinate descent over the
    linear assignment problems of the module docstring, starting at the identity. `params_*` are the
    state-dict entries that enter the objective (e.g. the trainable parameters); `generator` draws each
    sweep's order of the permutations."""
    names = sorted(spec.sizes)
    perms = {name: torch.arange(spec.sizes[name]) for name in names}
    for sweep in range(1, max_sweeps + 1):
        changed = False
        for i in torch.randperm(len(names), generator=generator).tolist():
            name = names[i]
            cost = _cost(name, params_a, params_b, spec, perms)
            rows, cols = linear_sum_assignment(cost, maximize=True)
            old = float(cost[np.arange(len(cost)), perms[name].numpy()].sum())
            new = float(cost[rows, cols].sum())
            if new - old > IMPROVEMENT_TOLERANCE * max(1.0, abs(old)):
                perms[name] = torch.as_tensor(cols, dtype=torch.long)
                changed = True
        if not changed:
            break
    final = objective(params_a, permute(params_b, spec, perms))
    return Matching(perms, sweep, not changed, final)


def align(model_a: nn.Module, model_b: nn.Module, generator: torch.Generator, max_sweeps: int = 100,
          example: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], Matching]:
    """(B's state dict permuted to align with A, the matching): weight matching on the trainable
    parameters, the permutation then applied to every entry of B's state dict (weights, biases,
    BatchNorm weights, biases and running statistics). `example`, a batch of inputs, traces the
    spec of a model outside the families."""
    spec = permutation_spec(model_a, example)
    if permutation_spec(model_b, example) != spec:
        raise ValueError("the two models have different layouts (parameter names or shapes)")
    trainable = [n for n, p in model_a.named_parameters() if p.requires_grad]
    params_a = {n: p.detach() for n, p in model_a.named_parameters() if n in trainable}
    params_b = {n: p.detach() for n, p in model_b.named_parameters() if n in trainable}
    matching = weight_matching(params_a, params_b, spec, generator, max_sweeps)
    state_b = {k: v.detach().clone() for k, v in model_b.state_dict().items()}
    return permute(state_b, spec, matching.perms), matching
