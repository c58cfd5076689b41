"""Linear CKA: exact identities in float64, the two formulas, the HSIC_1 and minibatch estimators against numpy
references and Kornblith et al.'s demo, batch accumulation, and the metric."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch

from phasediagram.data.datasets import Split, mixup
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS, MetricData, key
from phasediagram.metrics.cka import CKAAccumulator, CKAOptions, cka, linear_cka, linear_cka_feature, linear_cka_gram
from phasediagram.models import families as models
from phasediagram.resolve import check, metric_options
from phasediagram.spec.experiment import ExperimentSpec

cka_module = importlib.import_module("phasediagram.metrics.cka")  # `phasediagram.metrics.cka` is also a function
TOL = 1e-10  # float64 agreement between mathematically equal quantities

# (n examples, p features of X, q features of Y): features fewer than, equal to and more than examples
SHAPES = [(60, 5, 7), (40, 40, 3), (20, 50, 35)]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pair(n, p, q, seed=0):
    """X and a Y that shares structure with X (so CKA is strictly between 0 and 1)."""
    x = rand(n, p, seed=seed)
    y = torch.tanh(x @ rand(p, q, seed=seed + 1)) + 0.5 * rand(n, q, seed=seed + 2)
    return x, y


def reference_cka(x, y):
    """Dense reference: HSIC with the explicit centring matrix H = I - 11^T / n."""
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)))


def orthogonal(p, seed):
    q, r = torch.linalg.qr(rand(p, p, seed=seed))
    return q * torch.sign(torch.diagonal(r))


FORMS = [linear_cka, linear_cka_feature, linear_cka_gram]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_reference_and_lies_in_unit_interval(form, shape):
    x, y = pair(*shape)
    value = form(x, y)
    assert value == pytest.approx(reference_cka(x, y), abs=TOL)
    assert 0.0 < value < 1.0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_self_similarity_is_one(form, shape):
    x, _ = pair(*shape)
    assert form(x, x) == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_invariant_to_orthogonal_maps_isotropic_scaling_and_translation(form, shape):
    x, y = pair(*shape)
    base = form(x, y)
    qx, qy = orthogonal(x.shape[1], 10), orthogonal(y.shape[1], 11)
    assert form(x @ qx, y) == pytest.approx(base, abs=TOL)
    assert form(x @ qx, y @ qy) == pytest.approx(base, abs=TOL)
    assert form(3.7 * x, 0.02 * y) == pytest.approx(base, abs=TOL)
    assert form(x + 5.0, y - 2.0) == pytest.approx(base, abs=TOL)  # centring removes offsets


@pytest.mark.parametrize("form", FORMS)
def test_not_invariant_to_a_general_linear_map(form):
    x, y = pair(60, 5, 7)
    a = torch.diag(torch.logspace(0, 2, 5, dtype=torch.float64)) @ orthogonal(5, 3)  # invertible, cond 100
    assert torch.linalg.matrix_rank(a) == 5
    assert form(x @ a, x) < 0.9  # it was 1 before the map
    assert abs(form(x @ a, y) - form(x, y)) > 1e-2


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_symmetric(form, shape):
    x, y = pair(*shape)
    assert form(x, y) == pytest.approx(form(y, x), abs=TOL)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_feature_and_gram_forms_agree(shape, debiased):
    x, y = pair(*shape, seed=5)
    assert linear_cka_feature(x, y, debiased) == pytest.approx(linear_cka_gram(x, y, debiased), abs=TOL)


def dense_gram_cka(x, y, debiased):
    """The Gram form in float64 as a general product: K = X X^T, then H K H or the U-centring, dense."""
    def centre(k):
        n = len(k)
        if debiased:
            k = k - torch.diag(torch.diag(k))
            m = k.sum(0) / (n - 2)
            m = m - m.sum() / (2 * (n - 1))
            k = k - m[None, :] - m[:, None]
            return k - torch.diag(torch.diag(k))
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n
        return h @ k @ h

    x, y = x.double().flatten(1), y.double().flatten(1)
    k, l_ = centre(x @ x.T), centre(y @ y.T)
    return float((k * l_).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("layout", ["float32", "float64", "float64 strided"])
def test_wide_gram_form_equals_the_general_product_to_1e12(debiased, layout):
    """More features than examples (the Gram form; 5000 columns: a full and a partial column chunk):
    the symmetric update of K and the centring leave the value of the dense float64 computation."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(120, 5000, generator=g) + 0.3
    y = torch.tanh(x).add_(torch.randn(120, 5000, generator=g), alpha=0.5)
    if layout != "float32":
        x, y = x.double(), y.double()
    if layout == "float64 strided":
        x, y = x[:, ::2], y[:, ::2]
    value = linear_cka(x, y, debiased)
    assert cka_module.choose_form(x.shape[1], y.shape[1], len(x)) == "gram"
    assert abs(value - dense_gram_cka(x, y, debiased)) <= 1e-12


