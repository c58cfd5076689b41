"""The `loss_slice` metric, filter-normalised directions and the per-cell slice figures.

References are independent of the code under test: numpy's `eigh` of a dense quadratic form, the
closed form of a cross-entropy whose logit is a quadratic in the weights, per-filter norms computed
with numpy, and eval-mode losses computed with the model's own forward pass.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F

import phasediagram
from phasediagram.analysis.slice_plots import plane_figure, slice_figure
from phasediagram.data.datasets import Split
from phasediagram.metrics import METRICS, MetricData, parse_key, row_kind
from phasediagram.metrics.loss_slice import (
    LossSliceOptions,
    grid,
    loss_slice,
    parse_quantity_2d,
    quantity_2d,
    slice_1d,
)
from phasediagram.models import families
from phasediagram.numerics.directions import filter_normalise, random_filter_normalised
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import DIRECTIONS_FILE, Layout
from phasediagram.storage.vectors import load_vectors, save_vectors

from .conftest import tiny_spec
from .test_hessian import tiny_resnet

DT = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- slices of quadratics
def test_slice_along_each_eigenvector_of_a_quadratic_is_its_parabola():
    """L(w) = w^T H w / 2 over two parameter tensors, H with negative and positive eigenvalues: along each
    unit eigenvector u_i of numpy's eigh, dL(t) = L(w* + t u_i) - L(w*) = lambda_i t^2 / 2 at the
    stationary point w* = 0, to 1e-12 of the largest |lambda_i| t^2 (float64)."""
    lam = np.array([-2.5, -0.4, 0.1, 0.7, 1.3, 3.0, 4.2])
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((7, 7)))[0]
    h = torch.as_tensor(q @ np.diag(lam) @ q.T)
    params = {"a": torch.zeros(2, 2, dtype=DT), "b": torch.zeros(3, dtype=DT)}

    def loss(p):
        w = torch.cat([p["a"].reshape(-1), p["b"]])
        return 0.5 * w @ h @ w

    values, vectors = np.linalg.eigh(h.numpy())
    ts = grid(0.75, 5)
    for i, value in enumerate(values):
        u = torch.as_tensor(vectors[:, i])
        direction = {"a": u[:4].reshape(2, 2), "b": u[4:]}
        rise = slice_1d(loss, params, direction, ts)
        np.testing.assert_allclose(rise, value * ts**2 / 2, rtol=0, atol=1e-12 * np.abs(lam).max() * ts.max() ** 2)
    assert values[0] < 0 and values[-1] > 0


class QuadraticLogit(nn.Module):
    """Logits (-theta^T A theta / 2, 0, ..., 0) whatever the input. With every label != 0 the mean
    cross-entropy is L(theta) = log(exp(z_0) + K - 1), z_0 = -theta^T A theta / 2, with gradient 0 and
    Hessian -A / K at theta = 0."""

    def __init__(self, a: torch.Tensor, classes: int = 3):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(len(a), 1, dtype=DT))  # 2-D: one filter per entry
        self.register_buffer("a", a)
        self.classes = classes

    def forward(self, x):
        theta = self.theta[:, 0]
        z0 = (-0.5 * theta @ self.a @ theta).expand(len(x), 1)
        return torch.cat([z0, torch.zeros(len(x), self.classes - 1, dtype=x.dtype)], dim=1) + 0.0 * x[:, :1]


def test_eigenvector_slices_of_a_known_hessian_with_negative_curvature():
    """The metric end to end on a model whose Hessian at theta = 0 is Q diag(lambda) Q^T (lambda_min < 0):
    along the unit eigenvector u of lambda (top and bottom) the loss is exactly
    L(t u) - L(0) = log((exp(K lambda t^2 / 2) + K - 1) / K), which is lambda t^2 / 2 + O(t^4); its
    curvature at 0 is lambda and its slope 0 (tolerances 1e-10, float64)."""
    k = 3
    lam = torch.tensor([-1.5, -0.3, 0.2, 0.9, 2.0], dtype=DT)
    q = torch.linalg.qr(torch.randn(5, 5, generator=seeded(4), dtype=DT))[0]
    model = QuadraticLogit(-k * q @ torch.diag(lam) @ q.T, k)
    x = torch.randn(32, 4, generator=seeded(5), dtype=DT)
    y = 1 + torch.randint(0, 2, (32,), generator=seeded(6))
    data = MetricData(Split(x, y), Split(x, y), k)
    options = LossSliceOptions(slices=("eigen", "eigen_bottom"), steps=4, eigen_radius=0.8, eig_tol=1e-12,
                               hessian_batch_size=None)
    out = loss_slice(model, data, options, seeded(1))
    ts = grid(0.8, 4)
    for kind, value in (("eigen", 2.0), ("eigen_bottom", -1.5)):
        rise = np.array([out[f"train/slice_{kind}@{t:.6g}"] for t in ts])
        exact = np.log((np.exp(k * value * ts**2 / 2) + k - 1) / k)
        np.testing.assert_allclose(rise, exact, rtol=0, atol=1e-10)
        assert out[f"train/slice_{kind}_curvature"] == pytest.approx(value, abs=1e-10)
        assert abs(out[f"train/slice_{kind}_slope"]) < 1e-12
        assert out[f"train/slice_{kind}_rise"] == pytest.approx(exact[-1], abs=1e-10)
    assert out["train/slice_eigenvalue"] == pytest.approx(2.0, abs=1e-10)
    assert out["train/slice_eigenvalue_bottom"] == pytest.approx(-1.5, abs=1e-10)
    assert out["train/slice_eig_converged"] == 1.0
    assert out["train/slice_eigen_bottom_rise"] < 0 < out["train/slice_eigen_rise"]


# --------------------------------------------------------------------------- filter normalisation
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return families.create("mlp", 5, (40,), 10).to(DT)


def numpy_filter_norms(t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return np.sqrt((a.reshape(a.shape[0], -1) ** 2).sum(axis=1))


@pytest.mark.parametrize("factory", [tiny_mlp, tiny_resnet], ids=["mlp", "resnet1d"])
def test_filter_normalised_directions_have_the_weights_filter_norms(factory):
    """Every filter (output channel of a convolution, row of a linear layer) of the direction has the norm
    of the weights' filter (rtol 1e-12); biases and BatchNorm weights and biases are zero ("biasbn") or the
    weights themselves ("none"); the draw is the generator's and does not depend on `ignore`."""
    model = factory()
    params = {n: p.detach() for n, p in model.named_parameters()}
    d = random_filter_normalised(params, seeded(3))
    kept = random_filter_normalised(params, seeded(3), ignore="none")
    assert any(w.dim() == 3 for w in params.values()) == (factory is tiny_resnet)
    assert any(w.dim() <= 1 for w in params.values())
    for name, w in params.items():
        assert d[name].shape == w.shape and d[name].dtype == w.dtype
        if w.dim() >= 2:
            np.testing.assert_allclose(numpy_filter_norms(d[name]), numpy_filter_norms(w), rtol=1e-12, atol=0)
            assert torch.equal(d[name], kept[name])
            assert not torch.allclose(d[name], w)  # a random direction, not the weights
        else:
            assert torch.count_nonzero(d[name]) == 0
            assert torch.equal(kept[name], w)
    again = random_filter_normalised(params, seeded(3))
    assert all(torch.equal(d[n], again[n]) for n in params)
    other = random_filter_normalised(params, seeded(4))
    assert not all(torch.equal(d[n], other[n]) for n in params if params[n].dim() >= 2)


