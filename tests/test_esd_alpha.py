"""esd_alpha: the power-law fit against known exponents and a hand-written float64 reference of WeightWatcher
0.7.7's rule (small-N rule included), the matrices, conv scaling and skip rule of each layer kind, the metric on an
MLP and a BatchNorm ResNet, against the real weightwatcher package when it is installed, its table rows, its options."""

from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from phasediagram.analysis import correlations
from phasediagram.analysis.plots import further_panels
from phasediagram.analysis.table import COLUMNS, normalise
from phasediagram.errors import SpecError
from phasediagram.metrics import DIAGNOSTIC, METRICS, VALUE, key, row_kind
from phasediagram.metrics.esd_alpha import (
    ESDAlphaOptions,
    counted_shape,
    esd_alpha,
    fit_power_law,
    layer_eigenvalues,
    weight_layers,
    weight_matrices,
)
from phasediagram.models import families as models
from phasediagram.resolve import metric_options
from phasediagram.spec.experiment import Cell, ExperimentSpec

TOL = 1e-12  # float64 agreement between two computations of the same quantity
WW_TOL = 1e-4  # agreement with the weightwatcher package


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
    evals = layer_eigenvalues(layer_with_spectrum(lam, rows=480, seed=1))
    np.testing.assert_allclose(evals, np.sort(lam), rtol=1e-5)  # the weights are read in float32
    fit = fit_power_law(evals)
    assert fit.n_tail >= 100
    assert abs(fit.alpha - alpha) <= 3 * fit.stderr, (fit, alpha)


def reference_fit(values: np.ndarray) -> tuple[float, float, int] | None:
    """WeightWatcher 0.7.7's `WWFit` written out: (alpha, xmin, tail size) or None where it reports no real fit.

    Candidates xmin = x[i], i < n - 1 (0-based), tail x[i:] of m values; S = sum ln(tail / xmin); D the largest
    |1 - (tail / xmin)^(1 - alpha) - arange(m) / m|, 1 where not computed. n >= 20: alpha = 1 + m / S. n < 20: alpha
    = 1 + (m - 1) / S where m >= 8 and S > 1e-12; if there is no such candidate, the whole sample when its S >
    1e-12. The constructor takes the candidate of least D (the first); its alpha must be finite and > 1.
    """
    x = np.sort(values)
    n = len(x)
    alphas, ds = np.zeros(max(n - 1, 1)), np.ones(max(n - 1, 1))
    candidates = []
    for i in range(n - 1):
        s = float(np.sum(np.log(x[i:] / x[i])))
        if n >= 20 or (n - i >= 8 and s > 1e-12):
            candidates.append((i, s))
    if n < 20 and not candidates and n > 1 and np.sum(np.log(x / x[0])) > 1e-12:
        candidates = [(0, float(np.sum(np.log(x / x[0]))))]
    for i, s in candidates:
        m = n - i
        alphas[i] = 1.0 + (m if n >= 20 else m - 1) / s if s > 0 else math.inf
        if alphas[i] > 1:
            ds[i] = np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - alphas[i]) - np.arange(m) / m))
    best = int(np.argmin(ds))
    if n < 2 or not 1 < alphas[best] < math.inf:
        return None
    return float(alphas[best]), float(x[best]), n - best


def spectra() -> dict[str, np.ndarray]:
    """Fixed spectra: a power-law tail above a bulk that is not one, heavy and light tails, and around n = 20."""
    rng = np.random.default_rng(7)
    bulk_tail = np.concatenate([rng.uniform(0.1, 1.0, 60), pareto(40, 3.2, seed=5)])
    return {"bulk+tail 100": bulk_tail, "heavy 300": pareto(300, 2.2, seed=1, scale=0.01),
            "light 50": pareto(50, 6.0, seed=2), "n=20": bulk_tail[::5], "n=19": bulk_tail[:95:5],
            "n=10 small": bulk_tail[::10], "n=8 small": bulk_tail[::12][:8], "n=5 whole sample": bulk_tail[::20],
            "n=2": np.array([1.0, 2.0]), "ties": np.repeat(pareto(25, 3.0, seed=3), 2)}


@pytest.mark.parametrize("name", list(spectra()))
def test_fit_equals_a_reference_of_weightwatchers_rule(name):
    x = spectra()[name]
    fit, (alpha, xmin, m) = fit_power_law(x), reference_fit(x)
    assert fit.alpha == pytest.approx(alpha, rel=TOL) and (fit.lambda_min, fit.n_tail) == (xmin, m)