def test_gram_is_exactly_symmetric_and_equals_x_xt():
    x = torch.randn(70, 4500, generator=torch.Generator().manual_seed(4))
    k = cka_module._gram(x)
    exact = x.double() @ x.double().T
    assert torch.equal(k, k.T)
    assert float((k - exact).abs().max() / exact.abs().max()) <= 1e-14


# ------------------------------------------------------------------ numpy references of the estimators
def numpy_hsic0(k, l_):
    """tr(H K H L) / (n - 1)^2 with the explicit centring matrix."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(h @ k @ h @ l_) / (n - 1) ** 2


def numpy_hsic1(k, l_):
    """Song et al. (2012), Eq. 5, term by term: K', L' the Gram matrices with zeroed diagonals."""
    n = len(k)
    k, l_, one = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_)), np.ones(len(k))
    return (np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l_ @ one)) / (n * (n - 3))


def numpy_cka(x, y, hsic):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    k, l_ = x @ x.T, y @ y.T
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def numpy_minibatch_cka(xs, ys):
    """Nguyen et al. (2021): HSIC_1 averaged over minibatches, then the ratio."""
    grams = [(np.asarray(x) @ np.asarray(x).T, np.asarray(y) @ np.asarray(y).T) for x, y in zip(xs, ys)]
    kl, kk, ll = (np.mean([numpy_hsic1(a, b) for a, b in pairs]) for pairs in
                  ([(k, l_) for k, l_ in grams], [(k, k) for k, _ in grams], [(l_, l_) for _, l_ in grams]))
    return kl / np.sqrt(kk * ll)


def test_kornblith_demo_values():
    """The demo of google-research/representation_similarity (Demo.ipynb): np.random.seed(1337),
    X = randn(100, 10), Y = randn(100, 10) + X; it prints 0.55761 (linear CKA) and 0.51346 (debiased)."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    for form in FORMS:
        assert round(form(x, y), 5) == 0.55761
        assert round(form(x, y, debiased=True), 5) == 0.51346


# feature form (max(p, q) <= n) and Gram form (n < max(p, q)) as `linear_cka` chooses them
REGIMES = [(80, 6, 9), (12, 30, 20)]


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", REGIMES)
def test_linear_cka_matches_numpy_references_in_both_regimes(shape, debiased):
    x, y = pair(*shape, seed=3)
    expected = numpy_cka(x, y, numpy_hsic1 if debiased else numpy_hsic0)
    x = x + 50.0  # an offset the estimators must be blind to (the dense reference, uncentred, is not exact there)
    assert linear_cka(x, y, debiased) == pytest.approx(expected, abs=TOL)
    acc = CKAAccumulator("auto", n_hint=len(x), estimator="debiased" if debiased else "biased")
    acc.update(x[:5], y[:5])
    acc.update(x[5:], y[5:])
    assert acc.form == ("feature" if max(shape[1:]) <= shape[0] else "gram")
    assert acc.value() == pytest.approx(expected, abs=TOL)


def test_debiased_estimator_differs_from_the_biased_one_and_removes_its_bias():
    """Independent representations: the biased CKA of n = 20 examples in 50 dimensions is far from 0, HSIC_1's near it."""
    x, y = rand(20, 50, seed=1), rand(20, 50, seed=2)
    assert linear_cka(x, y) > 0.5
    assert abs(linear_cka(x, y, debiased=True)) < 0.1
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], y[:3], debiased=True)


