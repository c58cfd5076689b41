"""Hessian-vector products and the `hessian` metric against dense float64 references.

The reference Hessian is `torch.func.hessian` of the mean cross-entropy as a function of the
flattened trainable parameters, with the model in eval mode (BatchNorm on running statistics).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.func import hessian as dense_hessian
from torch.nn import functional as F

from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS, MetricData
from phasediagram.metrics.hessian import (
    EIGENVECTOR_OPTIONS,
    HessianOptions,
    density_curve,
    density_figure,
    top_eigenvectors,
)
from phasediagram.models import families as models
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator, flatten, unflatten
from phasediagram.storage.layout import EIGENVECTORS_FILE
from phasediagram.storage.vectors import load_vectors

DT = torch.float64
# torch's own forward-mode AD loads TorchScript decompositions on first use and warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return models.create("mlp", 4, (6,), 3).to(DT)


def tiny_resnet() -> nn.Module:
    """resnet1d of width 2 (604 parameters) with non-trivial BatchNorm running statistics, in train mode."""
    torch.manual_seed(0)
    model = models.create("resnet1d", 2, (40,), 10).to(DT)
    g = seeded(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=DT))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DT))
            m.weight.data.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g, dtype=DT))
    return model.train()


def batch(n: int, shape: tuple[int, ...], classes: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def reference_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d^2/dtheta^2 of mean CE at the current parameters, eval mode, as a dense P x P float64 matrix."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = dict(model.named_buffers())
    was = model.training
    model.eval()

    def loss(flat):
        theta = dict(zip([n for n, _ in named], unflatten(flat, [p for _, p in named])))
        return F.cross_entropy(functional_call(model, (theta, buffers), (x,)), y)

    h = dense_hessian(loss)(flatten([p.detach() for _, p in named]))
    model.train(was)
    return h


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# (name, model factory, input shape, classes, batch size): the HVP test cases as data.
CASES = [("mlp", tiny_mlp, (6,), 3, 16), ("resnet1d", tiny_resnet, (40,), 10, 8)]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request):
    _, factory, shape, classes, n = request.param
    model = factory()
    x, y = batch(n, shape, classes)
    return model, x, y, reference_hessian(model, x, y)


# --------------------------------------------------------------------------- HVP
@pytest.mark.parametrize("method,chunk", [("double_backward", None), ("double_backward", 3), ("func", None),
                                          ("func", 5)])
def test_hvp_matches_dense_hessian(case, method, chunk):
    model, x, y, h = case
    flags = [m.training for m in model.modules()]
    op = HessianOperator(model, x, y, chunk_size=chunk, method=method)
    assert op.dim == h.shape[0]
    g = seeded(3)
    for _ in range(3):
        v = torch.randn(op.dim, generator=g, dtype=DT)
        assert rel_err(op.matvec(v), h @ v) < 1e-8
    assert op.n_products == 3
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("method,chunk", [("double_backward", None), ("double_backward", 3), ("func", None)])
@pytest.mark.parametrize("block", [1, 4, 16])
def test_matmat_is_the_dense_hessian_times_each_column(case, method, chunk, block):
    """H V in blocks of vectors (one batched backward per block on the cached graph, else column by column):
    the dense H V to 1e-10 for 7 columns (a ragged last block), float32 columns returned as float32, 7 products."""
    model, x, y, h = case
    op = HessianOperator(model, x, y, chunk_size=chunk, method=method)
    v = torch.randn(op.dim, 7, generator=seeded(4), dtype=DT)
    got = op.matmat(v, block=block)
    assert got.shape == v.shape and got.dtype == DT and op.n_products == 7
    assert rel_err(got, h @ v) < 1e-10
    assert op.matmat(v.float(), block=block).dtype == torch.float32
    assert op.matmat(v[:, :0]).shape == (op.dim, 0)


def test_hvp_uses_batchnorm_running_statistics():
    """In train mode BatchNorm would normalise by batch statistics: a different Hessian."""
    model = tiny_resnet()
    x, y = batch(8, (40,), 10)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=seeded(4), dtype=DT)
    eval_hv = HessianOperator(model, x, y).matvec(v)
    assert rel_err(eval_hv, reference_hessian(model, x, y) @ v) < 1e-8
    train_model = copy.deepcopy(model).train()
    params = list(train_model.parameters())
    grads = torch.autograd.grad(F.cross_entropy(train_model(x), y), params, create_graph=True)
    train_hv = flatten(torch.autograd.grad(grads, params, grad_outputs=unflatten(v, params)))
    assert rel_err(eval_hv, train_hv) > 1e-3


def test_hvp_logistic_regression_closed_form():
    """Binary logistic regression as 2-class CE with logits (0, w.x): H = (1/N) X^T diag(p(1-p)) X."""
    class Logistic(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = nn.Linear(d, 1, bias=False)

        def forward(self, x):
            s = self.w(x)
            return torch.cat([torch.zeros_like(s), s], dim=1)

    torch.manual_seed(0)
    model = Logistic(7).to(DT)
    x, y = batch(50, (7,), 2)
    p = torch.sigmoid(model.w(x)).squeeze(1).detach()
    exact = x.T @ (x * (p * (1 - p))[:, None]) / len(y)
    for method in ("double_backward", "func"):
        op = HessianOperator(model, x, y, method=method)
        assert rel_err(op.dense(), exact) < 1e-8


@pytest.mark.parametrize("method,chunk", [("double_backward", None), ("double_backward", 3), ("func", None)])
def test_gradient_matches_autograd(case, method, chunk):
    """`gradient()` is dL/dtheta of the mean cross-entropy in eval mode, from the cached graph or chunk by chunk."""
    model, x, y, _ = case
    named = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    exact = flatten(torch.autograd.grad(F.cross_entropy(model(x), y), named))
    model.train(was)
    op = HessianOperator(model, x, y, chunk_size=chunk, method=method)
    assert rel_err(op.gradient(), exact) < 1e-10
    assert op.n_products == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- estimators on a real Hessian
def test_lanczos_on_a_network_hessian(case):
    model, x, y, h = case
    exact = np.linalg.eigvalsh(h.numpy())
    n = h.shape[0]
    eigs = linalg.lanczos_eigs(HessianOperator(model, x, y), n, k=3, max_iter=n, tol=1e-10, generator=seeded())
    np.testing.assert_allclose(eigs.top, exact[::-1][:3], rtol=1e-6)
    assert eigs.largest_magnitude == pytest.approx(exact[np.argmax(np.abs(exact))], rel=1e-6)
    assert eigs.n_products < n


def test_trace_and_slq_on_a_network_hessian():
    """MLP Hessian (P = 63, rank 37): Hutch++ with a full sketch is exact; SLQ run to exhaustion of its
    Krylov space returns each distinct eigenvalue once (the null space as one node) and integrates
    f exactly: sum_i tau_i f(theta_i) = v^T f(H) v."""
    model = tiny_mlp()
    x, y = batch(16, (6,), 3)
    h = reference_hessian(model, x, y)
    n, op = h.shape[0], HessianOperator(model, x, y)
    exact = np.linalg.eigvalsh(h.numpy())
    atol = 1e-8 * np.abs(exact).max()
    assert linalg.hutchpp(op, n, sketch=n, generator=seeded()).value == pytest.approx(float(h.trace()), rel=1e-8)
    quad = linalg.slq(op, n, iters=n, generator=seeded(9))
    nodes = quad.nodes[0]
    assert np.abs(nodes[:, None] - exact[None, :]).min(1).max() < atol  # every node is an eigenvalue
    assert np.abs(exact[:, None] - nodes[None, :]).min(1).max() < atol  # every eigenvalue is a node
    assert len(nodes) == quad.n_products < n
    v = linalg.rademacher(n, seeded(9)) / math.sqrt(n)
    assert quad.integrate(np.exp) == pytest.approx(float(v @ torch.linalg.matrix_exp(h) @ v), rel=1e-10)


# --------------------------------------------------------------------------- the metric
def metric_data(n_train: int = 24) -> MetricData:
    x, y = batch(n_train, (40,), 10, seed=5)
    xt, yt = batch(8, (40,), 10, seed=6)
    return MetricData(Split(x, y), Split(xt, yt), 10)


FAST = dict(batch_size=16, top_k=3, lanczos_iters=60, trace_probes=20, hutchpp_sketch=5, density_iters=20,
            density_points=30)


@pytest.mark.parametrize("basis", ["krylov", "sketch"])
def test_metric_contract_through_the_registry(basis):
    metric = METRICS["hessian"]
    model = tiny_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    data = metric_data()
    fast = dict(FAST, hutchpp_basis=basis)
    out = metric.compute(model, data, metric.options(**fast), seeded(7))
    assert all(isinstance(k, str) and isinstance(v, float) and math.isfinite(v) for k, v in out.items())
    for q in ("top_eigenvalue", "top_abs_eigenvalue", "trace", "trace_hutchpp", "hvp_eig", "hvp_trace",
              "hvp_trace_hutchpp", "hvp_traces", "hvp_density", "eigenvalue@1", "eigenvalue@3"):
        assert f"train/{q}" in out
    # products of the Hutch++ basis: the sketch's 2 s made by the traces, or the SLQ run's, made before
    basis_products = 2 * FAST["hutchpp_sketch"] if basis == "sketch" else out["train/hvp_density"]
    made = 2 * FAST["hutchpp_sketch"] if basis == "sketch" else 0
    assert out["train/hvp_traces"] == max(out["train/hvp_trace"], out["train/hvp_trace_hutchpp"] - basis_products) \
        + made
    assert out["train/top_eigenvalue"] == out["train/eigenvalue@1"] >= out["train/eigenvalue@2"]
    assert out["train/hvp_density"] == 20
    t, phi = density_curve(out)
    assert len(t) == 30 and np.all(phi >= 0)
    assert np.trapezoid(phi, t) == pytest.approx(1.0, abs=0.05)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert metric.compute(model, data, metric.options(**fast), seeded(7)) == out


def test_metric_top_eigenvalue_matches_the_dense_hessian_of_its_batch():
    model = tiny_mlp()
    x, y = batch(30, (6,), 3, seed=8)
    data = MetricData(Split(x, y), Split(x, y), 3)
    opts = HessianOptions(batch_size=None, top_k=2, tol=1e-10, density_probes=0, trace_probes=400,
                          trace_tol=0.0, hutchpp_sketch=100)
    out = METRICS["hessian"].compute(model, data, opts, seeded())
    h = reference_hessian(model, x, y)
    exact = np.linalg.eigvalsh(h.numpy())
    assert out["train/top_eigenvalue"] == pytest.approx(exact[-1], rel=1e-6)
    assert out["train/eigenvalue@2"] == pytest.approx(exact[-2], rel=1e-6)
    assert out["train/trace_hutchpp"] == pytest.approx(float(h.trace()), rel=1e-8)  # sketch >= P: exact
    assert abs(out["train/trace"] - float(h.trace())) <= 4 * out["train/trace_stderr"]
    assert not any(k.startswith("train/density") for k in out)


def test_metric_krylov_hutchpp_exact_once_the_slq_run_exhausts_its_krylov_space():
    """MLP Hessian (P = 63, rank 37, distinct nonzero eigenvalues): an SLQ run of P steps stops when its
    Krylov space is exhausted; that space holds every eigenvector of a nonzero eigenvalue, so
    tr(Q^T H Q) = tr(H) and the Krylov Hutch++ trace is exact whatever the probes."""
    model = tiny_mlp()
    x, y = batch(16, (6,), 3)
    data = MetricData(Split(x, y), Split(x, y), 3)
    h = reference_hessian(model, x, y)
    opts = HessianOptions(batch_size=None, density_iters=h.shape[0], trace_probes=3, trace_tol=0.0)
    out = METRICS["hessian"].compute(model, data, opts, seeded(4))
    assert out["train/hvp_density"] < h.shape[0]
    assert out["train/trace_hutchpp"] == pytest.approx(float(h.trace()), rel=1e-8)
    assert out["train/hvp_trace_hutchpp"] == out["train/hvp_density"] + 3 and out["train/hvp_traces"] == 3


@pytest.mark.parametrize("rule", ["gap", "residual", "change"])
def test_metric_eig_rules_and_starts_meet_tol(rule):
    """Every stopping rule, from the gradient-mixed and from a random start, is within tol of the dense top
    eigenvalue of its batch; the gradient start needs no more products than the random one."""
    model = tiny_resnet()
    x, y = batch(30, (40,), 10, seed=8)
    data = MetricData(Split(x, y), Split(x, y), 10)
    exact = np.linalg.eigvalsh(reference_hessian(model, x, y).numpy())[-1]
    used = {}
    for start in ("gradient", "random"):
        opts = HessianOptions(batch_size=None, tol=1e-4, eig_rule=rule, eig_start=start, trace_probes=2,
                              hutchpp_sketch=1, density_probes=0)
        out = METRICS["hessian"].compute(model, data, opts, seeded(3))
        assert out["train/top_eigenvalue"] == pytest.approx(exact, rel=1e-4)
        assert out["train/eig_converged"] == 1.0
        used[start] = out["train/hvp_eig"]
    assert used["gradient"] <= used["random"]


def test_metric_defaults_gap_rule_and_slq_start():
    opts = HessianOptions()
    assert (opts.eig_rule, opts.eig_start) == ("gap", "slq")


@pytest.mark.parametrize("top_k", [1, 3])
def test_metric_slq_start_continues_the_density_run(top_k):
    """eig_start "slq": Lanczos from the SLQ run's top Ritz vectors meets tol against the dense top_k
    eigenvalues, with fewer products of its own than the gradient start; hvp_eig counts the SLQ run's
    products plus its own. Without a density it is the gradient start, value for value."""
    model = tiny_resnet()
    x, y = batch(30, (40,), 10, seed=8)
    data = MetricData(Split(x, y), Split(x, y), 10)
    exact = np.linalg.eigvalsh(reference_hessian(model, x, y).numpy())[::-1][:top_k]
    common = dict(batch_size=None, top_k=top_k, tol=1e-6, trace_probes=2, hutchpp_sketch=1, density_iters=15)
    own = {}
    for start in ("slq", "gradient"):
        out = METRICS["hessian"].compute(model, data, HessianOptions(eig_start=start, **common), seeded(3))
        assert [out[f"train/eigenvalue@{i}"] for i in range(1, top_k + 1)] == pytest.approx(exact, rel=1e-5)
        assert out["train/eig_converged"] == 1.0
        own[start] = out["train/hvp_eig"] - (out["train/hvp_density"] if start == "slq" else 0)
    assert 1 <= own["slq"] < own["gradient"]
    no_density = {s: METRICS["hessian"].compute(model, data, HessianOptions(eig_start=s, density_probes=0, **common),
                                                seeded(3)) for s in ("slq", "gradient")}
    assert no_density["slq"] == no_density["gradient"]


def test_metric_on_a_float32_model_agrees_with_float64():
    model = tiny_mlp()
    x, y = batch(30, (6,), 3, seed=8)
    opts = HessianOptions(top_k=2, tol=1e-6, trace_probes=30, density_probes=0)
    out64 = METRICS["hessian"].compute(model, MetricData(Split(x, y), Split(x, y), 3), opts, seeded())
    out32 = METRICS["hessian"].compute(model.float(), MetricData(Split(x.float(), y), Split(x.float(), y), 3), opts,
                                       seeded())
    for q in ("top_eigenvalue", "eigenvalue@2", "trace", "trace_hutchpp"):
        assert out32[f"train/{q}"] == pytest.approx(out64[f"train/{q}"], rel=1e-4)


def test_metric_returns_nan_for_a_diverged_model():
    model = tiny_mlp()
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    x, y = batch(10, (6,), 3)
    out = METRICS["hessian"].compute(model, MetricData(Split(x, y), Split(x, y), 3), HessianOptions(**FAST), seeded())
    assert out and all(math.isnan(v) for v in out.values())


@pytest.mark.parametrize("field,value", [
    ("lanczos_iters", 0), ("top_k", 0), ("lanczos_iters", 2), ("tol", 0.0), ("tol", -1e-3), ("tol", math.nan),
    ("trace_probes", 0), ("trace_tol", -0.1), ("trace_rule", "mean"), ("hutchpp_sketch", -1), ("hutchpp_basis", "qr"),
    ("density_iters", 0), ("density_probes", -1), ("density_points", 1), ("density_sigma", 0.0), ("batch_size", 0), ("chunk_size", 0),
    ("hvp", "finite_differences"), ("top_k", True), ("batch_size", 2.5), ("eig_rule", "power"),
    ("eig_start", "ones"),
])
def test_options_out_of_range_raise_spec_error(field, value):
    kwargs = {"top_k": 3} if field == "lanczos_iters" and value == 2 else {}
    with pytest.raises(SpecError, match=f"metric_options.hessian.{field}"):
        HessianOptions(**{**kwargs, field: value})


def test_default_options_are_the_reference_settings():
    """The reference's batch, Lanczos budget and tolerance; the trace stops at a 2 % relative standard error
    within 200 probes (the reference's relative-change rule, tol 1e-3, 100 probes, is trace_rule="change")."""
    opts = HessianOptions()
    assert (opts.batch_size, opts.lanczos_iters, opts.tol, opts.trace_probes) == (200, 100, 1e-3, 200)
    assert (opts.trace_rule, opts.trace_tol, opts.hutchpp_basis, opts.eig_start) == ("stderr", 0.02, "krylov", "slq")


def test_density_figure_from_a_result_and_from_a_table(tmp_path):
    pd = pytest.importorskip("pandas")
    out = METRICS["hessian"].compute(tiny_mlp(), MetricData(*[Split(*batch(12, (6,), 3))] * 2, 3),
                                     HessianOptions(**FAST), seeded())
    one = density_figure(out)
    assert len(one.axes) == 1 and len(one.axes[0].lines) == 1 and one.axes[0].get_yscale() == "log"
    rows = [{"width": w, "batch_size": b, "seed": s, "split": "train", "metric": "density", "coord": t,
             "value": v, "status": "ok", "source": "hessian"}
            for w in (4, 8) for b in (16,) for s in (0, 1) for t, v in zip(*density_curve(out))]
    grid = density_figure(pd.DataFrame(rows))
    assert len(grid.axes) == 2 and all(len(ax.lines) == 2 for ax in grid.axes)  # a panel per cell, a line per seed
    grid.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


# --------------------------------------------------------------------------- the metric at its defaults, any sign
class QuadraticLogit(nn.Module):
    """logits (-theta^T A theta / 2, 0, ..., 0) whatever the input. With every label != 0, at theta = 0
    the mean cross-entropy has gradient 0 and Hessian exactly -A / K (K classes): d CE / d z_0 = 1 / K there,
    and d z_0 / d theta = 0."""

    def __init__(self, a: torch.Tensor, classes: int = 3):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(len(a), dtype=DT))
        self.register_buffer("a", a)
        self.classes = classes

    def forward(self, x):
        z0 = (-0.5 * self.theta @ self.a @ self.theta).expand(len(x), 1)
        return torch.cat([z0, torch.zeros(len(x), self.classes - 1, dtype=x.dtype)], dim=1) + 0.0 * x[:, :1]