def test_small_n_rule_by_hand():
    """n = 2: the whole sample, alpha = 1 + (m - 1) / S = 1 + 1 / ln 2; n = 10: the bias-corrected MLE, not the MLE."""
    assert fit_power_law(np.array([1.0, 2.0])).alpha == pytest.approx(1.0 + 1.0 / math.log(2.0), rel=TOL)
    x = spectra()["n=10 small"]
    fit = fit_power_law(x)
    tail = np.sort(x)[-fit.n_tail:]
    assert fit.n_tail >= 8 and fit.alpha == pytest.approx(1.0 + (fit.n_tail - 1) / np.log(tail / tail[0]).sum(),
                                                          rel=TOL)
    big = fit_power_law(spectra()["n=20"])
    tail = np.sort(spectra()["n=20"])[-big.n_tail:]
    assert big.alpha == pytest.approx(1.0 + big.n_tail / np.log(tail / tail[0]).sum(), rel=TOL)


def test_fit_is_scale_free_and_refuses_what_cannot_be_fitted():
    x = pareto(200, 2.5, seed=3)
    a, b = fit_power_law(x), fit_power_law(8.0 * x)
    assert b.alpha == pytest.approx(a.alpha, rel=TOL) and b.lambda_min == 8.0 * a.lambda_min
    for degenerate in (np.ones(50), np.ones(12), np.ones(5), np.array([3.0]), np.zeros(0)):
        assert fit_power_law(degenerate) is None and reference_fit(degenerate) is None


def numpy_eigenvalues(w: np.ndarray) -> np.ndarray:
    """The min(w.shape) eigenvalues of w^T w (numpy, float64)."""
    return np.linalg.eigvalsh(w.T @ w)[-min(w.shape):]


def test_layer_eigenvalues_of_each_layer_kind():
    """Linear and Embedding: W; Conv2d: each kernel position's (out, in) slice, eigenvalues halved; Conv1d as the
    Conv2d (out, in, k, 1); the weights read in float32; BatchNorm and Conv3d not read."""
    torch.manual_seed(0)
    linear, embedding = nn.Linear(7, 3).double(), nn.Embedding(12, 5).double()
    conv1, conv2 = nn.Conv1d(5, 6, 3).double(), nn.Conv2d(3, 4, (2, 3)).double()
    for layer in (linear, embedding):
        w = layer.weight.detach().float().double().numpy()
        assert [m.shape for m in weight_matrices(layer)] == [w.shape]
        np.testing.assert_allclose(layer_eigenvalues(layer), np.sort(numpy_eigenvalues(w)), rtol=1e-10)
    for conv, positions in ((conv1, 3), (conv2, 6)):
        w = conv.weight.detach().float().double().numpy()
        slices = w.reshape(w.shape[0], w.shape[1], -1)
        assert [m.shape for m in weight_matrices(conv)] == [w.shape[:2]] * positions
        pooled = np.concatenate([0.5 * numpy_eigenvalues(slices[:, :, i]) for i in range(positions)])
        np.testing.assert_allclose(layer_eigenvalues(conv), np.sort(pooled), rtol=1e-10)
    model = nn.Sequential(linear, nn.BatchNorm1d(3), nn.Conv3d(2, 2, 2), conv1, embedding, conv2)
    assert [name for name, _ in weight_layers(model)] == ["0", "3", "4", "5"]


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(40, 10), (40, 10, 1)), (nn.Embedding(5, 9), (9, 5, 1)),
    (nn.Conv2d(3, 8, 3), (8, 3, 9)), (nn.Conv2d(8, 3, 3), (8, 3, 9)),  # odd kernel size: (max, min)
    (nn.Conv2d(3, 8, 2), (8, 3, 4)), (nn.Conv2d(8, 3, 2), (3, 8, 4)),  # even, out < in: (out, in)
    (nn.Conv2d(3, 1, (1, 5)), (1, 3, 5)),  # out + in < k_h + k_w: (out, in)
    (nn.Conv1d(3, 1, 7), (1, 3, 7)), (nn.Conv1d(1, 8, 3), (8, 1, 3)), (nn.Conv1d(8, 16, 1), (16, 8, 1)),
])
def test_counted_shape_is_weightwatchers(layer, shape):
    assert counted_shape(layer) == shape