def test_filter_normalise_rescales_each_filter_by_the_ratio_of_norms():
    """A hand-made 2 x 2 weight and direction: row i of d is scaled by ||w_i|| / ||d_i||."""
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=DT)
    d = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=DT)
    out = filter_normalise({"w": d}, {"w": w})["w"]
    assert torch.allclose(out, torch.tensor([[5.0, 0.0], [math.sqrt(2.0), math.sqrt(2.0)]], dtype=DT), atol=1e-15)


# --------------------------------------------------------------------------- the metric on a BatchNorm net
def small_data(n: int = 48) -> MetricData:
    g = seeded(2)
    x, xt = torch.randn(n, 40, generator=g, dtype=DT), torch.randn(16, 40, generator=g, dtype=DT)
    y, yt = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (16,), generator=g)
    return MetricData(Split(x, y), Split(xt, yt), 10)


FAST = dict(steps=2, steps_2d=2, hessian_batch_size=32, lanczos_iters=12, n_examples=32)


def test_batchnorm_running_statistics_are_used_and_left_untouched():
    """Every point is evaluated in eval mode on the trained running statistics, which the metric leaves
    exactly as they were (buffers, num_batches_tracked and train/eval flags included); L(w) is the
    eval-mode cross-entropy of the model's own forward pass."""
    model, data = tiny_resnet(), small_data()
    model.stages[0].bn1.eval()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    options = LossSliceOptions(slices=("eigen", "random", "random2d"), splits=("train", "test"), **FAST)
    out = loss_slice(model, data, options, seeded(1))
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())
    assert [m.training for m in model.modules()] == modes
    idx = torch.randperm(48, generator=torch.Generator().manual_seed(0))[:32].sort().values  # the fixed subset
    x, y = data.train.x[idx], data.train.y[idx]
    with torch.no_grad():
        eval_loss = float(F.cross_entropy(copy.deepcopy(model).eval()(x), y))
        train_loss = float(F.cross_entropy(copy.deepcopy(model).train()(x), y))
    assert out["train/slice_base_loss"] == pytest.approx(eval_loss, rel=1e-12)
    assert abs(eval_loss - train_loss) > 1e-3


