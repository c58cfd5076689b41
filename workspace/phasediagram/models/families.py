"""Width-k model families behind one explicit registry: `create(arch, width, input_shape, n_classes)`.

- `mlp`: input -> [Linear(k) -> ReLU] x depth -> Linear(n_classes).
- `resnet1d`: a residual conv net for 1D signals (MNIST-1D): 3-tap stem with k channels,
  three stages of one BasicBlock each with k, 2k, 4k channels (stride 1, 2, 2), BatchNorm,
  global average pooling, linear head. The small-input analogue of the reference ResNet18.
- `resnet18`: CIFAR-style ResNet18: 3x3 stem, BasicBlocks [2, 2, 2, 2] with k, 2k, 4k, 8k
  channels; k = 64 is the standard ResNet18.
- `transformer`, `transformer_seq`: a pre-LayerNorm causal transformer over tokens with d_model k
  (`models.transformer`); the logits of the last position (N, n_classes), or of every position
  (N, n_classes, T) for the token cross-entropy.

Any other family is named by import path (`arch: "mypkg.nets:make_vit"`, see `create`).
A checkpoint stores `model_args` (the keyword arguments of `create`, the import path included) so it
rebuilds its model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from phasediagram.errors import SpecError
from phasediagram.models.transformer import transformer, transformer_seq
from phasediagram.plugins import call, is_import_path, load_object


class MLP(nn.Module):
    """Flatten -> [linear(k) -> ReLU] x depth -> linear(n_classes).

    `linear(in, out)` builds each affine layer and `flatten` the first module (nn.Linear and
    nn.Flatten(); the ensemble form passes its batched layers, `accel.ensemble_models.EnsembleMLP`).
    """

    def __init__(self, width: int, input_shape: tuple[int, ...], n_classes: int, depth: int = 2,
                 linear: Callable[[int, int], nn.Module] = nn.Linear, flatten: nn.Module | None = None):
        super().__init__()
        n_in = 1
        for s in input_shape:
            n_in *= s
        layers: list[nn.Module] = [nn.Flatten() if flatten is None else flatten]
        for _ in range(depth):
            layers += [linear(n_in, width), nn.ReLU()]
            n_in = width
        layers.append(linear(n_in, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (1x1 conv-BN when the shape changes) shortcut, then ReLU."""

    def __init__(self, conv: Callable[..., nn.Module], norm: Callable[[int], nn.Module], c_in: int, c_out: int,
                 stride: int):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, 0, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv(k) -> stages of BasicBlocks with channels k * 2^i -> global average pool -> linear.

    `conv(c_in, c_out, kernel, stride, padding, bias=...)`, `norm(channels)` and `linear(in, out)`
    build the layers (torch's Conv and BatchNorm of `dims` dimensions and nn.Linear; the ensemble
    form passes its batched layers, `accel.ensemble_models.EnsembleResNet`).
    """

    def __init__(self, dims: int, width: int, in_channels: int, n_classes: int, blocks: tuple[int, ...],
                 conv: Callable[..., nn.Module] | None = None, norm: Callable[[int], nn.Module] | None = None,
                 linear: Callable[[int, int], nn.Module] = nn.Linear):
        super().__init__()
        conv = conv or (nn.Conv1d if dims == 1 else nn.Conv2d)
        norm = norm or (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)
        self.dims = dims
        self.stem = nn.Sequential(conv(in_channels, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        stages, c_in = [], width
        for i, n_blocks in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n_blocks):
                stages.append(BasicBlock(conv, norm, c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 1 and x.dim() == 2:
            x = x.unsqueeze(1)
        out = self.stages(self.stem(x))
        return self.head(out.flatten(2).mean(-1))


def _mlp(width, input_shape, n_classes):
    return MLP(width, input_shape, n_classes)


def _resnet1d(width, input_shape, n_classes):
    in_channels = 1 if len(input_shape) == 1 else input_shape[0]
    return ResNet(1, width, in_channels, n_classes, (1, 1, 1))


def _resnet18(width, input_shape, n_classes):
    if len(input_shape) != 3:
        raise ValueError(f"resnet18 needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    return ResNet(2, width, input_shape[0], n_classes, (2, 2, 2, 2))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "resnet1d": _resnet1d,
    "resnet18": _resnet18,
    "transformer": transformer,
    "transformer_seq": transformer_seq,
}


def create(arch: str, width: int, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A freshly initialised model of `arch` at `width` (initialisation draws from torch's global RNG).

    `arch` is a registered family or an import path `module:function` naming a builder called as
    `function(width=width, n_classes=n_classes, input_shape=input_shape)` that returns an
    `nn.Module` with trainable parameters mapping a batch (N, *input_shape) to logits (N, n_classes).
    """
    input_shape = tuple(int(s) for s in input_shape)
    if arch in MODELS:
        return MODELS[arch](width, input_shape, n_classes)
    if not is_import_path(arch):
        raise KeyError(f"unknown arch {arch!r}; known: {', '.join(MODELS)}, or an import path module:function")
    model = call("arch", f"{arch}(width={width}, n_classes={n_classes}, input_shape={input_shape})",
                 load_object("arch", arch), width=width, n_classes=n_classes, input_shape=input_shape)
    if not isinstance(model, nn.Module):
        raise SpecError("arch", f"{arch} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise SpecError("arch", f"{arch} returned a model with no trainable parameters")
    return model


def check_outputs(arch: str, width: int, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Build `arch` at `width` and check that two inputs of `input_shape` (eval mode, no gradient)
    give floating-point logits of shape (2, n_classes); `SpecError("arch", ...)` saying what came
    back otherwise. Returns the model built (in eval mode); torch's global RNG is left as it was."""
    input_shape = tuple(int(s) for s in input_shape)
    with torch.random.fork_rng(devices=[]):
        try:
            model = create(arch, width, input_shape, n_classes).eval()
        except ValueError as exc:
            raise SpecError("arch", str(exc)) from None
        p = next(model.parameters())
        try:
            with torch.no_grad():
                out = model(torch.zeros((2, *input_shape), dtype=p.dtype, device=p.device))
        except (Exception, SystemExit) as exc:  # a user's forward may raise anything on a wrong shape
            raise SpecError("arch", f"{arch} at width {width} cannot take inputs of shape (N, {input_shape}): "
                                    f"{type(exc).__name__}: {exc}") from None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or tuple(out.shape) != (2, n_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError("arch", f"{arch} at width {width} maps inputs (2, {input_shape}) to {got}; expected "
                                f"floating-point logits of shape (2, {n_classes})")
    return model


def model_args(arch: str, width: int, input_shape, n_classes: int) -> dict:
    return {"arch": arch, "width": int(width), "input_shape": [int(s) for s in input_shape], "n_classes": int(n_classes)}


def from_args(args: dict) -> nn.Module:
    return create(args["arch"], args["width"], tuple(args["input_shape"]), args["n_classes"])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