def reference_rows(model: nn.Module, options: ESDAlphaOptions) -> dict[str, float]:
    """The metric's rows from numpy eigenvalues of each layer's float32 slices (halved for a convolution), the
    count rule of `counted_shape`, WeightWatcher's 1e-5 threshold and `reference_fit`."""
    out, alphas, weighted, skipped = {}, [], [], 0
    for index, (_, module) in enumerate(weight_layers(model)):
        n, m, rf = counted_shape(module)
        w = module.weight.detach().float().double().numpy()
        mats = [w] if w.ndim == 2 else [s for s in w.reshape(w.shape[0], w.shape[1], -1).transpose(2, 0, 1)]
        evals = np.sort(np.concatenate([numpy_eigenvalues(a) for a in mats])) * (1.0 if w.ndim == 2 else 0.5)
        fit = reference_fit(evals[evals > 1e-5]) if options.min_eigenvalues <= m * rf <= options.max_eigenvalues \
            else None
        if fit is None:
            skipped += 1
            continue
        alphas.append(fit[0])
        weighted.append(fit[0] * math.log10(evals[-1]))
        out[key("-", "esd_alpha_layer", index)] = fit[0]
    out.update({"-/esd_alpha": float(np.mean(alphas)), "-/esd_alpha_weighted": float(np.mean(weighted)),
                "-/esd_layers_skipped": float(skipped)})
    return out


@pytest.mark.parametrize("arch, width, skipped", [("mlp", 32, 0), ("resnet1d", 8, 1)])
def test_metric_on_an_mlp_and_a_batchnorm_resnet(arch, width, skipped):
    """mlp width 32: its head has 10 eigenvalues (the small-N rule); resnet1d width 8: the stem (8 x 1 x 3: 3
    eigenvalues) is skipped, the first shortcut (16 x 8 x 1: 8) fitted by the small-N rule."""
    torch.manual_seed(0)
    model = models.create(arch, width, (40,), 10)
    model.train()
    before = copy.deepcopy(model.state_dict())
    options = ESDAlphaOptions()
    out = esd_alpha(model, None, options, None)
    assert out == pytest.approx(reference_rows(model, options), rel=1e-10)
    assert out["-/esd_layers_skipped"] == skipped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
    assert METRICS["esd_alpha"].compute(model, None, options, torch.Generator().manual_seed(5)) == out  # data-free
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in weight_layers(scaled):
            module.weight.mul_(8.0)  # exact in float: lambda x 64, alpha unchanged, alpha-hat + log10(64) alpha per layer
    again = esd_alpha(scaled, None, options, None)
    assert again["-/esd_alpha"] == pytest.approx(out["-/esd_alpha"], rel=TOL)
    assert again["-/esd_alpha_weighted"] == pytest.approx(out["-/esd_alpha_weighted"]
                                                          + math.log10(64.0) * out["-/esd_alpha"], rel=TOL)


def test_every_layer_too_small_gives_only_the_count():
    torch.manual_seed(0)
    out = esd_alpha(models.create("mlp", 2, (40,), 10), None, ESDAlphaOptions(), None)
    assert out == {"-/esd_layers_skipped": 3.0}


def test_eigenvalue_limits_skip_layers():
    torch.manual_seed(0)
    model = models.create("mlp", 32, (40,), 10)  # 32, 32 and 10 eigenvalues
    assert esd_alpha(model, None, ESDAlphaOptions(min_eigenvalues=11), None)["-/esd_layers_skipped"] == 1.0
    assert esd_alpha(model, None, ESDAlphaOptions(max_eigenvalues=31), None)["-/esd_layers_skipped"] == 2.0
    assert esd_alpha(model, None, ESDAlphaOptions(max_eigenvalues=None), None) == esd_alpha(model, None,
                                                                                            ESDAlphaOptions(), None)


def as_conv2d(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Conv1d (out, in, k) replaced by the Conv2d (out, in, k, 1) of its weights."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv1d):
            conv = nn.Conv2d(module.in_channels, module.out_channels, (module.kernel_size[0], 1), bias=False)
            conv.weight.data = module.weight.data.unsqueeze(-1).clone()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, conv)
    return model


