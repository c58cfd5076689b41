"""The phase-diagram figure: panels, axes, colour ranges, missing and diverged cells, phase outlines."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib import colors  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from phasediagram.analysis import (
    phases,
    plots,  # noqa: E402
)
from phasediagram.analysis.table import normalise  # noqa: E402
from phasediagram.metrics import METRICS, Panel  # noqa: E402

from .test_phases import BATCH_SIZES, KNOWN, WIDTHS, synthetic_table  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CORE_TITLES = ["(a) test accuracy (%)", "(b) log10 training loss", "(c) log10 top Hessian eigenvalue",
               "(d) log10 Hessian trace (Hutchinson)", "(e) mode connectivity (error %)", "(f) CKA similarity",
               "(g) L2 distance between seeds", "(h) phases"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_full_figure_png_pdf_and_phase_outlines_on_panel_a(tmp_path, monkeypatch):
    calls = []
    real = plots.draw_boundaries
    monkeypatch.setattr(plots, "draw_boundaries", lambda ax, *a, **k: calls.append(ax) or real(ax, *a, **k))
    res = plots.phase_figure(synthetic_table())
    assert isinstance(res, Figure)
    paths = plots.save_figure(res, tmp_path / "fig.png", dpi=60)
    assert [p.name for p in paths] == ["fig.png", "fig.pdf"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC and paths[0].stat().st_size > 20_000
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))
    assert res.titles[:8] == CORE_TITLES and res.notes == []
    assert phases.counts(res.phases) == {"I": 5, "II": 3, "III": 2, "IV-A": 3, "IV-B": 3}
    assert len(calls) == 3  # twice (white under black) on panel (a), once on the phase map
    assert calls[0] is calls[1] and calls[2] is not calls[0]


def test_panels_without_data_are_left_out_with_a_note(tmp_path):
    only_acc = synthetic_table(drop=("mc", "top_eigenvalue", "trace", "cka", "dist"))
    res = plots.phase_figure(only_acc)
    plots.save_figure(res, tmp_path / "few.png", formats=("png",), dpi=50)
    assert res.titles == ["(a) test accuracy (%)", "(b) log10 training loss"]
    assert len(res.notes) == 6 and all(n.startswith("left out:") for n in res.notes)
    assert any("top_eigenvalue" in n for n in res.notes) and any("phase map" in n for n in res.notes)
    assert (tmp_path / "few.png").exists() and not (tmp_path / "few.pdf").exists()
    empty = plots.phase_figure(only_acc.iloc[:0])
    plots.save_figure(empty, tmp_path / "empty.png", formats=("png",), dpi=50)
    assert empty.titles == [] and (tmp_path / "empty.png").stat().st_size > 500


def test_further_registered_panels_are_added(tmp_path):
    core = {s.key for s in plots.CORE}
    extra = [(name, p) for name, m in METRICS.items() for p in m.panels
             if (name, p.quantity, p.split) not in core and p.quantity not in {s.panel.quantity for s in plots.CORE}]
    if not extra:
        pytest.skip("no registered panel beyond the core ones")
    name, panel = extra[0]
    df = synthetic_table(drop=("mc", "top_eigenvalue", "trace", "cka", "dist"))
    rows = df[(df.source == "loss_acc") & (df.metric == "acc") & (df.split == "test")].assign(
        source=name, metric=panel.quantity, split=panel.split)
    df = normalise(pd.concat([df, rows], ignore_index=True))
    assert [s.key for s in plots.further_panels(df)] == [(name, panel.quantity, panel.split)]
    res = plots.phase_figure(df)
    assert res.titles == CORE_TITLES[:2] + ["(c) " + ("log10 " if panel.log else "") + panel.label]


def _draw(df, spec, temperature="batch_size", **kw):
    xs, ys = plots.axes_values(df, "width", temperature)
    grid = plots.cell_grid(df, spec, xs, ys, "width", temperature)
    fig, ax = plt.subplots()
    mesh, notes = plots.heatmap(ax, grid, spec.panel, plots.divergence(df, "width", temperature), load="width",
                                temperature=temperature, **kw)
    return grid, ax, mesh, notes


def test_missing_cells_are_blank_never_zero():
    df = synthetic_table()
    gone = (df.width == 4) & (df.batch_size == 256) & (df.metric == "acc") & (df.split == "test")
    df = df[~gone]
    grid, ax, mesh, _ = _draw(df, plots.CORE[0])
    assert np.isnan(grid.loc[256, 4]) and grid.notna().sum().sum() == 15
    shown = mesh.get_array()
    i, j = BATCH_SIZES.index(256), WIDTHS.index(4)
    assert np.ma.getmaskarray(shown).reshape(grid.shape)[i, j]
    assert np.ma.getmaskarray(shown).sum() == 1
    assert shown.min() > 40  # nothing was filled with zero


def test_means_over_seeds_are_plotted():
    df = synthetic_table()
    grid, *_ = _draw(df, plots.CORE[0])
    sel = df[(df.width == 8) & (df.batch_size == 64) & (df.metric == "acc") & (df.split == "test")]
    assert len(sel) == 2 and grid.loc[64, 8] == pytest.approx(sel.value.mean())


def test_axes_log_scales_and_high_temperature_on_top():
    df = synthetic_table()
    _, ax, *_ = _draw(df, plots.CORE[0])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    top, bottom = ax.get_ylim()
    assert top > bottom and top > 1024 and bottom < 16  # inverted: batch size 16 at the top
    lo, hi = ax.get_xlim()
    assert lo < 2 < 16 < hi
    plt.close("all")
    lr_df = df.assign(lr=df.batch_size / 1000.0, batch_size=128)
    _, ax, *_ = _draw(lr_df, plots.CORE[0], temperature="lr")
    bottom, top = ax.get_ylim()
    assert top > bottom  # large learning rate (high temperature) at the top
    assert plots.infer_axes(lr_df) == ("width", "lr")


def test_colour_ranges_default_override_and_centred_mc():
    df = synthetic_table()
    _, _, mesh, _ = _draw(df, plots.CORE[0])
    assert mesh.norm.vmin == pytest.approx(49.25) and mesh.norm.vmax == pytest.approx(91.25)
    _, _, mesh, _ = _draw(df, plots.CORE[0], vmin=56, vmax=91)
    assert (mesh.norm.vmin, mesh.norm.vmax) == (56, 91)
    _, _, mesh, _ = _draw(df, plots.CORE[2], vmin=1.0, vmax=1000.0)  # log panel: data units in, log10 drawn
    assert (mesh.norm.vmin, mesh.norm.vmax) == (0.0, 3.0)
    _, _, mesh, _ = _draw(df, plots.CORE[4])
    assert isinstance(mesh.norm, colors.TwoSlopeNorm) and mesh.norm.vcenter == 0
    assert mesh.norm.vmin == -10 and mesh.norm.vmax == 10
    assert plots._range(plots.CORE[0], {"acc": (1, 2)}) == (1, 2)
    assert plots._range(plots.CORE[0], {"loss_acc/acc": (3, 4), "acc": (1, 2)}) == (3, 4)


def test_non_positive_values_on_a_log_panel_are_blank_and_noted():
    df = synthetic_table()
    df.loc[(df.metric == "trace") & (df.width == 2), "value"] = -5.0
    grid, _, mesh, notes = _draw(df, plots.CORE[3].for_table(df))
    assert np.ma.getmaskarray(mesh.get_array()).sum() == 4
    assert len(notes) == 1 and "4 cell(s) <= 0" in notes[0]


def test_diverged_cells_are_hatched_and_labelled():
    df = synthetic_table()
    full = (df.width == 16) & (df.batch_size == 16)
    df.loc[full & (df.source == "train"), "status"] = "diverged"
    df = df[~(full & (df.source != "train"))]  # no metric of a fully diverged cell
    part = (df.width == 2) & (df.batch_size == 1024) & (df.source == "train") & (df.seed == 1)
    df.loc[part, "status"] = "diverged"
    assert plots.divergence(df, "width", "batch_size") == {(16, 16): (2, 2), (1024, 2): (1, 2)}
    _, ax, mesh, _ = _draw(df, plots.CORE[0])
    hatched = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == 2
    texts = {t.get_text() for t in ax.texts}
    assert {"diverged", "1/2 div"} <= texts
    assert np.ma.getmaskarray(mesh.get_array()).sum() == 1  # the fully diverged cell is blank


def test_boundaries_and_labels_outline_the_phases():
    labels = np.array([["I", "II"], ["I", "IV-B"]], dtype=object)
    fig, ax = plt.subplots()
    ex, ey = plots.edges([1, 2]), plots.edges([10, 20])
    plots.draw_boundaries(ax, labels, ex, ey)
    assert len(ax.lines) == 3  # I|II, I|IV-B, II/IV-B
    grid = plots.phase_grid(phases.classify(synthetic_table()), list(WIDTHS), list(BATCH_SIZES), "width",
                            "batch_size")
    arr = grid.to_numpy(dtype=object)
    spots = plots.label_cells(arr)
    assert set(spots) == {"I", "II", "III", "IV-A", "IV-B"}
    assert all(arr[i, j] == lab for lab, (i, j) in spots.items())
    assert spots["I"][1] == 0  # phase I lies in the narrowest column
    assert [tuple(r) for r in arr] == [KNOWN[bs] for bs in BATCH_SIZES]


def test_a_label_of_an_edge_column_stays_inside_its_panel():
    labels = np.array([["I", "II", "IV-B"], ["I", "II", "IV-B"]], dtype=object)
    fig, ax = plt.subplots(figsize=(2, 2))
    ex, ey = plots.edges([2, 4, 8]), plots.edges([10, 20])
    ax.set_xscale("log")
    ax.set_xlim(ex[0], ex[-1])
    ax.set_ylim(ey[0], ey[-1])
    plots.draw_phase_labels(ax, labels, ex, ey)
    texts = {t.get_text(): t for t in ax.texts}
    assert (texts["I"].get_ha(), texts["II"].get_ha(), texts["IV-B"].get_ha()) == ("left", "center", "right")
    fig.canvas.draw()
    box = ax.get_window_extent()
    for t in ax.texts:
        extent = t.get_window_extent()
        assert box.x0 - 1e-6 <= extent.x0 and extent.x1 <= box.x1 + 1e-6, t.get_text()


def test_phase_map_alone_and_saving_at_the_default_resolution(tmp_path):
    fig = plots.phase_map(synthetic_table())
    assert isinstance(fig, Figure) and [ax.get_title(loc="left") for ax in fig.axes][0] == "phases"
    paths = plots.save_figure(fig, tmp_path / "map.png", formats=("png",), dpi=50)
    assert paths == [tmp_path / "map.png"] and paths[0].read_bytes()[:8] == PNG_MAGIC
    only_acc = synthetic_table(drop=("mc", "top_eigenvalue", "trace", "cka", "dist"))
    fig = plots.phase_figure(only_acc)
    assert fig.titles == CORE_TITLES[:2]
    plots.save_figure(fig, tmp_path / "old.png")  # PNG and PDF at the default resolution
    assert (tmp_path / "old.png").exists() and (tmp_path / "old.pdf").exists()


def test_edges_and_tick_labels():
    e = plots.edges([1, 4, 16])
    assert np.allclose(e, [0.5, 2, 8, 32])
    assert np.allclose(plots.edges([0.0, 0.1, 0.2]), [-0.05, 0.05, 0.15, 0.25])  # linear when a value is 0
    assert plots.tick_labels([1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128], 0.09) == \
        ["1", "2", "", "4", "", "8", "", "16", "", "32", "", "64", "", "128"]
    assert plots.tick_labels([16], 0.1) == ["16"]


def test_registry_panels_are_panels():
    assert all(isinstance(p, Panel) for m in METRICS.values() for p in m.panels)


def test_trace_panel_draws_hutchpp_and_falls_back_to_hutchinson(tmp_path):
    """Panel (d) draws the Hutch++ trace where the table has it (the accurate estimator), Hutchinson's only
    where it is all there is (e.g. the reference's published table); panel (c) likewise falls back to the
    largest-magnitude eigenvalue; standard errors and diagnostics are never drawn."""
    df = synthetic_table()
    hutchpp = df[df.metric == "trace"].assign(metric="trace_hutchpp", value=lambda d: d.value * 1.5)
    noise = df[df.metric == "trace"].assign(metric="trace_hutchpp_stderr", kind=None)
    both = normalise(pd.concat([df, hutchpp, noise], ignore_index=True))
    res = plots.phase_figure(both)
    assert res.titles[3] == "(d) log10 Hessian trace (Hutch++)"
    assert not any("stderr" in t for t in res.titles)
    grid = plots.cell_grid(both, plots.CORE[3].for_table(both), list(WIDTHS), list(BATCH_SIZES), "width",
                           "batch_size")
    expected = plots.cell_grid(df, plots.CORE[3].for_table(df), list(WIDTHS), list(BATCH_SIZES), "width",
                               "batch_size")
    pd.testing.assert_frame_equal(grid, 1.5 * expected)
    abs_only = normalise(df.assign(metric=df.metric.replace({"top_eigenvalue": "top_abs_eigenvalue"})))
    res = plots.phase_figure(abs_only)
    assert res.titles[2] == "(c) log10 largest-magnitude Hessian eigenvalue"


def test_a_panel_without_a_finite_value_is_left_out_never_drawn_empty():
    """Rows of a quantity that are all NaN (a core panel and a further one) or all diverged are no
    panel, only a note; the further quantity with values is drawn."""
    df = synthetic_table(drop=("mc", "top_eigenvalue", "trace", "cka", "dist"))
    acc = df[(df.source == "loss_acc") & (df.metric == "acc") & (df.split == "test")]
    df = normalise(pd.concat([
        df,
        acc.assign(source="hessian", metric="top_eigenvalue", split="train", value=np.nan),
        acc.assign(source="aligned_barrier", metric="aligned_barrier", split="train", value=np.nan),
        acc.assign(source="aligned_barrier", metric="linear_barrier", split="train"),
        acc.assign(source="esd_alpha", metric="esd_alpha", split="-", status="diverged", value=np.nan),
    ], ignore_index=True))
    res = plots.phase_figure(df)
    assert res.titles == CORE_TITLES[:2] + ["(c) linear barrier (train error %)"]
    for quantity in ("top_eigenvalue", "aligned_barrier", "esd_alpha"):
        assert sum(f"no finite '{quantity}' value" in n for n in res.notes) == 1, (quantity, res.notes)
