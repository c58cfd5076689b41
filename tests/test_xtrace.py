"""XTrace (`phasediagram.numerics.xtrace`) against exact traces of dense float64 matrices with known spectra.

Each operator is A = U diag(lam) U^T with U a seeded random orthogonal matrix, used only through
v -> A v. The leave-one-out estimates are checked against a direct numpy computation (a QR of the
other k - 1 columns of A Omega for each i); the statistical checks run over fixed seeds, so they
are deterministic, and state their tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from phasediagram.numerics import linalg
from phasediagram.numerics.xtrace import probe_matrix, xtrace

from .test_linalg import counted, symmetric

N = 120
SEEDS = 40
FLAT = np.linspace(0.5, 1.5, N)
DECAYING = 10.0 * np.arange(1, N + 1, dtype=float) ** -1.5
MIXED = np.concatenate([[-10.0, 3.0, 2.5], np.linspace(-1.0, 1.0, N - 3)])  # a dominant negative eigenvalue
SPECTRA = {"flat": FLAT, "decaying": DECAYING, "mixed-sign": MIXED}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leave_one_out(a: np.ndarray, omega: np.ndarray, normalize: bool) -> np.ndarray:
    """t_i = tr(Q_i^T A Q_i) + scale_i omega_i^T P_i A P_i omega_i with Q_i = orth(A Omega without column i),
    P_i = I - Q_i Q_i^T, scale_i = (n - k + 1) / ||P_i omega_i||^2 (normalized) or 1, computed directly."""
    n, k = omega.shape
    out = []
    for i in range(k):
        q = np.linalg.qr(a @ np.delete(omega, i, axis=1))[0]
        p = np.eye(n) - q @ q.T
        w = omega[:, i]
        scale = (n - k + 1) / float(w @ p @ w) if normalize else 1.0
        out.append(np.trace(q.T @ a @ q) + scale * float(w @ p @ a @ p @ w))
    return np.array(out)


def rms(values, exact: float) -> float:
    return math.sqrt(float(np.mean((np.asarray(values) - exact) ** 2)))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "rademacher"])
@pytest.mark.parametrize("name", ["decaying", "mixed-sign"])
def test_samples_are_the_leave_one_out_estimates(name, normalize):
    """The k x k formulas from one QR give each t_i of the direct leave-one-out computation (float64 rounding)."""
    a = symmetric(SPECTRA[name], seed=1)
    res = xtrace(counted(a), N, 24, gen(7), normalize=normalize)
    omega = probe_matrix(N, 12, gen(7), normalize).numpy()
    expected = leave_one_out(a.numpy(), omega, normalize)
    scale = float(np.abs(SPECTRA[name]).sum())
    np.testing.assert_allclose(res.samples, expected, rtol=0, atol=1e-10 * scale)
    assert res.value == pytest.approx(float(expected.mean()), abs=1e-10 * scale)
    assert res.stderr == pytest.approx(float(expected.std(ddof=1)) / math.sqrt(12), rel=1e-8, abs=1e-12 * scale)


def test_normalized_probes_lie_on_the_sphere_and_give_multiples_of_identity_exactly():
    """||omega_i||^2 = n; for A = c I each t_i = c (k - 1) + c (n - k + 1) = c n, whatever the probes."""
    omega = probe_matrix(N, 10, gen(3), normalize=True)
    np.testing.assert_allclose(torch.linalg.vector_norm(omega, dim=0).numpy() ** 2, N, rtol=1e-12)
    a = 2.5 * torch.eye(N, dtype=torch.float64)
    for seed in range(5):
        res = xtrace(counted(a), N, 20, gen(seed))
        np.testing.assert_allclose(res.samples, 2.5 * N, rtol=1e-10)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "rademacher"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_unbiased_with_a_calibrated_standard_error(name, normalize):
    """Over 40 seeds at 30 products: the mean is within 4 standard errors of the mean of the exact
    trace (unbiasedness), and the root-mean-square of the reported standard error is within a factor
    of 2 of the observed RMS error (it is a heuristic: the leave-one-out estimates share probes)."""
    a = symmetric(SPECTRA[name])
    exact = float(a.trace())
    runs = [xtrace(counted(a), N, 30, gen(s), normalize=normalize) for s in range(SEEDS)]
    values = np.array([r.value for r in runs])
    assert abs(values.mean() - exact) <= 4 * values.std(ddof=1) / math.sqrt(SEEDS)
    reported = math.sqrt(float(np.mean([r.stderr ** 2 for r in runs])))
    assert 0.5 <= rms(values, exact) / reported <= 2.0


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "rademacher"])
def test_beats_hutchpp_at_equal_products_on_a_decaying_spectrum(normalize):
    """lambda_i = 10 i^-1.5: XTrace with 30 products has a smaller RMS error over 40 seeds than Hutch++
    with the same 30 (sketch 10, 10 probes) and than Hutchinson with 30 probes."""
    a = symmetric(DECAYING)
    exact = float(a.trace())
    mv = counted(a)
    xt = [xtrace(mv, N, 30, gen(s), normalize=normalize).value for s in range(SEEDS)]
    assert mv.calls == 30 * SEEDS
    plus = [linalg.hutchpp(counted(a), N, sketch=10, max_probes=10, tol=0.0, generator=gen(s)) for s in range(SEEDS)]
    assert all(p.n_products == 30 for p in plus)
    plain = [linalg.hutchinson(counted(a), N, max_probes=30, tol=0.0, generator=gen(s)).value for s in range(SEEDS)]
    assert rms(xt, exact) < rms([p.value for p in plus], exact) < rms(plain, exact)


def test_products_exact_trace_at_full_dimension_and_bad_budgets():
    a = symmetric(MIXED[:20])
    mv = counted(a)
    res = xtrace(mv, 20, 9, gen(0))
    assert res.n_products == mv.calls == 8 and len(res.samples) == 4
    mv = counted(a)
    full = xtrace(mv, 20, 20, gen(0))
    assert full.value == pytest.approx(float(a.trace()), rel=1e-12)
    assert full.n_products == mv.calls == 20 and full.stderr == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        xtrace(counted(a), 20, 1, gen(0))


def test_rank_deficient_operator_gives_its_exact_trace():
    """rank(A) = 3 < k = 10: range(Q) holds range(A), and tr(Q^T A Q) = tr(A) is returned."""
    lam = np.zeros(N)
    lam[:3] = [5.0, -2.0, 1.0]
    a = symmetric(lam, seed=2)
    res = xtrace(counted(a), N, 20, gen(4))
    assert res.value == pytest.approx(4.0, rel=1e-10)
    assert res.stderr == 0.0 and res.n_products == 20


def test_float32_vectors_agree_with_float64():
    a = symmetric(DECAYING)
    a32 = a.float()
    double = xtrace(counted(a), N, 30, gen(5))
    single = xtrace(lambda v: a32 @ v, N, 30, gen(5), dtype=torch.float32)
    assert single.value == pytest.approx(double.value, rel=1e-5)


def test_hessian_metric_option():
    """`xtrace_vectors` k adds trace_xtrace (2 k products of its own) to the `hessian` metric; the default adds
    nothing. MLP of 63 parameters, float64: with 2 k >= P it is the exact trace of the dense Hessian,
    with k = 10 within 5 of its standard errors of it."""
    from phasediagram.data.datasets import Split
    from phasediagram.metrics import METRICS, MetricData
    from phasediagram.models import families as models
    from phasediagram.numerics.hvp import HessianOperator

    torch.manual_seed(0)
    model = models.create("mlp", 4, (6,), 3).double()
    g = gen(2)
    x, y = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    data = MetricData(Split(x, y), Split(x, y), 3)
    exact = float(torch.trace(HessianOperator(model.eval(), x, y).dense()))
    metric = METRICS["hessian"]
    cheap = {"batch_size": None, "density_probes": 0, "trace_probes": 2, "lanczos_iters": 5}
    assert not any("xtrace" in k for k in metric.compute(model, data, metric.options(**cheap), gen(0)))
    full = metric.compute(model, data, metric.options(**cheap, xtrace_vectors=40), gen(0))
    assert full["train/trace_xtrace"] == pytest.approx(exact, rel=1e-10)
    assert full["train/hvp_trace_xtrace"] == 63 and full["train/trace_xtrace_stderr"] == 0.0
    part = metric.compute(model, data, metric.options(**cheap, xtrace_vectors=10), gen(0))
    assert part["train/hvp_trace_xtrace"] == 20
    assert abs(part["train/trace_xtrace"] - exact) <= 5 * part["train/trace_xtrace_stderr"]
