"""Ensembles: S independent members of one architecture held, and run, as one model.

An ensemble of S members maps x of shape (S, B, *input_shape) (member s sees its own batch
x[s]) to logits of shape (S, B, n_classes), with logits[s] = f(x[s]; theta_s) exactly the
forward of the ordinary model holding theta_s. No operation mixes members, so the gradient of
sum_s L_s(theta_s) with respect to theta_s is the gradient of L_s alone, and one elementwise
optimizer (SGD with momentum and weight decay) over the stacked parameters is S independent
optimizers. Small models on a CPU are bound by per-operation overhead, so one call on S-times
larger tensors costs far less than S calls.

Layers, and how member s's parameters sit in the stacked tensors:

- `EnsembleLinear`: y[s] = x[s] W_s^T + b_s as one batched matmul (`torch.baddbmm`);
  weight (S, out, in), bias (S, out): the member's tensor is slice [s] ("stack" layout).
- `MemberMajorConv1d` (1D, the default): activations (1, S*C, L, B), member s on channels
  [s*C, (s+1)*C); the convolution as batched matmuls over members (shifted column ranges for
  kernel 3, stride 1; im2col otherwise). `EnsembleConv`
  (2D, or on request in 1D): a grouped convolution with S groups on activations
  (B, S*C, *spatial). Both hold weight (S*C_out, C_in, *k) with member s in rows
  [s*C_out, (s+1)*C_out) ("cat" layout). On a CPU the grouped convolution is slower than S separate
  convolutions (bench/bench_ensemble.py, `--conv`), hence the bmm form.
- BatchNorm over S*C channels: its per-channel batch statistics (over B and the positions) are
  exactly member s's statistics on its own batch; weight, bias and running statistics in "cat"
  layout; `num_batches_tracked` is one scalar for all members ("shared" layout).

The layout of every entry follows from its shape in the ensemble versus the ordinary model
(one more leading axis: stack; the same rank, first axis S times longer: cat; a scalar: shared),
so the state dicts of S ordinary models stack into the ensemble's and split back exactly.
The ensemble modules keep the ordinary modules' names, so the keys agree one to one.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.accel import batch_norm
from phasediagram.models import families as models


class EnsembleLinear(nn.Module):
    """S linear maps applied to S batches: y[s] = x[s] @ weight[s]^T + bias[s].

    Shapes: x (S, B, in) -> y (S, B, out); weight (S, out, in); bias (S, out).
    Parameters start uninitialised: an ensemble is filled from its members' state dicts.
    """

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.unsqueeze(1), x, w)

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


class EnsembleConv(nn.Module):
    """S convolutions as one grouped convolution: member s maps input channels [s*C_in, (s+1)*C_in)
    to output channels [s*C_out, (s+1)*C_out) with its own kernel.

    Shapes: x (B, S*C_in, *spatial) -> (B, S*C_out, *spatial'); weight (S*C_out, C_in, *kernel).
    """

    def __init__(self, members: int, dims: int, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.members, self.dims, self.stride, self.padding = members, dims, stride, padding
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(members * out_channels, in_channels, *([kernel_size] * dims)))
        self.bias = nn.Parameter(torch.empty(members * out_channels)) if bias else None
        self._conv = F.conv1d if dims == 1 else F.conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight, self.bias, self.stride, self.padding, 1, self.members)

    def extra_repr(self) -> str:
        return (f"members={self.members}, dims={self.dims}, {self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.weight.shape[2:]}, stride={self.stride}, padding={self.padding}")


class _ThreeTaps(torch.autograd.Function):
    """out[s] = W_0[s] x[s]^(-d) + W_1[s] x[s] + W_2[s] x[s]^(+d) for x (S, C, N), W_j (S, O, C), where
    x^(+-d)[:, t] = x[:, t +- d] (zero outside 0..N-1): a 3-tap convolution of x along positions
    d columns apart, with zero padding. With activations laid out (C, L, B) and d = B, columns
    t = l * B + b and t + d = (l + 1) * B + b, so this is a kernel-3, stride-1, padding-1 conv1d.

    Forward: one bmm and two `baddbmm_` into column ranges of the output (no padded or im2col copy
    of x). Backward: dL/dx is the same operation on g = dL/dout with taps (W_2^T, W_1^T, W_0^T),
    and (dL/dW_0, dL/dW_1, dL/dW_2) = `_TapGradients`(g, x) = (g^(+d) x^T, g x^T, g^(-d) x^T).
    Both are Functions whose backward is made of the two, so every derivative order stays in
    batched matmuls on column ranges (no zero-filled, activation-sized slice gradients).
    """

    @staticmethod
    def forward(ctx, x, w0, w1, w2, d: int):
        ctx.save_for_backward(x, w0, w1, w2)
        ctx.d = d
        out = torch.bmm(w1, x)
        if d < x.shape[-1]:
            out[:, :, d:].baddbmm_(w0, x[:, :, :-d])
            out[:, :, :-d].baddbmm_(w2, x[:, :, d:])
        return out

    @staticmethod
    def backward(ctx, g):
        x, w0, w1, w2 = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _ThreeTaps.apply(g, w2.transpose(1, 2), w1.transpose(1, 2), w0.transpose(1, 2), ctx.d)
        return (grad_x, *_TapGradients.apply(g, x, ctx.d), None)


class _TapGradients(torch.autograd.Function):
    """(G_0, G_1, G_2) = (g^(+d) x^T, g x^T, g^(-d) x^T) for g (S, O, N), x (S, C, N): the gradients of
    `_ThreeTaps`' taps, i.e. G_0 = g[:, d:] x[:, :-d]^T, G_1 = g x^T, G_2 = g[:, :-d] x[:, d:]^T
    (zero when d >= N). Backward: dL/dg = `_ThreeTaps`(x; dG_0, dG_1, dG_2) and
    dL/dx = `_ThreeTaps`(g; dG_2^T, dG_1^T, dG_0^T)."""

    @staticmethod
    def forward(ctx, g, x, d: int):
        ctx.save_for_backward(g, x)
        ctx.d = d
        g1 = torch.bmm(g, x.transpose(1, 2))
        if d >= x.shape[-1]:
            return torch.zeros_like(g1), g1, torch.zeros_like(g1)
        return (torch.bmm(g[:, :, d:], x[:, :, :-d].transpose(1, 2)), g1,
                torch.bmm(g[:, :, :-d], x[:, :, d:].transpose(1, 2)))

    @staticmethod
    def backward(ctx, dg0, dg1, dg2):
        g, x = ctx.saved_tensors  # (autograd passes zeros for outputs without a gradient)
        grad_g = _ThreeTaps.apply(x, dg0, dg1, dg2, ctx.d) if ctx.needs_input_grad[0] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = _ThreeTaps.apply(g, dg2.transpose(1, 2), dg1.transpose(1, 2), dg0.transpose(1, 2), ctx.d)
        return grad_g, grad_x, None


class MemberMajorConv1d(nn.Module):
    """S 1D convolutions on member-major activations (1, S*C, L, B): member s on channels
    [s*C, (s+1)*C), each channel holding its (L, B) positions x batch, the batch innermost.
    Weight (S*C_out, C_in, k), the layout of `EnsembleConv`.

    out[s, o, t, b] = sum_{c, j} W[s, o, c, j] x_p[s, c, stride * t + j, b] with x_p zero-padded
    by p at both ends of L (cross-correlation, as torch's conv1d). Kernel 3, stride 1, padding 1
    (most of a ResNet's convolutions): `_ThreeTaps`, three batched matmuls on column ranges of
    x viewed as (S, C, L*B), no copy of x. Otherwise im2col + one `torch.bmm`:
    cols[s, (c, j), (t, b)] = x_p[s, c, stride * t + j, b], out[s] = W[s] @ cols[s] (autograd
    differentiates the pad, the strided slices, the stack and bmm).
    Why this layout: on a CPU grouped convolutions are slow, a BatchNorm2d over the S*C channels of
    (1, S*C, L, B) gives each member's per-channel statistics over (L, B) directly, and with the
    batch innermost a shift by one position is a shift by B whole columns.
    """

    def __init__(self, members: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False):
        super().__init__()
        if bias:
            raise ValueError("MemberMajorConv1d has no bias (the ResNets use bias-free convolutions)")
        self.members, self.stride, self.padding = members, stride, padding
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(members * out_channels, in_channels, kernel_size))
        self._norm: tuple[FoldableBatchNorm2d, ...] = ()  # the BatchNorm after it, folded in eval mode

    def fold(self, norm: FoldableBatchNorm2d) -> None:
        """Fold `norm`, the BatchNorm applied to this convolution's output, into it whenever `norm` is an
        affine map (eval mode): conv then BN is the convolution with weight a * W plus the shift c."""
        self._norm = (norm,)
        norm.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, c, k, p = self.members, self.in_channels, self.kernel_size, self.padding
        _, _, length, b = x.shape
        w, shift = self.weight, None
        if self._norm and self._norm[0].is_affine():
            a, shift = self._norm[0].scale_shift()
            w, shift = w * a.view(-1, 1, 1), shift.view(s, self.out_channels, 1)
        w = w.view(s, self.out_channels, c, k)
        if k == 3 and p == 1 and self.stride == 1:  # taps as contiguous (S, C_out, C_in) matrices
            out = _ThreeTaps.apply(x.reshape(s, c, length * b), *w.permute(3, 0, 1, 2).contiguous(), b)
            l_out = length
        else:
            x = x.view(s, c, length, b)
            if p:
                x = F.pad(x, (0, 0, p, p))
            l_out = (length + 2 * p - k) // self.stride + 1
            span = self.stride * (l_out - 1) + 1
            cols = torch.stack([x[:, :, j:j + span:self.stride] for j in range(k)], dim=2).view(s, c * k, l_out * b)
            out = torch.bmm(w.reshape(s, self.out_channels, c * k), cols)
        if shift is not None:
            out = out + shift
        return out.view(1, s * self.out_channels, l_out, b)

    def extra_repr(self) -> str:
        return (f"members={self.members}, {self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.weight.shape[-1]}, stride={self.stride}, padding={self.padding}")


class FoldableBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that can be folded into the convolution before it (`MemberMajorConv1d.fold`).

    In eval mode with running statistics it is the affine map y = a x + c per channel, with
    a = weight / sqrt(running_var + eps) and c = bias - running_mean * a; folded, the
    convolution applies it (weights a * W, plus c) and this module passes its input through.
    Same values; but differentiating twice (Hessian-vector products) then meets no activation-sized
    batch-norm operations, only weight-sized ones (bench/bench_metrics_batched.py, section 4).
    Training mode (batch statistics): `batch_norm.train_forward` on member-major (1, S*C, L, B)
    activations (the statistics from sums; same values and running-statistics update as torch's
    BatchNorm2d, faster), torch's BatchNorm2d on anything else.
    """

    folded = False

    def is_affine(self) -> bool:
        return not self.training and self.track_running_stats and self.affine

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, c) of the eval-mode map y = a x + c, per channel."""
        a = self.weight * torch.rsqrt(self.running_var + self.eps)
        return a, self.bias - self.running_mean * a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded and self.is_affine():
            return x
        if batch_norm.applies(self, x):
            return batch_norm.train_forward(self, x)
        return super().forward(x)


def _batch_norm(dims: int, members: int, channels: int) -> nn.Module:
    """One BatchNorm over members * channels channels = per-member, per-channel statistics
    (BatchNorm2d for member-major 1D activations (1, S*C, L, B): statistics over (L, B))."""
    return (nn.BatchNorm1d if dims == 1 else FoldableBatchNorm2d)(members * channels)


class EnsembleMLP(models.MLP):
    """S copies of `models.MLP`: the same definition built from `EnsembleLinear` layers (same module
    names), (S, B, *input_shape) -> (S, B, n_classes)."""

    def __init__(self, members: int, width: int, input_shape: tuple[int, ...], n_classes: int, depth: int = 2):
        super().__init__(width, input_shape, n_classes, depth, linear=functools.partial(EnsembleLinear, members),
                         flatten=nn.Flatten(2))
        self.members = members


class EnsembleResNet(models.ResNet):
    """S copies of `models.ResNet`: the same definition built from ensemble convolutions, S*C-channel
    BatchNorm and an `EnsembleLinear` head (same module names): (S, B, *input_shape) -> (S, B, n_classes).

    conv "bmm" (1D only): member-major activations (1, S*C, L, B), convolutions as batched matmuls
    (`MemberMajorConv1d`), BatchNorm2d over S*C channels. conv "grouped": activations
    (B, S*C, *spatial), grouped convolutions (`EnsembleConv`), BatchNorm over S*C channels.
    Either way the pooled features are regrouped to (S, B, C) for the batched linear head.
    """

    def __init__(self, members: int, dims: int, width: int, in_channels: int, n_classes: int,
                 blocks: tuple[int, ...], conv: str = "auto"):
        if conv == "auto":
            conv = "bmm" if dims == 1 else "grouped"
        if conv not in ("bmm", "grouped") or (conv == "bmm" and dims != 1):
            raise ValueError(f"conv must be 'grouped' or (for 1D) 'bmm', got {conv!r} for dims={dims}")
        member_major = conv == "bmm"
        if member_major:
            conv_layer = functools.partial(MemberMajorConv1d, members)
            norm = functools.partial(_batch_norm, 2, members)
        else:
            conv_layer = functools.partial(EnsembleConv, members, dims)
            norm = functools.partial(_batch_norm, dims, members)
        super().__init__(dims, width, in_channels, n_classes, blocks, conv=conv_layer, norm=norm,
                         linear=functools.partial(EnsembleLinear, members))
        self.members, self.in_channels, self.member_major = members, in_channels, member_major
        if self.member_major:  # every convolution is followed by its BatchNorm
            pairs = [(self.stem[0], self.stem[1])]
            for block in self.stages:
                pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2)]
                if len(block.shortcut):
                    pairs.append((block.shortcut[0], block.shortcut[1]))
            for conv_module, norm_module in pairs:
                conv_module.fold(norm_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b = x.shape[0], x.shape[1]
        if self.dims == 1 and x.dim() == 3:  # (S, B, L): one input channel
            x = x.unsqueeze(2)
        if self.member_major:  # (S, B, C, L) -> (1, S*C, L, B)
            x = x.permute(0, 2, 3, 1).reshape(1, s * self.in_channels, x.shape[-1], b)
            out = self.stages(self.stem(x))
            feats = out.view(s, -1, out.shape[2], b).mean(2).transpose(1, 2)
        else:  # (S, B, C, *spatial) -> (B, S*C, *spatial)
            x = x.transpose(0, 1).reshape(b, s * self.in_channels, *x.shape[3:])
            out = self.stages(self.stem(x)).flatten(2).mean(-1)
            feats = out.view(b, s, -1).transpose(0, 1)
        return self.head(feats)


ARCHS = ("mlp", "resnet1d", "resnet18")  # the registered architectures with an ensemble form


def supports(arch: str) -> bool:
    """Whether `arch` has an ensemble form."""
    return arch in ARCHS


def is_ensemble(model: nn.Module) -> bool:
    """Whether `model` is an ensemble (of this module's classes)."""
    return isinstance(model, (EnsembleMLP, EnsembleResNet))


def has_form(model: nn.Module) -> bool:
    """Whether `model` (an ordinary model, not an ensemble) has an ensemble form (`like` can build one)."""
    return isinstance(model, (models.MLP, models.ResNet)) and not is_ensemble(model)


def like(model: nn.Module, members: int, conv: str = "auto") -> nn.Module:
    """An uninitialised ensemble of `members` models shaped like `model` (sizes read off its layers);
    `conv` picks the ResNet convolution ("auto": "bmm" for 1D, "grouped" for 2D)."""
    if is_ensemble(model):
        raise KeyError(f"{type(model).__name__} is already an ensemble")
    if isinstance(model, models.MLP):
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        return EnsembleMLP(members, linears[0].out_features, (linears[0].in_features,), linears[-1].out_features,
                           depth=len(linears) - 1)
    if isinstance(model, models.ResNet):
        stem = model.stem[0]
        return EnsembleResNet(members, model.dims, stem.out_channels, stem.in_channels, model.head.out_features,
                              _blocks_per_stage(model), conv=conv)
    raise KeyError(f"{type(model).__name__} has no ensemble form; ensembles exist for {', '.join(ARCHS)}")


def _blocks_per_stage(model: nn.Module) -> tuple[int, ...]:
    """Blocks per stage of a `models.ResNet`: a new stage starts where the channel count changes."""
    counts: list[int] = []
    channels = None
    for block in model.stages:
        if block.conv1.out_channels != channels:
            counts.append(0)
            channels = block.conv1.out_channels
        counts[-1] += 1
    return tuple(counts)


# ------------------------------------------------------------------ stacking and splitting
def layout_of(ensemble_shape: Sequence[int], member_shape: Sequence[int], members: int) -> str:
    """How S member tensors of `member_shape` sit in one ensemble tensor of `ensemble_shape`:
    "stack" (a new leading member axis), "cat" (concatenated along axis 0) or "shared" (a scalar)."""
    e, m = tuple(ensemble_shape), tuple(member_shape)
    if e == (members, *m):
        return "stack"
    if m and len(e) == len(m) and e[0] == members * m[0] and e[1:] == m[1:]:
        return "cat"
    if e == m == ():
        return "shared"
    raise ValueError(f"ensemble shape {e} is no layout of {members} members of shape {m}")


def stack_tensors(tensors: Sequence[torch.Tensor], layout: str) -> torch.Tensor:
    """The ensemble tensor holding `tensors` (one per member) in `layout`."""
    if layout == "stack":
        return torch.stack(list(tensors))
    if layout == "cat":
        return torch.cat(list(tensors))
    first = tensors[0]
    if any(not torch.equal(t, first) for t in tensors[1:]):
        raise ValueError("a shared entry (e.g. BatchNorm num_batches_tracked) differs between members")
    return first.clone()


def split_tensor(tensor: torch.Tensor, layout: str, members: int) -> list[torch.Tensor]:
    """Inverse of `stack_tensors`: the S member tensors (copies, not views)."""
    if layout == "stack":
        return [t.clone() for t in tensor.unbind(0)]
    if layout == "cat":
        return [t.clone() for t in tensor.chunk(members, 0)]
    return [tensor.clone() for _ in range(members)]


def stack_state_dicts(state_dicts: Sequence[dict], ensemble: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `ensemble` holding the S ordinary `state_dicts` (same keys, member order)."""
    target = ensemble.state_dict()
    members = len(state_dicts)
    for sd in state_dicts:
        if set(sd) != set(target):
            raise KeyError(f"member keys {sorted(set(sd) ^ set(target))} do not match the ensemble's")
    return {k: stack_tensors([sd[k] for sd in state_dicts], layout_of(v.shape, state_dicts[0][k].shape, members))
            for k, v in target.items()}


def split_state_dict(state: dict[str, torch.Tensor], template: dict[str, torch.Tensor], members: int
                     ) -> list[dict[str, torch.Tensor]]:
    """Inverse of `stack_state_dicts`: S ordinary state dicts, shaped like `template` (one member's)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(members)]
    for k, ref in template.items():
        for sd, t in zip(out, split_tensor(state[k], layout_of(state[k].shape, ref.shape, members), members)):
            sd[k] = t
    return out


def from_models(member_models: Sequence[nn.Module], conv: str = "auto") -> nn.Module:
    """An ensemble holding copies of `member_models` (ordinary models of one arch and width), on their
    device and dtype, in the first one's train/eval mode; forward(x)[s] equals member_models[s](x[s])."""
    first = member_models[0]
    p = next(first.parameters())
    ens = like(first, len(member_models), conv)
    ens = ens.to(device=p.device, dtype=p.dtype)
    ens.load_state_dict(stack_state_dicts([m.state_dict() for m in member_models], ens))
    ordinary = dict(first.named_modules())
    for name, module in ens.named_modules():  # BatchNorm eps and momentum as the members have them
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps, module.momentum = ordinary[name].eps, ordinary[name].momentum
    ens.train(first.training)
    return ens


def load_into_models(ensemble: nn.Module, member_models: Sequence[nn.Module]) -> None:
    """Copy member s of `ensemble` into `member_models[s]` (parameters and buffers)."""
    parts = split_state_dict(ensemble.state_dict(), member_models[0].state_dict(), len(member_models))
    for model, sd in zip(member_models, parts):
        model.load_state_dict(sd)


# ------------------------------------------------------------------ evaluation of S models together
def load_stacked(ensemble: nn.Module, model: nn.Module, stacked: dict[str, torch.Tensor]) -> None:
    """Make member s of `ensemble` the model `model` with parameters {name: stacked[name][s]}: the
    parameters named in `stacked` (each of shape (S, *shape)) differ per member, every other
    parameter and buffer is `model`'s own, the same for all members."""
    members = next(iter(stacked.values())).shape[0]
    own = model.state_dict()
    state = {}
    for k, target in ensemble.state_dict().items():
        layout = layout_of(target.shape, own[k].shape, members)
        if k in stacked:
            state[k] = stacked[k] if layout == "stack" else stacked[k].reshape(target.shape)
        else:
            state[k] = stack_tensors([own[k]] * members, layout)
    ensemble.load_state_dict(state)


@torch.no_grad()
def evaluate_ensemble(ensemble: nn.Module, members: int, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy (S,) in float64, correct predictions (S,)) of every member of `ensemble` on
    the same (x, y), in eval mode, one ensemble forward per batch of `batch_size` examples."""
    loss = torch.zeros(members, dtype=torch.float64, device=x.device)
    correct = torch.zeros(members, dtype=torch.long, device=x.device)
    was_training = ensemble.training
    ensemble.eval()
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            out = ensemble(xb.unsqueeze(0).expand(members, *xb.shape))
            ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.repeat(members), reduction="none")
            loss += ce.view(members, -1).sum(1).double()
            correct += (out.argmax(-1) == yb).sum(1)
    finally:
        ensemble.train(was_training)
    return loss / len(y), correct


def evaluate_members(member_models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                     batch_size: int = 1000) -> list[tuple[float, float]]:
    """Mean cross-entropy and accuracy (percent) of every model on the same (x, y), in eval mode,
    with one ensemble forward per batch: for member s,
    L_s = (1/N) sum_i CE(f_s(x_i), y_i),  acc_s = 100 (1/N) sum_i [argmax f_s(x_i) = y_i].

    Equals `metrics.base.evaluate(model_s, ...)` for each s up to floating-point summation order;
    the models themselves are not touched (their weights are copied into the ensemble).
    """
    loss, correct = evaluate_ensemble(from_models(member_models), len(member_models), x, y, batch_size)
    return [(float(l_), 100.0 * int(c) / len(y)) for l_, c in zip(loss, correct)]
