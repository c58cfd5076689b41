"""Permutation groups traced from a model's forward (`numerics.permutation_trace`): permuting every
group by a random permutation leaves the function unchanged (float64, relative error below 1e-10,
where the requirement is 1e-5), on an MLP, a BatchNorm conv net with residual blocks and a strided
projection, a pre-norm LayerNorm MLP, the built-in families (same groups as their hand-written
specs) and the plugged-in family of `test_plugins`; weight matching with a traced spec recovers a
permuted copy exactly (barrier 0); what the tracer cannot follow is refused, naming the operation,
by the metric and at spec check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics import MetricData, key
from phasediagram.metrics.aligned_barrier import AlignedBarrierOptions, aligned_barrier
from phasediagram.models import families
from phasediagram.numerics.permutation_trace import traced_axes
from phasediagram.numerics.weight_matching import UnsupportedModel, align, family_axes, permute, spec_of

from .test_plugins import DigitNet, spec_for

CLASSES = 5
TOLERANCE = 1e-10  # relative error of the permuted model's logits, float64


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (or a strided 1x1 conv-BN projection of it), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out)
        self.project = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out)) if stride > 1
                        else nn.Identity())

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.project(x))


class ConvNet(nn.Module):
    """Stem, two residual blocks (the second strided), max pool, flatten, a hidden Linear, logits."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(Block(4, 4, 1), Block(4, 6, 2))
        self.fc, self.head = nn.Linear(6 * 2 * 2, 7), nn.Linear(7, CLASSES)

    def forward(self, x):
        h = nn.functional.max_pool2d(self.blocks(self.stem(x)), 2)
        return self.head(torch.relu(self.fc(h.view(h.size(0), -1))))


class LayerNormMLP(nn.Module):
    """Linear in, two pre-norm residual blocks (LayerNorm, Linear, GELU, Linear), LayerNorm, logits."""

    def __init__(self, n_in: int = 24, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(),
                                                   nn.Linear(2 * width, width)) for _ in range(2)])
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, CLASSES)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(self.norm(h))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(24, 9), nn.Tanh(), nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, CLASSES))


