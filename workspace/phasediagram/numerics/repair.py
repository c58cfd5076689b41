"""REPAIR (Jordan et al. 2023, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair").

On the line theta(t) = (1 - t) theta_A + t theta_B between two aligned models, the hidden units'
activations shrink in spread ("variance collapse"), which inflates the barrier. REPAIR rescales
each unit c of every hidden affine layer l of theta(t) so that its output z_c has, over the
training examples, the interpolated statistics of the endpoints,

    mean(z_c) = (1 - t) mu_A,c + t mu_B,c,     std(z_c) = (1 - t) sigma_A,c + t sigma_B,c,

(population mean and standard deviation over the examples and, for a convolution, its positions).
The correction z_c -> s_c (z_c - mu_c) + mu*_c, s_c = sigma*_c / sigma_c, is folded into the layer's
weight rows and bias, layer after layer in forward order (each layer's statistics measured with the
earlier layers already corrected), so the result is an ordinary model of the same architecture. A
unit with sigma_c = 0 (dead on every example) is only shifted.

Hidden affine layers: every nn.Linear, nn.Conv1d and nn.Conv2d with a bias except the last affine
layer (the logits). Models with BatchNorm are refused: resetting their running statistics after
interpolation (`curve.recompute_bn`) is REPAIR's correction for them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)


class NotRepairable(SpecError):
    """A model REPAIR does not apply to (BatchNorm, or a hidden affine layer without a bias)."""

    def __init__(self, why: str):
        super().__init__("arch", f"REPAIR does not apply: {why}")


def hidden_layers(model: nn.Module) -> list[str]:
    """Names of the hidden affine layers of `model` (module docstring), in `named_modules` order."""
    if any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise NotRepairable(f"{type(model).__name__} has BatchNorm, whose statistics reset is its repair")
    names = [n for n, m in model.named_modules() if isinstance(m, AFFINE)]
    hidden = names[:-1]
    missing = [n for n in hidden if model.get_submodule(n).bias is None]
    if missing:
        raise NotRepairable(f"the layers {', '.join(missing)} have no bias to shift")
    return hidden


@torch.no_grad()
def channel_stats(model: nn.Module, names: list[str], split: Split, batch_size: int
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (mean, std)} of each output channel of the layers `names` over `split` (eval mode,
    batches of `batch_size`; sums in float64; population std)."""
    sums: dict[str, list[torch.Tensor]] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name):
        def record(_module, _inputs, out):
            z = out.detach().to(torch.float64).transpose(0, 1).reshape(out.shape[1], -1)
            s = sums.setdefault(name, [torch.zeros(len(z), dtype=torch.float64, device=z.device),
                                       torch.zeros(len(z), dtype=torch.float64, device=z.device)])
            s[0] += z.sum(1)
            s[1] += (z * z).sum(1)
            counts[name] += z.shape[1]
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was = model.training
    try:
        model.eval()
        for batch in split.batches(batch_size):
            model(batch.x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        mean = sums[n][0] / counts[n]
        out[n] = mean, (sums[n][1] / counts[n] - mean * mean).clamp_min(0.0).sqrt()
    return out


Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def endpoint_stats(model_a: nn.Module, model_b: nn.Module, split: Split, batch_size: int = 128) -> tuple[Stats, Stats]:
    """`channel_stats` of the hidden layers of both endpoints (B aligned to A), the targets of `repaired`."""
    names = hidden_layers(model_a)
    return channel_stats(model_a, names, split, batch_size), channel_stats(model_b, names, split, batch_size)


@torch.no_grad()
def repaired(model_t: nn.Module, ends: tuple[Stats, Stats], t: float, split: Split, batch_size: int = 128
             ) -> nn.Module:
    """A copy of `model_t`, the point t of the line between the endpoints whose statistics are `ends`
    (`endpoint_stats`), whose hidden affine layers have the interpolated statistics on `split`
    (module docstring)."""
    model = copy.deepcopy(model_t).eval()
    for name in hidden_layers(model):
        layer = model.get_submodule(name)
        (mu_a, sd_a), (mu_b, sd_b) = ends[0][name], ends[1][name]
        mu, sd = channel_stats(model, [name], split, batch_size)[name]
        target_mu, target_sd = (1 - t) * mu_a + t * mu_b, (1 - t) * sd_a + t * sd_b
        live = sd > 0
        scale = torch.where(live, target_sd / torch.where(live, sd, 1.0), 1.0)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.view(shape).to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.to(torch.float64) - mu) * scale + target_mu).to(layer.bias.dtype))
    return model
