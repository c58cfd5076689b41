"""Weight matching and the aligned linear barrier: exact recovery of a hidden permutation, the
permuted copy's function, brute-force optimality of one assignment, agreement with `curve`'s
mc_linear, trained seeds, and models outside the families (traced specs: `test_permutation_trace`)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import phasediagram
from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS, MetricData, key
from phasediagram.metrics.aligned_barrier import AlignedBarrierOptions, aligned_barrier
from phasediagram.metrics.curve import CurveOptions, curve, line, model_at
from phasediagram.models import families as models
from phasediagram.numerics.repair import NotRepairable, channel_stats, endpoint_stats, hidden_layers, repaired
from phasediagram.numerics.weight_matching import (
    UnsupportedModel,
    align,
    objective,
    permutation_spec,
    permute,
    weight_matching,
)
from phasediagram.resolve import check
from phasediagram.spec.experiment import ExperimentSpec

LENGTH, CLASSES = 24, 5
OPTIONS = AlignedBarrierOptions(points=5, batch_size=32, eval_batch_size=64)


def make_data() -> MetricData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, LENGTH, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (160,), generator=g)
    return MetricData(Split(x[:96], y[:96]), Split(x[96:], y[96:]), CLASSES)


def make_model(arch: str, seed: int, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    model = models.create(arch, width, (LENGTH,), CLASSES).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # running statistics unlike the initial ones, so that permuting them matters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


def permuted_copy(model: nn.Module, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of `model` whose units are permuted by random permutations (returned too)."""
    spec = permutation_spec(model)
    g = torch.Generator().manual_seed(seed)
    perms = {name: torch.randperm(n, generator=g) for name, n in spec.sizes.items()}
    twin = models.create(*_args(model)).double()
    twin.load_state_dict(permute(model.state_dict(), spec, perms))
    return twin, perms


