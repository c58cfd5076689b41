"""esd_alpha: the power-law fit against known exponents and a scipy reference of the Clauset-Shalizi-Newman rule,
the weight matrices of each layer kind, the metric on an MLP and a BatchNorm ResNet, its table rows, its options."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from phasediagram.analysis import correlations
from phasediagram.analysis.plots import further_panels
from phasediagram.analysis.table import COLUMNS, normalise
from phasediagram.errors import SpecError
from phasediagram.metrics import DIAGNOSTIC, METRICS, VALUE, key, row_kind
from phasediagram.metrics.esd_alpha import (
    ESDAlphaOptions,
    esd_alpha,
    fit_power_law,
    layer_eigenvalues,
    weight_layers,
    weight_matrices,
)
from phasediagram.models import families as models
from phasediagram.resolve import metric_options
from phasediagram.spec.experiment import Cell, ExperimentSpec

TOL = 1e-9  # float64 agreement between two computations of the same quantity


def pareto(n: int, alpha: float, seed: int, scale: float = 1.0) -> np.ndarray:
    """n draws of p(lambda) = (alpha - 1) scale^(alpha - 1) lambda^-alpha, lambda >= scale (inverse CDF)."""
    u = np.random.default_rng(seed).random(n)
    return scale * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def layer_with_spectrum(lam: np.ndarray, rows: int, seed: int) -> nn.Linear:
    """A Linear layer whose W (rows x len(lam)) = U diag(sqrt(lam)) V^T, so that eig(W^T W) = lam."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(lam), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    layer = nn.Linear(len(lam), rows, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(torch.from_numpy(np.sqrt(lam))) @ v.T)
    return layer


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_fit_recovers_the_exponent_of_a_synthetic_weight_spectrum(alpha):
    """400 eigenvalues with a Pareto tail of exponent alpha: the fitted alpha within 3 standard errors
    (alpha_hat - 1) / sqrt(n_tail) of the truth, from a tail of at least a quarter of the spectrum."""
    lam = pareto(400, alpha, seed=int(alpha * 10), scale=0.3)
    layer = layer_with_spectrum(lam, rows=480, seed=1)
    evals = layer_eigenvalues(layer)
    np.testing.assert_allclose(evals, np.sort(lam), rtol=1e-10)
    fit = fit_power_law(evals)
    assert fit.n_tail >= 100
    assert abs(fit.alpha - alpha) <= 3 * fit.stderr, (fit, alpha)


def scipy_reference_fit(x: np.ndarray, min_tail: int) -> tuple[float, float, float]:
    """The CSN rule from scipy: for each distinct candidate lambda_min leaving >= min_tail values, scipy's Pareto MLE
    with location 0 and scale lambda_min fixed, and scipy's one-sample KS statistic; the candidate of least D."""
    x = np.sort(x)
    best = None
    for xmin in np.unique(x):
        tail = x[x >= xmin]
        if len(tail) < min_tail:
            break
        b, _, _ = stats.pareto.fit(tail, floc=0, fscale=xmin)
        d = stats.kstest(tail, stats.pareto(b, scale=xmin).cdf).statistic
        if best is None or d < best[2]:
            best = (b + 1.0, xmin, d)
    return best


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_equals_a_scipy_reference_of_the_clauset_shalizi_newman_rule(seed):
    # a power-law tail above a bulk that is not one: lambda_min must be found, not taken as the smallest value
    x = np.concatenate([np.random.default_rng(seed).uniform(0.1, 1.0, 40), pareto(60, 3.2, seed=seed + 5)])
    fit = fit_power_law(x, min_tail=5)
    alpha, xmin, d = scipy_reference_fit(x, min_tail=5)
    assert fit.alpha == pytest.approx(alpha, rel=TOL)
    assert fit.lambda_min == xmin and fit.ks_distance == pytest.approx(d, abs=TOL)
    assert fit.n_tail == int((x >= xmin).sum()) and fit.lambda_min >= 0.5


def test_fit_is_scale_free_and_refuses_what_cannot_be_fitted():
    x = pareto(200, 2.5, seed=3)
    a, b = fit_power_law(x), fit_power_law(7.0 * x)
    assert b.alpha == pytest.approx(a.alpha, rel=TOL) and b.lambda_min == pytest.approx(7.0 * a.lambda_min, rel=TOL)
    assert fit_power_law(np.ones(50)) is None  # every tail constant: no finite alpha
    assert fit_power_law(x[:4], min_tail=5) is None
    assert fit_power_law(x[:5], min_tail=5).n_tail == 5


def test_weight_matrices_of_linear_and_convolution_layers():
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv1d(5, 6, 3).double(), nn.Conv2d(3, 4, (2, 2)).double()
    for conv, k in ((conv1, 3), (conv2, 4)):
        w = conv.weight.detach()
        slices = weight_matrices(conv, "slices")
        assert len(slices) == k and all(s.shape == w.shape[:2] for s in slices)
        flat = w.reshape(w.shape[0], -1).numpy()
        assert np.array_equal(weight_matrices(conv, "flatten")[0].numpy(), flat)
        pooled = np.concatenate([np.linalg.eigvalsh(s.numpy().T @ s.numpy())[-min(s.shape):] for s in slices])
        np.testing.assert_allclose(layer_eigenvalues(conv, "slices"), np.sort(pooled), rtol=1e-10)
        flat_evals = np.linalg.eigvalsh(flat @ flat.T)  # out <= in * k: out eigenvalues
        np.testing.assert_allclose(layer_eigenvalues(conv, "flatten"), np.sort(flat_evals), rtol=1e-10)
    linear = nn.Linear(7, 3)
    assert weight_matrices(linear)[0].shape == (3, 7) and len(layer_eigenvalues(linear)) == 3
    rank_one = nn.Linear(4, 6, bias=False).double()
    with torch.no_grad():
        rank_one.weight.copy_(torch.outer(torch.arange(1.0, 7.0), torch.ones(4)))
    assert len(layer_eigenvalues(rank_one)) == 1  # the numerical zeros are dropped