MODELS = {  # name: (builder, input shape)
    "mlp": (mlp, (24,)),
    "batchnorm_resnet": (ConvNet, (3, 8, 8)),
    "layernorm_mlp": (LayerNormMLP, (24,)),
    "family_mlp": (lambda: families.create("mlp", 6, (24,), CLASSES), (24,)),
    "family_resnet1d": (lambda: families.create("resnet1d", 3, (24,), CLASSES), (24,)),
    "family_resnet18": (lambda: families.create("resnet18", 2, (3, 8, 8), CLASSES), (3, 8, 8)),
    "plugged_digitnet": (lambda: DigitNet(4, CLASSES, (1, 8, 8)), (1, 8, 8)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model (float64, norms with random affine parameters and running statistics) and 12 inputs."""
    builder, shape = MODELS[name]
    torch.manual_seed(seed)
    model = builder().double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return model, torch.randn(12, *shape, generator=g, dtype=torch.float64)


def traced_copy(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[nn.Module, dict]:
    """A copy of `model` with every traced group permuted by a random permutation (returned too)."""
    spec = spec_of(model, *traced_axes(model, x[:2]))  # the traced spec, also for the families
    g = torch.Generator().manual_seed(seed)
    perms = {name: torch.randperm(n, generator=g) for name, n in spec.sizes.items()}
    twin = copy.deepcopy(model)
    twin.load_state_dict(permute(model.state_dict(), spec, perms))
    return twin, perms


def relative_error(a: nn.Module, b: nn.Module, x: torch.Tensor, train: bool) -> float:
    a, b = copy.deepcopy(a).train(train), copy.deepcopy(b).train(train)  # batch statistics update running ones
    with torch.no_grad():
        want, got = a(x), b(x)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_permuting_every_traced_group_leaves_the_function_unchanged(name):
    model, x = build(name)
    twin, perms = traced_copy(model, x, seed=1)
    assert perms and all(len(p) > 1 for p in perms.values())
    moved = [k for k in model.state_dict() if not torch.equal(model.state_dict()[k], twin.state_dict()[k])]
    assert len(moved) >= 2 * len(perms), moved  # each group's rows and the columns reading them
    for train in (False, True):
        assert relative_error(model, twin, x, train) < TOLERANCE, (name, train)


@pytest.mark.parametrize("name", ["family_mlp", "family_resnet1d", "family_resnet18"])
def test_the_families_traced_groups_are_their_hand_written_ones(name):
    model, x = build(name)
    traced, folds = traced_axes(model, x[:2])

    def groups(axes):
        found: dict[str, set] = {}
        for k, names in axes.items():
            for a, group in enumerate(names):
                if group is not None:
                    found.setdefault(group, set()).add((k, a))
        return sorted(sorted(g) for g in found.values())

    assert groups(traced) == groups(family_axes(model)) and folds == {}


def test_residual_additions_tie_groups_and_the_logits_and_input_stay_put():
    model, x = build("batchnorm_resnet")
    axes, folds = traced_axes(model, x[:2])
    stream = axes["stem.0.weight"][0]
    assert stream == axes["blocks.0.bn2.running_mean"][0] == axes["blocks.1.conv1.weight"][1] \
        == axes["blocks.1.project.0.weight"][1]
    after = axes["blocks.1.conv2.weight"][0]
    assert after == axes["blocks.1.project.1.bias"][0] == axes["fc.weight"][1] != stream
    assert axes["blocks.0.conv1.weight"][0] not in (stream, after)
    assert axes["stem.0.weight"][1] is None and axes["head.weight"] == (None, "fc") and axes["head.bias"] == (None,)
    assert folds == {("fc.weight", 1): (1, 4)}  # 6 channels x 2 x 2 positions, flattened
    assert axes["blocks.0.bn1.num_batches_tracked"] == ()


class InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(24, 24), nn.Linear(24, 10), nn.Linear(10, CLASSES)

    def forward(self, x):
        return self.out(torch.relu(self.b(x + torch.relu(self.a(x)))))


def test_an_addition_to_the_input_fixes_that_group():
    torch.manual_seed(0)
    axes, _ = traced_axes(InputResidual().double(), torch.zeros(2, 24, dtype=torch.float64))
    assert axes["a.weight"] == (None, None) and axes["b.weight"] == ("b", None) and axes["out.weight"] == (None, "b")


@pytest.mark.parametrize("name", ["batchnorm_resnet", "layernorm_mlp", "plugged_digitnet"])
def test_weight_matching_with_a_traced_spec_recovers_a_permuted_copy(name):
    model, x = build(name)
    twin, perms = traced_copy(model, x, seed=2)
    aligned, matching = align(model, twin, torch.Generator().manual_seed(0), example=x[:2])
    assert matching.converged
    assert all(torch.equal(aligned[k], v) for k, v in model.state_dict().items())
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, CLASSES, (len(x),), generator=g)
    data = MetricData(Split(x[:8], y[:8]), Split(x[8:], y[8:]), CLASSES)
    options = AlignedBarrierOptions(points=3, batch_size=4, eval_batch_size=8)
    out = aligned_barrier(model, twin, data, options, torch.Generator().manual_seed(0))
    assert out[key("train", "aligned_barrier")] == 0.0 and out[key("-", "wm_converged")] == 1.0
    assert out[key("train", "loss_aligned", 0.5)] == pytest.approx(out[key("train", "loss_aligned", 0.0)],
                                                                   rel=1e-10, abs=0)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(24, 4), nn.Linear(24, 4), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv1d(1, 4, 3), nn.Conv1d(4, 4, 3, groups=2), nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.out(self.b(self.a(x.unsqueeze(1))).mean(-1))


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(24, 8), nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.out(self.a(x).view(len(x), 2, 4).sum(1))


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.out = nn.Linear(24, 4), nn.GroupNorm(2, 4), nn.Linear(4, CLASSES)

    def forward(self, x):
        return self.out(self.norm(self.a(x)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.attn, self.out = nn.Linear(24, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, CLASSES)

    def forward(self, x):
        h = self.a(x).unsqueeze(1)
        return self.out(self.attn(h, h, h)[0].squeeze(1))


@pytest.mark.parametrize("model, message", [
    (Concat, r"cat of a tensor with permutable channels \(not traced\), in the forward \(Concat\)"),
    (Grouped, r"conv1d with 2 groups of permutable channels, in module 'b' \(Conv1d\)"),
    (Heads, r"a reshape splitting permutable channels across axes, in the forward \(Heads\)"),
    (Normed, r"group_norm of a tensor with permutable channels \(not traced\), in module 'norm' \(GroupNorm\)"),
    (Attention, r"multi_head_attention_forward of a tensor with permutable channels \(not traced\), in module "
                r"'attn' \(MultiheadAttention\)"),
])
def test_what_the_tracer_cannot_follow_is_refused_naming_the_operation(model, message):
    torch.manual_seed(0)
    net = model().double()
    with pytest.raises(UnsupportedModel, match=rf"^arch: weight matching cannot tell which units of "
                                               rf"tests\.test_permutation_trace\.{model.__name__} may be permuted: "
                                               rf"{message}$"):
        traced_axes(net, torch.zeros(2, 24, dtype=torch.float64))
    data = MetricData(Split(torch.zeros(4, 24, dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
                      Split(torch.zeros(4, 24, dtype=torch.float64), torch.zeros(4, dtype=torch.long)), CLASSES)
    with pytest.raises(UnsupportedModel, match=message):
        aligned_barrier(net, copy.deepcopy(net), data, AlignedBarrierOptions(points=3), torch.Generator())


def make_concat(width, n_classes, input_shape):
    net = Concat()
    net.a, net.b, net.out = nn.Linear(64, width), nn.Linear(64, width), nn.Linear(2 * width, n_classes)
    return nn.Sequential(nn.Flatten(), net)


def test_a_spec_check_accepts_a_traceable_plugged_family_and_refuses_another():
    assert spec_for(metrics=("aligned_barrier",)).metrics == ("aligned_barrier",)  # the DigitNet of test_plugins
    with pytest.raises(SpecError, match=r"^metrics: aligned_barrier cannot measure arch "
                                        r"tests\.test_permutation_trace:make_concat: weight matching cannot tell "
                                        r"which units of torch\.nn\.modules\.container\.Sequential may be permuted: "
                                        r"cat of a tensor .* in module '1' \(Concat\)$"):
        spec_for(arch=f"{__name__}:make_concat", metrics=("aligned_barrier",))