def test_the_plane_through_the_first_direction_is_the_random_line_and_directions_are_saved(tmp_path):
    """dL on the plane's axis b = 0 is the 1D random slice at the same t (same direction d_1); the saved
    directions (numpy .npz, no pickle, at `Layout.directions_path`) are d_1 (the generator's first draw), d_2
    and the unit top eigenvector with its eigenvalue."""
    model, data = tiny_mlp(), small_data()
    spec = ExperimentSpec(name="sl", arch="mlp", widths=(5,), batch_sizes=(32,), seeds=(0,), epochs=1)
    layout = Layout(tmp_path, "sl")
    cell = spec.cells()[0]
    state = layout.state_dir("loss_slice", cell, (0,))
    options = LossSliceOptions(slices=("eigen", "random", "random2d"), save_directions=True,
                               **{**FAST, "steps_2d": FAST["steps"]})
    out = loss_slice(model, MetricData(data.train, data.test, 10, state), options, seeded(1))
    for t in grid(options.random_radius, options.steps):
        assert out[f"train/{quantity_2d(t)}@0"] == pytest.approx(out[f"train/slice_random@{t:.6g}"], abs=1e-14)
    path = layout.directions_path(cell, 0)
    assert path == state / DIRECTIONS_FILE and path.exists()
    directions, eigenvalues = load_vectors(path)
    params = {n: p.detach() for n, p in model.named_parameters()}
    first = random_filter_normalised(params, seeded(1))
    assert set(directions) == {"eigen", "random", "random2d_y"}
    assert all(np.array_equal(directions["random"][n], first[n].numpy()) for n in params)
    eigen = np.concatenate([directions["eigen"][n].ravel() for n in params])
    assert np.linalg.norm(eigen) == pytest.approx(1.0, abs=1e-12)
    assert eigenvalues["eigen"] == out["train/slice_eigenvalue"]
    with np.load(path, allow_pickle=False) as npz:
        assert all(npz[k].dtype == np.float64 for k in npz.files)


def test_a_loss_that_is_not_finite_gives_nan_cell_values():
    model = tiny_mlp()
    with torch.no_grad():
        model.net[1].weight[0, 0] = math.inf
    out = loss_slice(model, small_data(), LossSliceOptions(**FAST), seeded(1))
    assert out and all(math.isnan(v) for v in out.values())
    assert {parse_key(k)[1] for k in out} >= {p.quantity for p in METRICS["loss_slice"].panels}


def test_plane_quantity_names_round_trip():
    assert [parse_quantity_2d(quantity_2d(a)) for a in (-0.5, 0.0, 0.25)] == [-0.5, 0.0, 0.25]
    assert parse_quantity_2d("slice_random") is None and parse_quantity_2d("slice_random2d") is None