def reference_rows(model: nn.Module, options: ESDAlphaOptions) -> dict[str, float]:
    """The metric's rows from numpy eigenvalues (eigvalsh of each matrix's Gram) and the scipy reference fit."""
    out, alphas, weighted, skipped = {}, [], [], 0
    for index, (_, module) in enumerate(weight_layers(model)):
        mats = [m.numpy() for m in weight_matrices(module, options.conv)]
        evals = np.sort(np.concatenate([np.linalg.eigvalsh(m.T @ m)[-min(m.shape):] for m in mats]))
        if len(evals) < options.min_eigenvalues:
            skipped += 1
            continue
        alpha, _, _ = scipy_reference_fit(evals, options.min_tail)
        alphas.append(alpha)
        weighted.append(alpha * math.log10(evals[-1]))
        out[key("-", "esd_alpha_layer", index)] = alpha
    out.update({"-/esd_alpha": float(np.mean(alphas)), "-/esd_alpha_weighted": float(np.mean(weighted)),
                "-/esd_layers_skipped": float(skipped)})
    return out


@pytest.mark.parametrize("arch, width, skipped", [("mlp", 32, 0), ("resnet1d", 8, 2)])
def test_metric_on_an_mlp_and_a_batchnorm_resnet(arch, width, skipped):
    """resnet1d width 8: the stem (8 x 1 x 3: 3 eigenvalues) and the first shortcut (16 x 8 x 1: 8) are skipped."""
    torch.manual_seed(0)
    model = models.create(arch, width, (40,), 10).double()
    model.train()
    before = copy.deepcopy(model.state_dict())
    options = ESDAlphaOptions()
    out = esd_alpha(model, None, options, None)
    assert out == pytest.approx(reference_rows(model, options), rel=TOL)
    assert out["-/esd_layers_skipped"] == skipped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
    assert METRICS["esd_alpha"].compute(model, None, options, torch.Generator().manual_seed(5)) == out  # data-free
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in weight_layers(scaled):
            module.weight.mul_(10.0)  # lambda x 100: alpha unchanged, alpha-hat + 2 alpha per layer
    again = esd_alpha(scaled, None, options, None)
    assert again["-/esd_alpha"] == pytest.approx(out["-/esd_alpha"], rel=TOL)
    assert again["-/esd_alpha_weighted"] == pytest.approx(out["-/esd_alpha_weighted"] + 2 * out["-/esd_alpha"],
                                                          rel=TOL)


def test_every_layer_too_small_gives_only_the_count():
    torch.manual_seed(0)
    out = esd_alpha(models.create("mlp", 2, (40,), 10), None, ESDAlphaOptions(), None)
    assert out == {"-/esd_layers_skipped": 3.0}


def test_rows_reach_the_figure_and_the_correlations_as_their_kinds():
    """The two means are measurements with panels; per-layer rows (coordinates) and the count are not correlated."""
    assert row_kind("esd_alpha", "esd_alpha") == VALUE and row_kind("esd_alpha", "esd_alpha_layer") == VALUE
    assert row_kind("esd_alpha", "esd_layers_skipped") == DIAGNOSTIC
    rows = []
    for i, w in enumerate((2, 4, 8, 16)):
        cell = Cell(width=w, batch_size=64, lr=0.1, weight_decay=0.0)
        base = {"experiment": "e", "cell": cell.id, **cell.as_dict(), "seed": 0, "seed_b": None, "status": "ok"}
        values = [("loss_acc", "test", "acc", None, 50.0 + i), ("loss_acc", "train", "acc", None, 60.0),
                  ("esd_alpha", "-", "esd_alpha", None, 5.0 - i), ("esd_alpha", "-", "esd_alpha_weighted", None, 1.0 + i),
                  ("esd_alpha", "-", "esd_alpha_layer", 0.0, 3.0), ("esd_alpha", "-", "esd_layers_skipped", None, 4 - i)]
        rows += [{**base, "source": s, "split": sp, "metric": m, "coord": c, "value": v} for s, sp, m, c, v in values]
    df = normalise(pd.DataFrame(rows, columns=COLUMNS))
    assert {p.panel.quantity for p in further_panels(df) if p.source == "esd_alpha"} == {"esd_alpha",
                                                                                       "esd_alpha_weighted"}
    res = correlations.correlations(df, min_cells=3)
    allc = res[(res.group == "all") & (res.target == "test_acc")].set_index("quantity")
    assert {q for q in allc.index if q.startswith("esd")} == {"esd_alpha", "esd_alpha_weighted"}
    assert allc.loc["esd_alpha", "kendall_tau"] == pytest.approx(-1.0)
    assert allc.loc["esd_alpha_weighted", "kendall_tau"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [dict(min_eigenvalues=1), dict(min_eigenvalues=2.5), dict(min_eigenvalues=True),
                                 dict(min_tail=1), dict(min_tail="5"), dict(conv="fft"), dict(conv=None)])
def test_out_of_range_options_raise(bad):
    with pytest.raises(SpecError, match="metric_options.esd_alpha." + next(iter(bad))):
        ESDAlphaOptions(**bad)


def test_spec_accepts_the_metric_and_its_options():
    spec = ExperimentSpec(metrics=("esd_alpha",), metric_options={"esd_alpha": {"conv": "flatten", "min_tail": 8}})
    options = metric_options(spec, "esd_alpha")
    assert (options.conv, options.min_tail, options.min_eigenvalues) == ("flatten", 8, 10)