@pytest.mark.parametrize("method", ["feature", "gram", "auto"])
def test_minibatch_cka_matches_numpy_reference(method):
    x, y = pair(60, 8, 40, seed=9)
    cuts = [0, 15, 30, 60]  # unequal minibatches: each HSIC_1 carries its own 1 / (n (n - 3))
    acc = CKAAccumulator(method, estimator="minibatch")
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        acc.update(x[lo:hi] + 3.0, y[lo:hi])
    expected = numpy_minibatch_cka([x[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:])],
                                   [y[lo:hi] for lo, hi in zip(cuts[:-1], cuts[1:])])
    assert acc.batches == 3 and acc.value() == pytest.approx(expected, abs=TOL)
    assert acc.value() != pytest.approx(linear_cka(x, y, debiased=True), abs=1e-6)


def test_linear_cka_uses_the_gram_form_when_features_outnumber_examples():
    """A wide representation: the Gram form's n x n matrices, the feature form's p x p, the same value."""
    x, y = pair(24, 300, 200, seed=4)
    acc = CKAAccumulator("auto", n_hint=24)
    acc.update(x, y)
    assert acc.form == "gram"
    assert linear_cka(x, y) == pytest.approx(linear_cka_feature(x, y), abs=TOL)


@pytest.mark.parametrize("method", ["feature", "gram", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_accumulation_equals_one_shot(method, shape):
    x, y = pair(*shape, seed=7)
    x = x + 100.0  # a large common offset: accumulating uncentred moments must still centre exactly
    acc = CKAAccumulator(method)
    cuts = sorted({0, 3, 11, len(x) // 2, len(x)})
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        acc.update(x[lo:hi], y[lo:hi])
    assert acc.n == len(x)
    assert acc.value() == pytest.approx(reference_cka(x - 100.0, y), abs=TOL)


def test_auto_picks_the_gram_form_when_features_outnumber_examples():
    small, large = CKAAccumulator("auto", n_hint=30), CKAAccumulator("auto", n_hint=30)
    small.update(rand(30, 10), rand(30, 10, seed=1))
    large.update(rand(30, 10), rand(30, 31, seed=1))
    assert small.form == "feature" and large.form == "gram"
    assert large.value() == pytest.approx(linear_cka(rand(30, 10), rand(30, 31, seed=1)), abs=TOL)


def test_multidimensional_features_are_flattened_and_constant_features_give_nan():
    x = rand(20, 3, 4)
    assert linear_cka(x, x.flatten(1)) == pytest.approx(1.0, abs=TOL)
    assert torch.isnan(torch.tensor(linear_cka(torch.ones(20, 3, dtype=torch.float64), rand(20, 2))))
    with pytest.raises(ValueError):
        CKAAccumulator("feature").value()


# ------------------------------------------------------------------------------- the metric
N_TRAIN, LENGTH, CLASSES = 300, 16, 4


def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, LENGTH, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    return MetricData(Split(x, y), Split(x[:50], y[:50]), CLASSES)


def make_model(arch, seed, width=8):
    torch.manual_seed(seed)
    return models.create(arch, width, (LENGTH,), CLASSES).double()


SMALL = CKAOptions(batches=3, batch_size=32)


def test_defaults_are_the_reference_setting():
    o = CKAOptions()
    assert (o.mixup_alpha, o.batches, o.batch_size, o.pairs, o.layers) == (16.0, 6, 128, "all", ())
    assert (o.method, o.estimator) == ("auto", "biased")


def test_metric_equals_one_shot_cka_over_all_mixed_batches():
    data, a, b = make_data(), make_model("mlp", 0), make_model("mlp", 1)
    out = cka(a, b, data, SMALL, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the metric's draws
    xs = [mixup(data.train.batch(32, g).x, 16.0, g) for _ in range(3)]
    with torch.no_grad():
        za, zb = a(torch.cat(xs)), b(torch.cat(xs))
    assert out[key("train", "cka_logits")] == pytest.approx(reference_cka(za, zb), abs=TOL)
    assert out[key("train", "cka_softmax")] == pytest.approx(reference_cka(za.softmax(1), zb.softmax(1)), abs=TOL)


@pytest.mark.parametrize("estimator", ["debiased", "minibatch"])
def test_metric_estimators_equal_numpy_references_over_the_mixed_batches(estimator):
    data, a, b = make_data(), make_model("mlp", 0), make_model("mlp", 1)
    out = cka(a, b, data, CKAOptions(batches=3, batch_size=32, estimator=estimator), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    xs = [mixup(data.train.batch(32, g).x, 16.0, g) for _ in range(3)]
    with torch.no_grad():
        zs = [(a(x), b(x)) for x in xs]
    for name, f in (("logits", lambda z: z), ("softmax", lambda z: z.softmax(1))):
        za, zb = [f(z[0]) for z in zs], [f(z[1]) for z in zs]
        expected = (numpy_cka(torch.cat(za), torch.cat(zb), numpy_hsic1) if estimator == "debiased"
                    else numpy_minibatch_cka(za, zb))
        assert out[key("train", f"cka_{name}")] == pytest.approx(expected, abs=TOL)


def test_identical_models_give_one():
    data, a = make_data(), make_model("resnet1d", 0, width=4)
    out = cka(a, copy.deepcopy(a), data, CKAOptions(batches=2, batch_size=16, layers=("stem",)),
              torch.Generator().manual_seed(0))
    assert all(v == pytest.approx(1.0, abs=TOL) for v in out.values()), out


def test_hidden_layers_are_compared_and_hooks_removed():
    data, a, b = make_data(), make_model("resnet1d", 0, width=4), make_model("resnet1d", 1, width=4)
    opts = CKAOptions(batches=2, batch_size=16, layers=("stem", "stages.1"), method="gram")
    out = cka(a, b, data, opts, torch.Generator().manual_seed(0))
    assert set(out) == {key("train", f"cka_{n}") for n in ("logits", "softmax", "stem", "stages.1")}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert not any(m._forward_hooks for model in (a, b) for m in model.modules())
    feature = cka(a, b, data, CKAOptions(batches=2, batch_size=16, layers=("stem", "stages.1"), method="feature"),
                  torch.Generator().manual_seed(0))
    assert feature == pytest.approx(out, abs=1e-9)
    with pytest.raises(SpecError, match="layers"):
        cka(a, b, data, CKAOptions(batches=1, batch_size=16, layers=("nope",)), torch.Generator().manual_seed(0))
    assert not any(m._forward_hooks for model in (a, b) for m in model.modules())


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_registry_contract(arch):
    """Finite floats; parameters, buffers and per-module train/eval flags unchanged; same seed, same result."""
    metric = METRICS["CKA"]
    assert metric.kind == "pair" and metric.options is CKAOptions
    data, a, b = make_data(), make_model(arch, 0, 4), make_model(arch, 1, 4)
    a.train()
    b.eval()
    list(b.modules())[1].train()
    flags = [[m.training for m in model.modules()] for model in (a, b)]
    states = [copy.deepcopy(model.state_dict()) for model in (a, b)]
    out = metric.compute(a, b, data, SMALL, torch.Generator().manual_seed(1))
    again = metric.compute(a, b, data, SMALL, torch.Generator().manual_seed(1))
    assert out == again
    assert set(out) == {"train/cka_logits", "train/cka_softmax"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    assert [[m.training for m in model.modules()] for model in (a, b)] == flags
    for model, state in zip((a, b), states):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {p.quantity for p in metric.panels} == {"cka_logits", "cka_softmax"}
    assert all((p.vmin, p.vmax) == (0.0, 1.0) for p in metric.panels)


@pytest.mark.parametrize("bad", [
    dict(mixup_alpha=0.0), dict(mixup_alpha=-1.0), dict(mixup_alpha="16"), dict(batches=0), dict(batches=1.5),
    dict(batch_size=1), dict(batch_size=True), dict(layers=[3]), dict(layers=[""]), dict(method="exact"),
    dict(pairs="some"), dict(estimator="unbiased"), dict(estimator=None),
    dict(batch_size=3, estimator="minibatch"), dict(batch_size=3, batches=1, estimator="debiased"),
])
def test_out_of_range_options_raise(bad):
    with pytest.raises(SpecError, match="metric_options.CKA." + next(iter(bad))):
        CKAOptions(**bad)


def test_spec_accepts_json_options_and_rejects_bad_ones():
    spec = ExperimentSpec(metrics=("CKA",), metric_options={"CKA": {"layers": ["stem"], "pairs": "first"}})
    assert metric_options(spec, "CKA").layers == ("stem",)
    with pytest.raises(SpecError, match="mixup_alpha"):
        check(ExperimentSpec(metrics=("CKA",), metric_options={"CKA": {"mixup_alpha": 0}}))