def _args(model):
    arch = "mlp" if isinstance(model, models.MLP) else "resnet1d"
    width = model.net[1].out_features if arch == "mlp" else model.stem[0].out_channels
    return arch, width, (LENGTH,), CLASSES


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_a_permuted_copy_computes_the_same_function_and_aligns_back_exactly(arch):
    a = make_model(arch, 0)
    b, perms = permuted_copy(a, 1)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert any(not torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    x = make_data().train.x
    for mode in ("eval", "train"):  # running statistics, then batch statistics (on copies: they update them)
        a_, b_ = copy.deepcopy(a).train(mode == "train"), copy.deepcopy(b).train(mode == "train")
        with torch.no_grad():
            assert torch.allclose(a_(x), b_(x), rtol=0, atol=1e-10), mode
    aligned, matching = align(a, b, torch.Generator().manual_seed(2))
    assert matching.converged
    assert all(torch.equal(aligned[k], v) for k, v in a.state_dict().items())  # running statistics too
    for name, found in matching.perms.items():  # found = the inverse of the permutation applied
        assert torch.equal(perms[name][found], torch.arange(len(found))), name


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_the_barrier_to_a_permuted_copy_is_zero_after_alignment_only(arch):
    a = make_model(arch, 0)
    b, _ = permuted_copy(a, 1)
    out = aligned_barrier(a, b, make_data(), OPTIONS, torch.Generator().manual_seed(0))
    assert out[key("train", "aligned_barrier")] == 0.0
    for t in OPTIONS.ts:
        for split in ("train", "test"):
            assert out[key(split, "err_aligned", t)] == out[key(split, "err_aligned", 0.0)]
            assert out[key(split, "loss_aligned", t)] == pytest.approx(out[key(split, "loss_aligned", 0.0)],
                                                                       abs=1e-10, rel=0)
    # without alignment the midpoint is another model: its loss moves off the endpoints'
    assert abs(out[key("train", "loss_linear", 0.5)] - out[key("train", "loss_linear", 0.0)]) > 1e-3
    assert out[key("-", "wm_converged")] == 1.0
    if arch == "mlp":  # REPAIR on a constant line changes nothing
        assert out[key("train", "repaired_barrier")] == 0.0
        for t in OPTIONS.ts:
            assert out[key("train", "loss_repaired", t)] == pytest.approx(out[key("train", "loss_aligned", t)],
                                                                          abs=1e-10, rel=0)
    else:  # BatchNorm: the statistics reset is the repair
        assert not any("repaired" in k for k in out)


def test_one_assignment_is_the_brute_force_optimum():
    """One hidden layer: one permutation, so weight matching must reach the best of all n! of them."""
    torch.manual_seed(0)
    a, b = (models.MLP(5, (LENGTH,), CLASSES, depth=1).double() for _ in range(2))
    spec = permutation_spec(a)
    assert dict(spec.sizes) == {"hidden0": 5}
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    best = max(objective(params_a, permute(params_b, spec, {"hidden0": torch.tensor(p)}))
               for p in itertools.permutations(range(5)))
    matching = weight_matching(params_a, params_b, spec, torch.Generator().manual_seed(0))
    assert matching.objective == pytest.approx(best, rel=1e-12)
    assert objective(params_a, permute(params_b, spec, matching.perms)) == matching.objective


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_coordinate_descent_only_raises_the_objective_and_is_seeded(arch):
    a, b = make_model(arch, 0), make_model(arch, 1)
    spec = permutation_spec(a)
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    first = weight_matching(params_a, params_b, spec, torch.Generator().manual_seed(3))
    again = weight_matching(params_a, params_b, spec, torch.Generator().manual_seed(3))
    assert first.objective > objective(params_a, params_b)  # the identity, where the descent starts
    assert all(torch.equal(first.perms[n], again.perms[n]) for n in first.perms)
    capped = weight_matching(params_a, params_b, spec, torch.Generator().manual_seed(3), max_sweeps=1)
    assert capped.sweeps == 1 and not capped.converged


def test_resnet_spec_shares_the_residual_stream_of_a_stage():
    torch.manual_seed(0)
    net = models.create("resnet18", 2, (3, 8, 8), CLASSES)
    axes = permutation_spec(net).axes
    assert axes["stem.0.weight"][0] == axes["stages.0.bn2.weight"][0] == axes["stages.1.conv2.weight"][0] \
        == axes["stages.2.conv1.weight"][1] == axes["stages.2.shortcut.0.weight"][1] == "residual0"
    assert axes["stages.2.shortcut.0.weight"][0] == axes["stages.3.bn2.running_mean"][0] == "residual1"
    assert axes["stages.0.conv1.weight"][0] != axes["stages.1.conv1.weight"][0]
    assert axes["head.weight"] == (None, "residual3") and axes["stages.0.bn1.num_batches_tracked"] == ()


def test_the_unaligned_barrier_is_minus_the_mc_linear_of_curve():
    a, b = make_model("resnet1d", 0), make_model("resnet1d", 1)
    data = make_data()
    mine = aligned_barrier(a, b, data, OPTIONS, torch.Generator().manual_seed(0))
    theirs = curve(a, b, data, CurveOptions(epochs=0, batch_size=32, eval_batch_size=64),
                   torch.Generator().manual_seed(0))
    assert mine[key("train", "linear_barrier")] == -theirs[key("train", "mc_linear")]
    for t in OPTIONS.ts:
        assert mine[key("train", "err_linear", t)] == theirs[key("train", "err_linear", t)]
        assert mine[key("test", "loss_linear", t)] == pytest.approx(theirs[key("test", "loss_linear", t)], rel=1e-12)


class Plugged(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(LENGTH, 4), nn.Tanh(), nn.Linear(4, CLASSES))

    def forward(self, x):
        return self.body(x)


def test_a_model_outside_the_families_is_aligned_with_its_traced_spec():
    """The spec of another model is traced from its forward on an example batch (a permuted copy aligns
    back exactly); without one it is refused, as is an MLP the hand-written spec does not describe."""
    torch.manual_seed(0)
    a = Plugged().double()
    with pytest.raises(SpecError, match=r"^arch: weight matching cannot tell which units of "
                                        r"tests\.test_aligned_barrier\.Plugged may be permuted: not of the mlp"):
        permutation_spec(a)
    x = make_data().train.x
    spec = permutation_spec(a, x[:2])
    assert spec.axes == {"body.0.weight": ("body.0", None), "body.0.bias": ("body.0",),
                         "body.2.weight": (None, "body.0"), "body.2.bias": (None,)}
    b = Plugged().double()
    b.load_state_dict(permute(a.state_dict(), spec, {"body.0": torch.tensor([2, 0, 3, 1])}))
    out = aligned_barrier(a, b, make_data(), OPTIONS, torch.Generator().manual_seed(0))
    assert out[key("train", "aligned_barrier")] == 0.0 and out[key("-", "wm_converged")] == 1.0
    deeper = models.MLP(4, (LENGTH,), CLASSES)
    deeper.net.append(nn.Tanh())  # an MLP whose units are no longer those of the family
    with pytest.raises(UnsupportedModel, match="other than nn.Flatten, nn.Linear and nn.ReLU"):
        permutation_spec(deeper)
    assert dict(permutation_spec(deeper, x[:2].float()).sizes) == {"net.1": 4, "net.3": 4}


# --------------------------------------------------------------------------- REPAIR
def test_repair_gives_every_hidden_unit_the_interpolated_statistics_of_the_endpoints():
    """At t in (0.25, 0.5, 0.8) each hidden unit's output mean and std over the examples equal (1 - t) x A's + t x
    B's to 1e-10 (both layers: the second measured after the first was corrected), where the plain line's spread
    had collapsed below it; at t = 0 the model is A's to 1e-12. Float64 ReLU MLPs of independent seeds."""
    data = make_data()
    a, b = make_model("mlp", 0, width=12), make_model("mlp", 1, width=12)
    names = hidden_layers(a)
    assert names == ["net.1", "net.3"]
    ends = endpoint_stats(a, b, data.train, 32)
    theta = [{n: p.detach() for n, p in m.named_parameters()} for m in (a, b)]
    for t in (0.25, 0.5, 0.8):
        plain = model_at(a, line(*theta, t), None)
        fixed = repaired(plain, ends, t, data.train, 32)
        got = channel_stats(fixed, names, data.train, 17)
        for n in names:
            (mu_a, sd_a), (mu_b, sd_b) = ends[0][n], ends[1][n]
            assert torch.allclose(got[n][0], (1 - t) * mu_a + t * mu_b, rtol=0, atol=1e-10)
            assert torch.allclose(got[n][1], (1 - t) * sd_a + t * sd_b, rtol=0, atol=1e-10)
        before = channel_stats(plain, names, data.train, 32)["net.1"][1]
        assert float(before.mean()) < 0.9 * float(((1 - t) * ends[0]["net.1"][1] + t * ends[1]["net.1"][1]).mean())
    at_a = repaired(model_at(a, theta[0], None), ends, 0.0, data.train, 32)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(at_a.parameters(), a.parameters()))