def quadratic(eigenvalues) -> nn.Module:
    """A QuadraticLogit whose Hessian at theta = 0 is Q diag(eigenvalues) Q^T (Q a seeded random rotation)."""
    lam = torch.as_tensor(eigenvalues, dtype=DT)
    q = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=seeded(4), dtype=DT))[0]
    return QuadraticLogit(-3.0 * q @ torch.diag(lam) @ q.T)


def tanh_mlp(seed: int) -> nn.Module:
    """A 4-6-3 tanh MLP whose tanh units sit at pre-activation ~1 (tanh'' < 0): for seeds 2, 7, 15 and 19 its
    cross-entropy Hessian has |lambda_min| > lambda_max (seed 2: -1.03 against 0.69), for seed 0 not."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        model[0].bias.fill_(1.0)
        model[0].weight.mul_(0.5)
        model[2].weight.mul_(3.0)
    return model


SIGNED_CASES = [  # (name, model factory, input dimension): negative, indefinite and positive dominance, BatchNorm
    ("negative_definite", lambda: quadratic(-torch.linspace(0.1, 5.0, 30)), 4),
    ("indefinite", lambda: quadratic(torch.cat([torch.linspace(-1.0, 2.0, 29), torch.tensor([-8.0])])), 4),
    ("few_distinct", lambda: quadratic(torch.tensor([3.0] * 10 + [-6.0] * 10 + [1.0] * 10)), 4),
    *[(f"tanh_saddle_{s}", lambda s=s: tanh_mlp(s), 4) for s in (2, 7, 15, 19)],
    ("tanh_positive", lambda: tanh_mlp(0), 4),
    ("resnet_batchnorm", tiny_resnet, 40),
]


def signed_data(dim: int) -> MetricData:
    x, y = batch(256, (dim,), 3, seed=11)
    y = 1 + y % 2  # labels 1 and 2, as QuadraticLogit needs (any labels serve the networks)
    return MetricData(Split(x, y), Split(x[:16], y[:16]), 3 if dim == 4 else 10)


@pytest.mark.parametrize("start", ["slq", "gradient", "random"])
@pytest.mark.parametrize("name,factory,dim", SIGNED_CASES, ids=[c[0] for c in SIGNED_CASES])
def test_signed_eigenvalues_at_the_defaults_against_the_dense_hessian(name, factory, dim, start):
    """At the shipped defaults (batch of 200, Lanczos tol 1e-3, SLQ start) and with the other starts,
    `top_eigenvalue` is lambda_max, `bottom_eigenvalue` lambda_min and `top_abs_eigenvalue` the signed
    eigenvalue of largest magnitude of the dense Hessian (torch.func.hessian, float64) of the same batch,
    each within tol * max|lambda|; every value is finite."""
    model, data = factory(), signed_data(dim)
    if name == "resnet_batchnorm":
        data = MetricData(Split(*batch(256, (40,), 10, seed=11)), Split(*batch(16, (40,), 10, seed=12)), 10)
    options = HessianOptions(eig_start=start, eig_rule="residual" if start == "random" else "gap")
    drawn = data.train.batch(options.batch_size, seeded(7))
    exact = np.linalg.eigvalsh(reference_hessian(model, drawn.x, drawn.y).numpy())
    out = METRICS["hessian"].compute(model, data, options, seeded(7))
    assert all(math.isfinite(v) for v in out.values())
    scale = np.abs(exact).max()
    assert out["train/top_eigenvalue"] == pytest.approx(exact[-1], abs=1e-3 * scale)
    assert out["train/bottom_eigenvalue"] == pytest.approx(exact[0], abs=1e-3 * scale)
    assert out["train/top_abs_eigenvalue"] == pytest.approx(exact[np.argmax(np.abs(exact))], abs=1e-3 * scale)
    if name.startswith(("negative", "indefinite", "tanh_saddle")):
        assert out["train/top_abs_eigenvalue"] < 0
        assert -out["train/top_abs_eigenvalue"] > abs(out["train/top_eigenvalue"])


@pytest.mark.parametrize("name,factory,dim", SIGNED_CASES, ids=[c[0] for c in SIGNED_CASES])
def test_traces_at_the_defaults_are_finite_and_within_their_error(name, factory, dim):
    """Hutch++ on the Krylov basis at the defaults: within 4 standard errors (or 1e-8 relative, where the
    basis holds the whole trace) of tr(H) of the dense Hessian, with a relative standard error <= 2 %
    (the default stopping rule); Hutchinson's standard error is finite and honest (within 4 of them)."""
    model, data = factory(), signed_data(dim)
    if name == "resnet_batchnorm":
        data = MetricData(Split(*batch(256, (40,), 10, seed=11)), Split(*batch(16, (40,), 10, seed=12)), 10)
    drawn = data.train.batch(200, seeded(7))
    exact = float(reference_hessian(model, drawn.x, drawn.y).trace())
    out = METRICS["hessian"].compute(model, data, HessianOptions(), seeded(7))
    for q in ("trace", "trace_stderr", "trace_hutchpp", "trace_hutchpp_stderr"):
        assert math.isfinite(out[f"train/{q}"]), q
    plus, plus_se = out["train/trace_hutchpp"], out["train/trace_hutchpp_stderr"]
    assert abs(plus - exact) <= 4 * plus_se + 1e-8 * abs(exact)
    probes = out["train/hvp_trace_hutchpp"] - out["train/hvp_density"]
    if name != "few_distinct":  # there the Krylov space is exhausted after 3 steps and holds little of the trace
        assert probes < HessianOptions().trace_probes
    if probes < HessianOptions().trace_probes:  # stopped by the rule, not by the cap
        assert plus_se <= 0.02 * abs(plus) + 1e-12
    if probes > 0:  # Hutchinson takes Hutch++'s probes, none beyond
        assert out["train/hvp_trace"] <= probes
    assert abs(out["train/trace"] - exact) <= 4 * out["train/trace_stderr"] + 1e-8 * abs(exact)


