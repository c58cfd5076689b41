"""Permutation groups traced from a model's forward: which hidden units may be permuted together
without changing the function the model computes (the spec weight matching needs,
`numerics.weight_matching`).

A group is a set of n channels (hidden units) that one permutation pi of 0..n-1 must reorder
wherever they are indexed: the rows of the layer that computes them, the columns of every layer that
reads them, the per-channel parameters and statistics of the norms between. The forward runs once on
an example batch (eval mode, no gradient) under a torch function mode that sees every torch
function, tensor method and operator it calls (Python control flow and plain submodules need no
symbolic tracing), and records for each tensor computed the axis that holds the channels of a group,
if any. The rules, each an identity f(pi x) = pi' f(x) of the operation:

- `linear` (on the last axis) and `conv1d/2d/3d` (axis 1) whose weight is a tensor of the model's
  state start a group of their output channels (the weight's rows, the bias); the weight's columns
  belong to the input's group. A depthwise convolution (groups = input = output channels) keeps
  its input's group instead; another grouped convolution of a permuted input is refused.
- `batch_norm` (axis 1), `layer_norm` and `rms_norm` normalise with statistics symmetric in the
  channels: their weight, bias and running statistics belong to the input's group, which the output keeps.
- elementwise operations (activations, dropout, softmax on any axis, arithmetic) keep their
  operands' groups. Two operands permuted along the same axis (a residual addition, a gate) tie
  their groups into one permutation; an operand that is not permuted along that axis but varies
  along it (the input, a constant, a parameter read directly) fixes the group: it is never permuted.
- pooling and padding of the positions keep the groups; a reduction (mean, sum, amax, amin) over
  other axes keeps them, over the channel axis removes them (a sum over all units is unchanged by pi).
- `flatten`, `view`, `reshape`, `squeeze`, `unsqueeze`, `unflatten` keep the elements' order: an
  axis of outer x n x inner entries (channel c at o n inner + c inner + i) goes to the one output
  axis holding whole channel blocks, folded anew (the head of a flattened feature map reads channel
  c in columns c inner .. c inner + inner - 1); `transpose`, `permute` and `t` move the axis.
- the model's outputs fix their groups: the logits are never permuted.

Any other operation on a tensor with a permuted axis, or a reshape that splits channels across
axes, is refused (`UnsupportedModel`, naming the operation and the module calling it); operations
on tensors without one (the input's preprocessing, shape queries) are free. By induction over the
trace, permuting every group's units on the (state entry, axis) pairs recorded leaves each
intermediate tensor the original one permuted along its channel axis, and the outputs unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from phasediagram.errors import SpecError

FIXED = 0  # the group of channels that must not move (the input's, the logits')

ELEMENTWISE = {
    "relu", "relu_", "relu6", "gelu", "silu", "elu", "selu", "celu", "leaky_relu", "softplus", "mish",
    "hardtanh", "hardswish", "hardsigmoid", "tanh", "sigmoid", "exp", "abs", "sqrt", "square", "neg",
    "dropout", "softmax", "log_softmax", "contiguous", "clone", "detach", "float", "double", "to",
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "clamp",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__pow__", "__neg__", "__pos__",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "logsumexp"}
RESHAPES = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten"}
MOVES = {"transpose", "swapaxes", "swapdims", "permute", "t"}
POOLS = {f"{kind}_pool{d}d": d for kind in ("max", "avg", "adaptive_avg", "adaptive_max", "lp") for d in (1, 2, 3)}
QUERIES = {"size", "dim", "numel", "nelement", "ndimension", "is_floating_point", "is_contiguous", "__len__", "stride",
           "element_size", "get_device"}  # methods returning metadata (as every attribute read does)


class UnsupportedModel(SpecError):
    """A model whose permutation groups cannot be known (an operation the tracer does not handle)."""

    def __init__(self, model: nn.Module, why: str):
        cls = type(model)
        super().__init__("arch", f"weight matching cannot tell which units of {cls.__module__}.{cls.__qualname__} "
                                 f"may be permuted: {why}")


@dataclass(frozen=True)
class Channels:
    """Axis `axis` of a tensor holds outer x n x inner entries, channel c of group `group` at
    o n inner + c inner + i."""

    axis: int
    group: int
    outer: int = 1
    inner: int = 1

    def at(self, axis: int, group: int | None = None) -> "Channels":
        return Channels(axis, self.group if group is None else group, self.outer, self.inner)


def _name(func: Callable) -> str:
    """The operation's name: `relu` for torch.relu, F.relu and Tensor.relu; `shape` for the property."""
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.lstrip("_") if name.startswith("_") and not name.endswith("__") else name


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in `obj` and the tuples, lists and dicts it holds."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for item in items for t in _tensors(item)]


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _axes(dims: Any, ndim: int) -> tuple[int, ...]:
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return tuple(int(d) % ndim for d in dims)