# --------------------------------------------------------------------------- figures
def synthetic_table() -> pd.DataFrame:
    """loss_slice rows of a 2 x 3 grid (two seeds each), parabolas of known curvature, one diverged cell."""
    rows = []
    for width in (4, 8, 16):
        for bs in (32, 256):
            if (width, bs) == (16, 32):
                rows.append(dict(width=width, batch_size=bs, seed=0, split="-", metric="loss_slice", coord=np.nan,
                                 value=np.nan, status="diverged", source="loss_slice"))
                continue
            for seed in (0, 1):
                c = width / 4 + seed
                for kind, radius in (("eigen", 0.5), ("random", 1.0)):
                    for t in grid(radius, 4):
                        rows.append(dict(width=width, batch_size=bs, seed=seed, split="train", metric=f"slice_{kind}",
                                         coord=t, value=c * t * t / 2, status="ok", source="loss_slice"))
                for a in grid(1.0, 2):
                    for b in grid(1.0, 2):
                        rows.append(dict(width=width, batch_size=bs, seed=seed, split="train", metric=quantity_2d(a),
                                         coord=b, value=c * (a * a + 2 * b * b), status="ok", source="loss_slice"))
    df = pd.DataFrame(rows)
    return df.assign(kind=[row_kind(s, m) for s, m in zip(df.source, df.metric)])


def test_slice_figure_has_one_axis_per_cell_with_a_line_per_seed_and_direction(tmp_path):
    df = synthetic_table()
    fig = slice_figure(df, kinds=("eigen", "random"))
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    titles = {ax.get_title(): ax for ax in fig.axes}
    assert set(titles) == {f"width {w}, batch_size {b}" for w in (4, 8, 16) for b in (32, 256)}
    assert len(titles["width 8, batch_size 256"].get_lines()) == 2 * 2 + 1  # 2 directions x 2 seeds, the zero line
    drawn = titles["width 8, batch_size 256"].get_lines()[0]
    np.testing.assert_allclose(drawn.get_ydata(), 2.0 * np.asarray(drawn.get_xdata()) ** 2 / 2)
    assert [t.get_text() for t in titles["width 16, batch_size 32"].texts] == ["diverged"]
    assert [a.get_title() for a in fig.axes[:3]] == ["width 4, batch_size 32", "width 8, batch_size 32",
                                                     "width 16, batch_size 32"]  # small batch (hot) on top
    fig.savefig(tmp_path / "slices.png", dpi=50)
    assert (tmp_path / "slices.png").stat().st_size > 1000
    empty = slice_figure(df.iloc[:0])
    assert isinstance(empty, Figure) and len(empty.axes) == 1


def test_plane_figure_has_one_axis_per_cell_and_a_colour_bar(tmp_path):
    df = synthetic_table()
    fig = plane_figure(df)
    assert isinstance(fig, Figure) and len(fig.axes) == 6 + 1
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 6
    filled = [ax for ax in panels if ax.collections]
    assert len(filled) == 5 and all(not ax.collections for ax in panels if ax.texts)
    fig.savefig(tmp_path / "plane.png", dpi=50)
    assert (tmp_path / "plane.png").stat().st_size > 1000


def test_a_study_with_loss_slices_saves_their_figures(root):
    """`Study.save_figures` writes loss_slice.png (and the plane's) when the slices ran."""
    options = {"loss_slice": {**METRICS["loss_slice"].test_options, "slices": ("eigen", "random", "random2d")}}
    study = phasediagram.Study(tiny_spec(widths=(4,), batch_sizes=(256,), metrics=("loss_acc", "loss_slice"),
                                         metric_options=options), root)
    study.run(executor=phasediagram.InProcess())
    written = study.save_figures(log=lambda line: None)
    names = {p.name for p in written}
    assert {"loss_slice.png", "loss_slice_plane.png"} <= names
    assert all(p.stat().st_size > 0 for p in written if p.name.startswith("loss_slice"))


def test_vector_files_round_trip_and_refuse_ambiguous_group_names(tmp_path):
    """`save_vectors` / `load_vectors`: float64 arrays per group and one value each, back as written; a group
    named like the values' prefix or holding '/' would not read back, so it is refused before writing."""
    groups = {"top1": {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.float32)}}
    save_vectors(tmp_path / "v.npz", groups, {"top1": 2.5})
    back, values = load_vectors(tmp_path / "v.npz")
    assert values == {"top1": 2.5} and list(back) == ["top1"]
    assert all(np.array_equal(back["top1"][k], v.double().numpy()) and back["top1"][k].dtype == np.float64
               for k, v in groups["top1"].items())
    for bad in ("value", "a/b"):
        with pytest.raises(ValueError, match="group names"):
            save_vectors(tmp_path / "bad.npz", {bad: groups["top1"]}, {})
    assert not (tmp_path / "bad.npz").exists()