@pytest.mark.parametrize("rule", ["change", "stderr"])
def test_trace_stderr_is_finite_when_the_krylov_basis_holds_the_trace(rule):
    """Three distinct eigenvalues: the SLQ run exhausts its Krylov space after 3 steps, so the basis holds
    the trace up to the probe's own part and the first residual sample is ~0; each stopping rule still takes
    at least two probes, so the standard error is defined."""
    model, data = quadratic(torch.tensor([3.0] * 10 + [-6.0] * 10 + [1.0] * 10)), signed_data(4)
    out = METRICS["hessian"].compute(model, data, HessianOptions(trace_rule=rule, trace_tol=1e-3), seeded(3))
    assert math.isfinite(out["train/trace_hutchpp_stderr"]) and math.isfinite(out["train/trace_stderr"])
    assert abs(out["train/trace_hutchpp"] + 20.0) <= 4 * out["train/trace_hutchpp_stderr"]


# --------------------------------------------------------------------------- eigenvectors
def eigen_case() -> tuple[nn.Module, MetricData, np.ndarray, np.ndarray]:
    """A 10-8-8-3 ReLU MLP (187 parameters, indefinite Hessian) on 40 examples, with numpy's eigh of its
    dense Hessian (torch.autograd.functional.hessian over the parameter tensors, blocks assembled, float64)."""
    torch.manual_seed(0)
    model = models.create("mlp", 8, (10,), 3).to(DT)
    x, y = batch(40, (10,), 3)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def loss(*tensors):
        return F.cross_entropy(functional_call(model, dict(zip(names, tensors)), (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, params)
    dense = torch.cat([torch.cat([blocks[i][j].reshape(a.numel(), b.numel()) for j, b in enumerate(params)], 1)
                       for i, a in enumerate(params)], 0)
    values, vectors = np.linalg.eigh(dense.numpy())
    return model, MetricData(Split(x, y), Split(x, y), 3), values, vectors


def test_top_and_bottom_eigenvectors_match_the_dense_eigenvectors():
    """The top 3 and bottom 2 (negative) Ritz pairs equal numpy's eigenpairs of the dense Hessian: values
    within 1e-9, vectors up to sign within 1e-6 in norm (the residual rule at tol 1e-8 bounds
    sin angle <= r / gap ~ 1e-7 here), after fewer products than parameters. The vectors are unit norm,
    orthogonal (1e-12), float64, signed with their largest entry positive, and split per parameter."""
    model, data, values, vectors = eigen_case()
    options = dataclasses.replace(EIGENVECTOR_OPTIONS, batch_size=None, tol=1e-8)
    for bottom, k in ((False, 3), (True, 2)):
        pairs = top_eigenvectors(model, data, k, options, seeded(1), bottom=bottom)
        idx = np.arange(k) if bottom else np.arange(len(values) - 1, len(values) - 1 - k, -1)
        assert pairs.vectors.dtype == DT and pairs.vectors.shape == (k, len(values))
        assert pairs.converged and pairs.n_products < len(values)
        np.testing.assert_allclose(pairs.values, values[idx], rtol=0, atol=1e-9)
        got = pairs.vectors.numpy()
        for i, j in enumerate(idx):
            u = vectors[:, j]
            assert min(np.linalg.norm(got[i] - u), np.linalg.norm(got[i] + u)) < 1e-6
            assert got[i][np.argmax(np.abs(got[i]))] > 0
            gap = np.delete(np.abs(values - pairs.values[i]), j).min()
            assert np.linalg.norm(got[i] - np.sign(got[i] @ u) * u) <= 2 * pairs.residuals[i] / gap + 1e-12
        np.testing.assert_allclose(got @ got.T, np.eye(k), rtol=0, atol=1e-12)
        per_parameter = pairs.tensors(0)
        assert [tuple(t.shape) for t in per_parameter.values()] == [tuple(p.shape) for p in model.parameters()]
        assert torch.equal(flatten(list(per_parameter.values())), pairs.vectors[0])
    assert values[0] < 0 < values[-1]


def test_top_eigenvectors_refuse_more_vectors_than_lanczos_steps():
    torch.manual_seed(0)
    model = models.create("mlp", 8, (10,), 3).to(DT)
    data = MetricData(Split(*batch(40, (10,), 3)), Split(*batch(8, (10,), 3)), 3)
    with pytest.raises(ValueError, match="k must be in"):
        top_eigenvectors(model, data, 11, dataclasses.replace(EIGENVECTOR_OPTIONS, lanczos_iters=10))


def test_the_metric_saves_its_top_eigenvectors_and_they_match_the_dense_eigenvectors(tmp_path):
    """With `save_eigenvectors`, eigenvectors.npz in the state folder holds the top_k Ritz vectors (unit norm,
    float64, shaped per parameter, largest entry positive) and their Ritz values, equal to the rows' eigenvalues;
    on the indefinite MLP at tol 1e-10 they are the dense Hessian's eigenvectors up to sign within 1e-5."""
    model, data, values, vectors = eigen_case()
    options = HessianOptions(batch_size=None, top_k=2, tol=1e-10, eig_rule="residual", density_probes=0,
                             trace_probes=10, save_eigenvectors=True)
    out = METRICS["hessian"].compute(model, dataclasses.replace(data, state_dir=tmp_path / "s"), options, seeded(3))
    groups, saved_values = load_vectors(tmp_path / "s" / EIGENVECTORS_FILE)
    assert sorted(groups) == ["top1", "top2"] and saved_values == {"top1": out["train/eigenvalue@1"],
                                                                    "top2": out["train/eigenvalue@2"]}
    for i, group in enumerate(("top1", "top2")):
        assert [a.shape for a in groups[group].values()] == [tuple(p.shape) for p in model.parameters()]
        assert all(a.dtype == np.float64 for a in groups[group].values())
        got = np.concatenate([a.ravel() for a in groups[group].values()])
        u = vectors[:, len(values) - 1 - i]
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-12) and got[np.argmax(np.abs(got))] > 0
        assert min(np.linalg.norm(got - u), np.linalg.norm(got + u)) < 1e-5
    assert METRICS["hessian"].compute(model, data, options, seeded(3)) == out  # no state folder: nothing written


def test_grouped_seeds_save_each_seeds_own_eigenvectors(tmp_path):
    """`hessian_seeds` (the products of a cell's BatchNorm resnets in lockstep) writes each seed's file in its
    own state folder, equal to the file the seed-by-seed metric writes (1e-6), and its top vector is an
    eigenvector of that seed's Hessian: ||H v - theta v|| <= 1e-3 theta."""
    models_ = [tiny_resnet() for _ in range(2)]
    with torch.no_grad():
        for p in models_[1].parameters():
            p.mul_(1.1)
    data = metric_data()
    options = HessianOptions(**{**FAST, "top_k": 1, "tol": 1e-6, "eig_rule": "residual"}, save_eigenvectors=True)
    dirs = [tmp_path / f"grouped{s}" for s in range(2)]
    METRICS["hessian"].compute_seeds(models_, [dataclasses.replace(data, state_dir=d) for d in dirs], options,
                                     [seeded(10 + s) for s in range(2)])
    for s, model in enumerate(models_):
        alone = tmp_path / f"alone{s}"
        METRICS["hessian"].compute(model, dataclasses.replace(data, state_dir=alone), options, seeded(10 + s))
        (grouped, g_values), (single, s_values) = (load_vectors(d / EIGENVECTORS_FILE) for d in (dirs[s], alone))
        assert g_values["top1"] == pytest.approx(s_values["top1"], rel=1e-6)
        v = np.concatenate([a.ravel() for a in grouped["top1"].values()])
        w = np.concatenate([a.ravel() for a in single["top1"].values()])
        assert np.linalg.norm(v - w) < 1e-6
        batch_ = data.train.batch(FAST["batch_size"], seeded(10 + s))
        h = reference_hessian(model, batch_.x, batch_.y).numpy()
        assert np.linalg.norm(h @ v - g_values["top1"] * v) <= 1e-3 * abs(g_values["top1"])


# --------------------------------------------------------------------------- a parameter the forward never uses
class Spare(nn.Module):
    """The mlp family with a spare linear layer the forward never uses (e.g. a head left from pretraining)."""

    def __init__(self, width: int, n_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.body = models.create("mlp", width, input_shape, n_classes)
        self.spare = nn.Linear(3, 2)

    def forward(self, x):
        return self.body(x)


def make_spare(width, n_classes, input_shape):
    return Spare(width, n_classes, input_shape)


@pytest.mark.parametrize("method,chunk", [("double_backward", None), ("double_backward", 3), ("func", None)])
def test_an_unused_parameter_has_zero_gradient_and_zero_hessian_rows(method, chunk):
    """H of a model with an unused parameter equals the dense reference, whose rows and columns of that
    parameter are 0 (the loss does not depend on it), and so does its gradient; matmat too."""
    torch.manual_seed(0)
    model = Spare(4, 3, (6,)).to(DT)
    x, y = batch(16, (6,), 3)
    exact = reference_hessian(model, x, y)
    spare = slice(exact.shape[0] - 8, exact.shape[0])  # spare's 3 x 2 weight and 2 biases come last
    assert not exact[spare].any() and not exact[:, spare].any()
    op = HessianOperator(model, x, y, chunk_size=chunk, method=method)
    assert rel_err(op.dense(), exact) < 1e-10
    assert rel_err(op.matmat(torch.eye(op.dim, dtype=DT)[:, :9]), exact[:, :9]) < 1e-10
    assert not op.gradient()[spare].any()


def test_hessian_grad_norm_and_loss_slice_measure_a_plugged_model_with_an_unused_parameter(root):
    """A plug-in family with a spare layer passes the spec check, trains, and the metrics that
    differentiate the loss measure it (the spare layer's derivatives are 0)."""
    from phasediagram import Study
    from phasediagram.execution.executors import InProcess
    from phasediagram.resolve import check
    from phasediagram.spec.experiment import ExperimentSpec

    stages = ("hessian", "grad_norm", "loss_slice")
    spec = check(ExperimentSpec(name="spare", arch=f"{__name__}:make_spare", widths=(4,), batch_sizes=(256,),
                                seeds=(0,), epochs=1, train_fractions=(0.25,), metrics=stages,
                                metric_options={s: dict(METRICS[s].test_options) for s in stages}))
    study = Study(spec, root)
    reports = study.run(executor=InProcess())
    assert not any(r.failed for r in reports.values()), {s: r.failed for s, r in reports.items()}
    df = study.table()
    for stage in stages:
        rows = df[df.source == stage]
        assert len(rows) and (rows.status == "ok").all() and np.isfinite(rows.value.astype(float)).any(), stage


def test_top_eigenvectors_takes_tensors_pairs_datasets_and_dataloaders():
    """(x, y) tensors, numpy arrays, a TensorDataset and a DataLoader of it give the eigenpairs of MetricData."""
    model = tiny_mlp()
    x, y = batch(48, (6,), 3)
    reference = top_eigenvectors(model, MetricData(Split(x, y), Split(x, y), 3), k=2)
    dataset = torch.utils.data.TensorDataset(x, y)
    for data in ((x, y), (x.numpy(), y.numpy()), dataset, torch.utils.data.DataLoader(dataset, batch_size=10)):
        pairs = top_eigenvectors(model, data, k=2)
        np.testing.assert_array_equal(pairs.values, reference.values)
        assert torch.equal(pairs.vectors, reference.vectors)
    pairs = top_eigenvectors(model, (x.float(), y), k=2)  # inputs take the model's dtype
    np.testing.assert_allclose(pairs.values, reference.values, rtol=1e-6)
    with pytest.raises(TypeError, match="data must be"):
        top_eigenvectors(model, 3.0, k=1)