class _Recorder(TorchFunctionMode):
    """The torch function mode that runs the rules of the module docstring while the forward runs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.keys: dict[int, list[str]] = {}
        for k, t in model.state_dict(keep_vars=True).items():
            self.keys.setdefault(id(t), []).append(k)
        self.parent, self.size, self.label = [FIXED], [0], [""]
        self.of: dict[int, Channels] = {}  # id(tensor) -> where its channels are
        self.seen: list[torch.Tensor] = []  # every tensor recorded, kept alive so that ids stay unique
        self.bound: dict[tuple[str, int], Channels] = {}  # (state key, axis) -> its group and fold
        self.started: dict[str, int] = {}  # the group a layer's output channels start (one, however often called)
        self.calls: list[str] = []  # the modules running, innermost last

    # ----------------------------------------------------------------- groups
    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = g = self.parent[self.parent[g]]
        return g

    def union(self, g: int, h: int) -> int:
        g, h = sorted((self.find(g), self.find(h)))
        if g != h:
            if g != FIXED and self.size[g] != self.size[h]:
                self.refuse(f"ties groups of {self.size[g]} and {self.size[h]} channels")
            self.parent[h] = g
        return g

    def channels(self, t: Any) -> Channels | None:
        ch = self.of.get(id(t)) if isinstance(t, torch.Tensor) else None
        return None if ch is None or self.find(ch.group) == FIXED else ch

    def bind(self, t: torch.Tensor, axis: int, ch: Channels | None) -> None:
        ch = Channels(axis, FIXED) if ch is None else ch.at(axis)
        for k in self.keys[id(t)]:
            old = self.bound.setdefault((k, axis), ch)
            if (old.outer, old.inner) != (ch.outer, ch.inner):
                self.refuse(f"{k} is read along axis {axis} in two layouts")
            self.union(old.group, ch.group)

    def start(self, label: str, size: int) -> int:
        """The group of the `size` output channels of the layer `label` (created at its first call)."""
        if label not in self.started:
            self.started[label] = len(self.parent)
            self.parent.append(len(self.parent))
            self.size.append(size)
            self.label.append(label)
        return self.started[label]

    def state(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.keys

    def refuse(self, why: str):
        where = next((n for n in reversed(self.calls) if n), "")
        module = dict(self.model.named_modules())[where]
        raise UnsupportedModel(self.model, f"{why}, in {f'module {where!r}' if where else 'the forward'} "
                                           f"({type(module).__name__})")

    def entering(self, name: str) -> Callable:
        def hook(module, inputs) -> None:
            self.calls.append(name)
        return hook

    def leaving(self, module, inputs, output) -> None:
        self.calls.pop()

    # ----------------------------------------------------------------- the rules
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        operands = _tensors((args, kwargs))
        permuted = [t for t in operands if self.channels(t) is not None]
        if name == "linear" or name in ("conv1d", "conv2d", "conv3d"):
            ch = self.affine(name, args, kwargs, out, permuted)
        elif name in ("batch_norm", "layer_norm", "rms_norm"):
            ch = self.norm(name, args, kwargs, permuted)
        elif not permuted:
            ch = None
        elif not isinstance(out, torch.Tensor):
            if name not in QUERIES and getattr(func, "__name__", "") != "__get__":  # attributes: metadata
                self.refuse(f"{name} of a tensor with permutable channels (not traced)")
            return out
        elif name in ELEMENTWISE:
            ch = self.elementwise(operands, out)
        elif name not in REDUCTIONS | RESHAPES | MOVES | POOLS.keys() | {"pad"}:
            ch = self.refuse(f"{name} of a tensor with permutable channels (not traced)")
        elif len(permuted) > 1 or not args or permuted[0] is not args[0]:
            ch = self.refuse(f"{name} with permutable channels in an operand other than the first")
        elif name in REDUCTIONS:
            ch = self.reduced(args[0], _arg(args, kwargs, 1, "dim"), out)
        elif name in RESHAPES:
            ch = self.reshaped(args[0], out)
        elif name in MOVES:
            ch = self.moved(name, args, kwargs)
        else:  # pooling or padding of the last axes
            x, ch = args[0], self.channels(args[0])
            last = POOLS[name] if name in POOLS else len(_arg(args, kwargs, 1, "pad")) // 2
            if ch.axis >= x.dim() - last:
                self.refuse(f"{name} over the channel axis")
        self.record(out, ch)
        return out

    def record(self, t: Any, ch: Channels | None) -> None:
        if isinstance(t, torch.Tensor):
            self.seen.append(t)
            if ch is None:
                self.of.pop(id(t), None)
            else:
                self.of[id(t)] = ch.at(ch.axis, self.find(ch.group))

    def affine(self, name, args, kwargs, out, permuted) -> Channels | None:
        """`linear`/`conv`: a new group on the output channels (or the input's, for a depthwise convolution)."""
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        if not self.state(w) or (b is not None and not self.state(b)):
            return self.refuse(f"{name} with a weight computed in the forward") if permuted else None
        ch = self.channels(x)
        axis = x.dim() - 1 if name == "linear" else 1
        if ch is not None and (ch.axis != axis or (name != "linear" and (ch.outer, ch.inner) != (1, 1))):
            self.refuse(f"{name} on an axis other than the one holding the channels")
        groups = int(_arg(args, kwargs, 6, "groups", 1)) if name != "linear" else 1
        if ch is not None and groups != 1:
            if not groups == x.shape[1] == w.shape[0]:
                self.refuse(f"{name} with {groups} groups of permutable channels")
            group = ch.group  # depthwise: output channel c reads input channel c only
            self.bind(w, 1, None)
        else:
            self.bind(w, 1, ch)
            group = self.start(self.keys[id(w)][0].removesuffix(".weight"), w.shape[0])
        out_channels = Channels(out.dim() - 1 if name == "linear" else 1, group)
        self.bind(w, 0, out_channels)
        if b is not None:
            self.bind(b, 0, out_channels)
        return out_channels

    def norm(self, name, args, kwargs, permuted) -> Channels | None:
        """`batch_norm`, `layer_norm`, `rms_norm`: per-channel tensors join the input's group."""
        x, ch = args[0], self.channels(args[0])
        if name == "batch_norm":
            per_channel = [_arg(args, kwargs, i, n) for i, n in ((1, "running_mean"), (2, "running_var"),
                                                                 (3, "weight"), (4, "bias"))]
            if ch is not None and (ch.axis != 1 or (ch.outer, ch.inner) != (1, 1)):
                self.refuse("batch_norm with the channels on an axis other than 1")
            axis = 0
        else:
            shape = _arg(args, kwargs, 1, "normalized_shape")
            per_channel = [_arg(args, kwargs, 2, "weight")] + ([_arg(args, kwargs, 3, "bias")] if name == "layer_norm"
                                                               else [])
            axis = -1 if ch is None else ch.axis - (x.dim() - len(tuple(shape)))
        for t in (t for t in per_channel if t is not None):
            if not self.state(t):
                if permuted:
                    self.refuse(f"{name} with a weight computed in the forward")
            elif axis >= 0:
                self.bind(t, axis, ch)
        return ch

    def elementwise(self, operands: list[torch.Tensor], out: torch.Tensor) -> Channels:
        """One group for the operands permuted along an axis; fixed if another operand varies along it."""
        found: Channels | None = None
        for t in operands:
            ch = self.channels(t)
            if ch is None:
                continue
            axis = ch.axis + out.dim() - t.dim()
            if t.shape[ch.axis] != out.shape[axis]:
                self.refuse("an elementwise operation broadcasting permutable channels")
            if found is None:
                found = ch.at(axis)
            elif (found.axis, found.outer, found.inner) != (axis, ch.outer, ch.inner):
                self.refuse("an elementwise operation of tensors permuted along different axes")
            else:
                found = found.at(axis, self.union(found.group, ch.group))
        for t in operands:
            axis = found.axis - (out.dim() - t.dim())
            if self.channels(t) is None and axis >= 0 and t.shape[axis] != 1:
                found = found.at(found.axis, self.union(found.group, FIXED))
        return found

    def reduced(self, x: torch.Tensor, dims: Any, out: torch.Tensor) -> Channels | None:
        ch = self.channels(x)
        axes = _axes(dims, x.dim()) if dims not in (None, (), []) else tuple(range(x.dim()))
        if ch.axis in axes:
            return None
        return ch.at(ch.axis if out.dim() == x.dim() else ch.axis - sum(a < ch.axis for a in axes))

    def reshaped(self, x: torch.Tensor, out: torch.Tensor) -> Channels:
        """The output axis holding whole blocks of n x inner entries (elements in the same order)."""
        ch = self.channels(x)
        units = x.shape[ch.axis] // (ch.outer * ch.inner)
        stride = ch.inner * math.prod(x.shape[ch.axis + 1:])  # entries between consecutive channels
        suffix = 1
        for axis in reversed(range(out.dim())):
            span = suffix * out.shape[axis]
            if stride % suffix == 0 and span % (units * stride) == 0:
                return Channels(axis, ch.group, span // (units * stride), stride // suffix)
            suffix = span
        return self.refuse("a reshape splitting permutable channels across axes")

    def moved(self, name: str, args: tuple, kwargs: dict) -> Channels:
        x, ch = args[0], self.channels(args[0])
        order = list(range(x.dim()))
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs["dims"]
            order = list(_axes(dims, x.dim()))
        elif name == "t":
            order.reverse()
        else:
            a, b = _axes((_arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1")), x.dim())
            order[a], order[b] = order[b], order[a]
        return ch.at(order.index(ch.axis))


def traced_axes(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, tuple[str | None, ...]],
                                                                   dict[tuple[str, int], tuple[int, int]]]:
    """(axes, folds) of `model` traced on `example` (a batch of inputs): `axes[key]` names the group
    acting on each axis of state entry `key` (None: not permuted), groups named after the layer that
    starts them; `folds[(key, axis)] = (outer, inner)` for an axis holding outer x n x inner entries.
    `UnsupportedModel` for an operation outside the rules of the module docstring."""
    recorder = _Recorder(model)
    hooks = [h for name, m in model.named_modules()
             for h in (m.register_forward_pre_hook(recorder.entering(name)), m.register_forward_hook(recorder.leaving))]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), recorder:
            out = model(example)
    except SpecError:
        raise
    except Exception as exc:  # the model's own forward may raise anything
        raise UnsupportedModel(model, f"its forward on an example batch raised {type(exc).__name__}: {exc}") from None
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    for t in _tensors(out):
        ch = recorder.channels(t)
        if ch is not None:
            recorder.union(ch.group, FIXED)
    axes, folds = {}, {}
    for k, t in model.state_dict().items():
        names = []
        for a in range(t.dim()):
            ch = recorder.bound.get((k, a))
            group = FIXED if ch is None else recorder.find(ch.group)
            names.append(recorder.label[group] if group != FIXED else None)
            if group != FIXED and (ch.outer, ch.inner) != (1, 1):
                folds[(k, a)] = (ch.outer, ch.inner)
        axes[k] = tuple(names)
    return axes, folds
