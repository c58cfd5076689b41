"""Tests of the flatness metrics `fisher`, `local_energy` and `nrs` (issue 4).

Exact quantities are checked in float64 against dense references with explicit tolerances;
Monte Carlo estimates against closed forms within 4 standard errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch.func import vmap
from torch.nn import functional as F

from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS, MetricData, parse_key
from phasediagram.metrics.fisher import FisherOptions, fisher, log_det_gamma, per_example_grads
from phasediagram.metrics.local_energy import (
    LocalEnergyOptions,
    ensemble_loss_many,
    local_energy,
    local_energy_curve,
    split_loss_fn,
)
from phasediagram.metrics.nrs import NRSOptions, nrs
from phasediagram.models import families as models
from phasediagram.numerics.perturbation import kl_divergence, sample_neighbour
from phasediagram.resolve import check, metric_options

FLATNESS = ("fisher", "local_energy", "nrs")
# Small options for the registry tests: the same code paths as the defaults, far fewer evaluations.
SMALL_OPTIONS = {
    "fisher": dict(n_batches=2, batch_size=8, chunk_size=4),
    "local_energy": dict(sigmas=(0.0, 0.05, 0.1), n_samples=4, n_examples=24),
    "nrs": dict(n_neighbours=3, n_examples=24),
}
BAD_OPTIONS = [
    ("fisher", dict(n_batches=0)), ("fisher", dict(batch_size=1)), ("fisher", dict(batchnorm="none")),
    ("fisher", dict(batch_size=100, chunk_size=7, batchnorm="train")), ("fisher", dict(chunk_size=1)), ("fisher", dict(logit_norm=0.0)),
    ("fisher", dict(logit_norm=math.inf)), ("fisher", dict(floor=0.0)), ("fisher", dict(n_batches=2.5)),
    ("local_energy", dict(sigmas=())), ("local_energy", dict(sigmas=(-0.1, 0.1))),
    ("local_energy", dict(sigmas=(0.0, math.nan))), ("local_energy", dict(sigma_value=-1.0)),
    ("local_energy", dict(n_samples=1)), ("local_energy", dict(splits=("val",))),
    ("local_energy", dict(splits=("train", "train"))), ("local_energy", dict(n_examples=0)),
    ("local_energy", dict(batch_size=0)), ("local_energy", dict(batching="yes")),
    ("local_energy", dict(sample_chunk=0)),
    ("nrs", dict(rho=-0.01)), ("nrs", dict(rho=math.inf)), ("nrs", dict(n_neighbours=0)),
    ("nrs", dict(splits=())), ("nrs", dict(n_examples=-3)), ("nrs", dict(batch_size=True)),
]


# ----------------------------------------------------------------------------- fixtures
def toy_data(dtype=torch.float64, n_train=40, n_test=24, dim=12, n_classes=4, seed=0) -> MetricData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, dim, generator=g, dtype=dtype)
    y = torch.randint(0, n_classes, (n_train + n_test,), generator=g)
    return MetricData(Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), n_classes)


def toy_model(arch: str, data: MetricData, width: int = 3, dtype=torch.float64):
    """A small model with non-trivial BatchNorm running statistics (a few train-mode passes)."""
    torch.manual_seed(1)
    model = models.create(arch, width, tuple(data.train.x.shape[1:]), data.n_classes).to(dtype)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(data.train.x)
    return model.eval()


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.training) for m in model.modules()], [p.requires_grad for p in model.parameters()])


def assert_unchanged(model, before):
    state, flags, grads = before
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]), k
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- fisher
def dense_fisher(model, data, options, seed, *, train_chunks=False):
    """gamma = 1/2 log det(J J^T) with J stacked from one torch.autograd.grad call per example."""
    g = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(model)
    net.train(train_chunks)
    params = list(net.parameters())
    gammas = []
    for _ in range(options.n_batches):
        batch = data.train.batch(options.batch_size, g)
        rows = []
        step = options.chunk_size if train_chunks else 1
        for start in range(0, len(batch), step):
            logits = net(batch.x[start:start + step])
            if options.logit_norm is not None:
                logits = options.logit_norm * logits / logits.norm(dim=-1, keepdim=True)
            losses = F.cross_entropy(logits, batch.y[start:start + step], reduction="none")
            for i in range(len(losses)):
                gi = torch.autograd.grad(losses[i], params, retain_graph=True)
                rows.append(torch.cat([t.reshape(-1) for t in gi]))
        J = torch.stack(rows)
        gammas.append(0.5 * torch.linalg.slogdet(J @ J.T).logabsdet.item())
    return sum(gammas) / len(gammas)


@pytest.mark.parametrize("arch,batchnorm,logit_norm", [
    ("mlp", "eval", None), ("mlp", "eval", 3.0), ("resnet1d", "eval", None), ("resnet1d", "train", None),
    ("resnet1d", "train", 2.0),
])
def test_fisher_matches_dense_per_example_gradients(arch, batchnorm, logit_norm):
    data = toy_data()
    model = toy_model(arch, data, width=2 if arch == "resnet1d" else 8)
    options = FisherOptions(n_batches=3, batch_size=8, batchnorm=batchnorm, chunk_size=4, logit_norm=logit_norm)
    assert 8 < models.n_params(model)  # J J^T is non-singular
    got = fisher(model, data, options, torch.Generator().manual_seed(5))
    want = dense_fisher(model, data, options, 5, train_chunks=batchnorm == "train")
    assert got["train/fisher"] == pytest.approx(want, rel=1e-8)
    assert got["train/fisher_floored"] == 0.0


def test_per_example_grads_match_autograd_rows():
    data = toy_data()
    model = toy_model("resnet1d", data, width=2)
    x, y = data.train.x[:5], data.train.y[:5]
    J = per_example_grads(model, x, y)
    for i in range(5):
        gi = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        torch.testing.assert_close(J[i], torch.cat([t.reshape(-1) for t in gi]), rtol=1e-10, atol=1e-12)


def test_log_det_gamma_identity_and_floors():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(6, 30, generator=g, dtype=torch.float64) * torch.logspace(-4, 0, 6, dtype=torch.float64)[:, None]
    gamma, floored = log_det_gamma(J)
    assert gamma == pytest.approx(0.5 * torch.linalg.slogdet(J @ J.T).logabsdet.item(), rel=1e-10)
    assert floored == 0
    singular = torch.cat([J, J[:1], torch.zeros(1, 30, dtype=torch.float64)])  # a repeated and a zero row
    gamma, floored = log_det_gamma(singular, floor=1e-12)
    assert math.isfinite(gamma) and floored == 2


# ----------------------------------------------------------------------------- local energy
def quadratic(P=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    H = (A + A.T) / 2 + P * torch.eye(P, dtype=torch.float64)
    b = torch.randn(P, generator=g, dtype=torch.float64)
    w = torch.randn(P, generator=g, dtype=torch.float64)
    return H, b, w, (lambda p: 0.5 * p["w"] @ H @ p["w"] + b @ p["w"])


@pytest.mark.parametrize("vectorize", [False, True])
def test_local_energy_matches_quadratic_closed_form(vectorize):
    H, b, w, loss = quadratic()
    sigmas = (0.0, 0.05, 0.1, 0.3)
    M = 400 if not vectorize else 3000
    mean, se = local_energy_curve(loss, {"w": w}, sigmas, M, torch.Generator().manual_seed(3),
                                  loss_many=vmap(loss) if vectorize else None, sample_chunk=500)
    exact = torch.tensor([s**2 / 2 * float((H.diagonal() * w**2).sum()) for s in sigmas], dtype=torch.float64)
    assert mean[0] == 0 and se[0] == 0
    assert (se[1:] > 0).all()
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)


def test_local_energy_vmap_equals_loop():
    *_, w, loss = quadratic()
    kw = dict(sigmas=(0.0, 0.1, 0.2), n_samples=7)
    loop = local_energy_curve(loss, {"w": w}, generator=torch.Generator().manual_seed(1), **kw)
    vec = local_energy_curve(loss, {"w": w}, generator=torch.Generator().manual_seed(1), loss_many=vmap(loss),
                             sample_chunk=3, **kw)
    for a, b in zip(loop, vec):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_local_energy_metric_zero_at_sigma_zero_and_reproducible():
    data = toy_data()
    model = toy_model("resnet1d", data, width=2)
    options = LocalEnergyOptions(sigmas=(0.0, 0.1, 0.2), sigma_value=0.03, n_samples=5, n_examples=30)
    assert options.grid == (0.0, 0.03, 0.1, 0.2)  # sigma_value added to the grid
    a = local_energy(model, data, options, torch.Generator().manual_seed(7))
    b = local_energy(model, data, options, torch.Generator().manual_seed(7))
    c = local_energy(model, data, options, torch.Generator().manual_seed(8))
    assert a == b and a != c
    for split in ("train", "test"):
        for q in ("local_energy", "local_energy_se", "local_energy_err", "local_energy_err_se"):
            assert a[f"{split}/{q}@0"] == 0.0
        assert a[f"{split}/local_energy"] == a[f"{split}/local_energy@0.03"]
        assert a[f"{split}/local_energy_se@0.2"] > 0  # an untrained model is no minimum: dE may have any sign
    assert LocalEnergyOptions().batching == "loop"
    for batching in ("vmap", "ensemble"):  # samples by vmap, as one ensemble model: the loop's values
        other = local_energy(model, data, dataclasses.replace(options, batching=batching, sample_chunk=2),
                             torch.Generator().manual_seed(7))
        assert other.keys() == a.keys()
        for k in a:
            assert other[k] == pytest.approx(a[k], rel=1e-9, abs=1e-12), (batching, k)


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_local_energy_ensemble_loss_equals_each_perturbed_model(arch):
    """`ensemble_loss_many`: K perturbed parameter sets evaluated as one ensemble give each set's own
    loss and error, as `split_loss_fn` computes them model by model."""
    data = toy_data()
    model = toy_model(arch, data, width=3).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    sets = [{n: p * (1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)) for n, p in params.items()}
            for _ in range(4)]
    stacked = {n: torch.stack([s_[n] for s_ in sets]) for n in params}
    got = ensemble_loss_many(model, data.train, 7)(stacked)
    one = split_loss_fn(model, data.train, 7)
    want = torch.stack([one(s_) for s_ in sets]).to(got.dtype)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- nrs
def test_sample_neighbour_radius_and_determinism():
    params = {"a": torch.randn(3, 4, dtype=torch.float64), "zero": torch.zeros(5), "b": torch.randn(7)}
    n1 = sample_neighbour(params, 0.1, torch.Generator().manual_seed(0))
    n2 = sample_neighbour(params, 0.1, torch.Generator().manual_seed(0))
    for name, w in params.items():
        assert torch.equal(n1[name], n2[name]) and n1[name].dtype == w.dtype
        assert float((n1[name] - w).norm()) == pytest.approx(0.1 * float(w.norm()), rel=1e-6)
    assert torch.equal(n1["zero"], params["zero"])
    w = torch.randn(4, requires_grad=True)
    (sample_neighbour({"w": w}, 0.5, torch.Generator())["w"] ** 2).sum().backward()
    assert w.grad is not None  # differentiable w.r.t. the parameters


def test_kl_divergence_definition():
    g = torch.Generator().manual_seed(0)
    zp, zq = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    p, q = zp.softmax(-1), zq.softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(kl_divergence(zp, zq), want, rtol=1e-12, atol=1e-14)
    assert kl_divergence(zp, zp) == 0 and kl_divergence(zp, zq) > 0


def test_nrs_zero_at_radius_zero_and_increasing():
    data = toy_data()
    model = toy_model("resnet1d", data, width=2)
    values = [nrs(model, data, NRSOptions(rho=rho, n_neighbours=4), torch.Generator().manual_seed(2))
              for rho in (0.0, 0.01, 0.05, 0.2)]
    for split in ("train", "test"):
        assert values[0][f"{split}/nrs"] == 0.0 and values[0][f"{split}/nrs_se"] == 0.0
        curve = [v[f"{split}/nrs"] for v in values]
        assert all(a < b for a, b in zip(curve, curve[1:])), curve


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name,bad", BAD_OPTIONS)
def test_out_of_range_options_raise_spec_error(name, bad):
    with pytest.raises(SpecError, match=f"metric_options.{name}"):
        METRICS[name].options(**bad)


def test_fisher_chunk_size_checked_only_where_used():
    """chunk_size splits batches only with batchnorm="train"; in eval mode any batch size is allowed."""
    assert FisherOptions(batch_size=12).batch_size == 12
    assert FisherOptions(batch_size=12, batchnorm="train", chunk_size=4).chunk_size == 4
    with pytest.raises(SpecError, match="chunk_size"):
        FisherOptions(batch_size=12, batchnorm="train")


@pytest.mark.parametrize("name", FLATNESS)
def test_options_round_trip_through_json(name):
    options = METRICS[name].options()
    again = METRICS[name].options(**json.loads(json.dumps(dataclasses.asdict(options))))
    assert again == options


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
@pytest.mark.parametrize("name", FLATNESS)
def test_registry_entry_returns_finite_floats_and_leaves_model_unchanged(name, arch):
    data = toy_data(dtype=torch.float32)
    model = toy_model(arch, data, width=2, dtype=torch.float32)
    model.train()
    model.stem.eval() if arch == "resnet1d" else model.net[0].eval()  # a mixed train/eval state to restore
    before = snapshot(model)
    metric = METRICS[name]
    assert metric.kind == "single"
    values = metric.compute(model, data, metric.options(**SMALL_OPTIONS[name]), torch.Generator().manual_seed(0))
    assert_unchanged(model, before)
    assert values and all(isinstance(v, float) and math.isfinite(v) for v in values.values())
    scalars = {parse_key(k)[:2] for k in values if parse_key(k)[2] is None}
    for panel in metric.panels:
        assert (panel.split, panel.quantity) in scalars


def test_spec_carries_and_validates_flatness_options():
    from phasediagram.spec.experiment import ExperimentSpec

    spec = ExperimentSpec(metrics=FLATNESS, metric_options={k: dict(v) for k, v in SMALL_OPTIONS.items()})
    again = ExperimentSpec.from_dict(json.loads(spec.to_json()))
    for name in FLATNESS:
        assert metric_options(again, name) == metric_options(spec, name) == METRICS[name].options(**SMALL_OPTIONS[name])
    with pytest.raises(SpecError, match="metric_options.local_energy"):
        check(ExperimentSpec(metrics=("local_energy",), metric_options={"local_energy": {"n_samples": 0}}))