def test_repair_refuses_batch_norm_and_layers_without_a_bias():
    with pytest.raises(NotRepairable, match="BatchNorm"):
        hidden_layers(make_model("resnet1d", 0))
    no_bias = nn.Sequential(nn.Linear(LENGTH, 4, bias=False), nn.ReLU(), nn.Linear(4, CLASSES))
    with pytest.raises(NotRepairable, match="the layers 0 have no bias"):
        hidden_layers(no_bias)
    assert hidden_layers(nn.Sequential(nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 22, 2))) == ["0"]


def test_bad_options_are_refused_by_the_spec():
    with pytest.raises(SpecError, match=r"metric_options\.aligned_barrier\.points: 2 is out of range"):
        check(ExperimentSpec(metrics=("aligned_barrier",), metric_options={"aligned_barrier": {"points": 2}}))
    with pytest.raises(SpecError, match=r"metric_options\.aligned_barrier\.pairs"):
        AlignedBarrierOptions(pairs="every")
    assert METRICS["aligned_barrier"].selects_pairs


@pytest.mark.parametrize("arch, width", [("mlp", 32), ("resnet1d", 8)])
def test_alignment_lowers_the_barrier_between_trained_seeds(root, arch, width):
    """Two seeds trained on MNIST-1D by the study: the aligned barrier is at most the unaligned one."""
    spec = check(ExperimentSpec(name=arch, arch=arch, widths=(width,), batch_sizes=(64,), seeds=(0, 1), epochs=4,
                                train_fractions=(0.25,), metrics=("aligned_barrier",),
                                metric_options={"aligned_barrier": {"eval_examples": 500}}))
    study = phasediagram.Study(spec, root)
    assert not any(r.failed for r in study.run(executor=phasediagram.InProcess()).values())
    df = study.table()
    rows = df[(df.source == "aligned_barrier") & (df.split == "train")]
    value = {m: float(rows[rows.metric == m].value.iloc[0]) for m in ("aligned_barrier", "linear_barrier")}
    assert value["linear_barrier"] > 0
    assert value["aligned_barrier"] <= value["linear_barrier"], value
    lines = ["err_aligned", "err_linear"] + (["err_repaired"] if arch == "mlp" else [])
    assert ("repaired_barrier" in set(rows.metric)) == (arch == "mlp")
    ends = rows[rows.coord.isin([0.0, 1.0]) & rows.metric.isin(lines)]
    assert len(ends) == 2 * len(lines) and ends.groupby("coord").value.nunique().eq(1).all()  # shared endpoints