class Mixed(nn.Module):
    """Every layer kind and count case: an embedding, Conv1d, Conv2d whose WeightWatcher count differs from
    rf min(out, in) (4 x 1 x 2 x 2, 1 x 3 x 1 x 5), and a Linear. Never run forward: only its weights are read."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.conv1d = nn.Conv1d(24, 32, 3)
        self.shortcut = nn.Conv1d(32, 16, 1)
        self.even = nn.Conv2d(4, 1, 2)
        self.wide = nn.Conv2d(3, 1, (1, 5))
        self.conv2d = nn.Conv2d(16, 32, 3)
        self.head = nn.Linear(64, 10)


def weightwatcher_package():
    """The weightwatcher module, or a skip saying why there is none to compare with."""
    weightwatcher = pytest.importorskip("weightwatcher", reason="weightwatcher is not installed "
                                        "(requirements-dev.txt: weightwatcher==0.7.7, powerlaw==1.5, safetensors)")
    if weightwatcher.__version__ != "0.7.7":
        pytest.skip(f"weightwatcher {weightwatcher.__version__} is installed; the rule is 0.7.7's")
    return weightwatcher


def test_reference_fit_is_weightwatchers_own():
    """`reference_fit` equals weightwatcher's `WWFit` on every fixed spectrum; where it finds no fit, WWFit gives
    its placeholder alpha (0 or inf) or fails."""
    fit_class = importlib.import_module(weightwatcher_package().__name__ + ".WW_powerlaw").WWFit
    for x in [*spectra().values(), np.ones(50), np.ones(12), np.ones(5)]:
        with np.errstate(divide="ignore"):  # its alpha of a constant tail, m / 0
            ww = fit_class(x)
        expected = reference_fit(x)
        if expected is None:
            assert ww.alpha in (0.0, math.inf)
        else:
            assert (ww.alpha, ww.xmin) == pytest.approx(expected[:2], rel=TOL)


@pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")  # inside weightwatcher
@pytest.mark.parametrize("build", ["mlp", "resnet1d", "mixed"])
def test_equals_the_weightwatcher_package(build):
    """Per-layer alpha and the weighted alpha equal `WeightWatcher(model).analyze()` (weightwatcher 0.7.7,
    powerlaw 1.5, defaults) within 1e-4, on the same layers; WeightWatcher reads the Conv1d as Conv2d (out, in, k, 1)."""
    weightwatcher = weightwatcher_package()
    torch.manual_seed(0)
    model = Mixed() if build == "mixed" else models.create(build, 16, (40,), 10)
    details = weightwatcher.WeightWatcher(model=as_conv2d(model)).analyze()
    fitted = details[(details.status == "success") & (details.alpha > 0) & (details.alpha < math.inf)]
    out = esd_alpha(model, None, ESDAlphaOptions(), None)
    names = [name for name, _ in weight_layers(model)]
    ours = {names[int(k.split("@")[1])]: v for k, v in out.items() if "esd_alpha_layer@" in k}
    assert ours == pytest.approx(dict(zip(fitted.longname, fitted.alpha)), abs=WW_TOL)
    assert out["-/esd_alpha_weighted"] == pytest.approx(fitted.alpha_weighted.mean(), abs=WW_TOL)
    if build == "mixed":
        assert set(ours) == {"embed", "conv1d", "shortcut", "even", "wide", "conv2d", "head"}


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


@pytest.mark.parametrize("bad", [dict(min_eigenvalues=0), dict(min_eigenvalues=2.5), dict(min_eigenvalues=True),
                                 dict(max_eigenvalues=0), dict(max_eigenvalues="5"), dict(min_tail=5),
                                 dict(conv="slices")])
def test_out_of_range_and_removed_options_raise(bad):
    with pytest.raises((SpecError, TypeError), match=next(iter(bad))):
        ESDAlphaOptions(**bad)


def test_spec_accepts_the_metric_and_its_options():
    spec = ExperimentSpec(metrics=("esd_alpha",), metric_options={"esd_alpha": {"min_eigenvalues": 10,
                                                                                "max_eigenvalues": None}})
    options = metric_options(spec, "esd_alpha")
    assert (options.min_eigenvalues, options.max_eigenvalues) == (10, None)
    with pytest.raises(SpecError, match="min_tail"):
        metric_options(ExperimentSpec(metrics=("esd_alpha",), metric_options={"esd_alpha": {"min_tail": 5}}),
                       "esd_alpha")
