"""Loss-slice figures: one small panel per cell of the load x temperature grid (`metrics.loss_slice`).

- `slice_figure`: in each cell's panel the 1D slices dL(t) = L(w + t d) - L(w), one colour per
  direction (top Hessian eigenvector, bottom eigenvector, filter-normalised random direction), one
  line per seed; every panel shares the t and dL axes, so cells compare at a glance.
- `plane_figure`: in each cell's panel the contours of the 2D slice dL(a, b) over the plane of two
  filter-normalised directions, of one seed (the lowest with a plane, or the one asked for), on
  contour levels shared by every panel, with one colour bar.

Both read the tidy table (`analysis.table`): the measurement rows of source "loss_slice" with status
"ok" of one split; metric `slice_<kind>` with coord t for the 1D slices, metric
`slice_random2d(x=a)` with coord b for the plane. Panels are laid out like the phase diagram: load
across (increasing to the right), temperature down with the high temperature on top. A cell whose
runs all diverged says so; a cell without slice rows says "no slice".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from phasediagram.analysis.plots import AXIS_LABELS, HOT_WHEN_SMALL
from phasediagram.analysis.table import measurements
from phasediagram.metrics.loss_slice import LINES, NAME, parse_quantity_2d

LABELS = {"eigen": "top Hessian eigenvector", "eigen_bottom": "bottom Hessian eigenvector",
          "random": "filter-normalised random"}
COLOURS = {"eigen": "C0", "eigen_bottom": "C2", "random": "C1"}


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    """The loss_slice rows (every split and status; a table without a source column is taken as they)."""
    return df[df["source"] == NAME] if "source" in df else df


def _axes(fig: Figure, rows: pd.DataFrame, load: str, temperature: str):
    """(axes grid, loads, temperatures in drawing order top to bottom), one axis per cell of the table's axes."""
    loads = sorted(v for v in pd.unique(rows[load]) if pd.notna(v))
    temps = sorted((v for v in pd.unique(rows[temperature]) if pd.notna(v)),
                   reverse=temperature not in HOT_WHEN_SMALL)
    axes = fig.subplots(len(temps), len(loads), squeeze=False, sharex=True, sharey=True)
    for i, t_val in enumerate(temps):
        for j, l_val in enumerate(loads):
            ax = axes[i][j]
            ax.set_title(f"{load} {l_val:g}, {temperature} {t_val:g}", fontsize=7)
            ax.tick_params(labelsize=6)
    return axes, loads, temps


def _axis_note(load: str, temperature: str) -> str:
    hot = "small" if temperature in HOT_WHEN_SMALL else "large"
    return (f"{AXIS_LABELS.get(load, load)} increasing to the right, "
            f"{AXIS_LABELS.get(temperature, temperature)} {hot} (hot) on top")


def _empty_note(ax, cell: pd.DataFrame) -> None:
    text = "diverged" if len(cell) and (cell["status"] == "diverged").all() else "no slice"
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=7, color="0.4")


def _figure(rows: pd.DataFrame, drawn: pd.DataFrame, load: str, temperature: str, message: str):
    """A Figure with a panel per cell of `rows` (every loss_slice row) and (axes, loads, temperatures, the
    measurements of `drawn` with status ok); or one panel saying `message` and None when `drawn` (the
    rows to draw) is empty."""
    cells = rows[[load, temperature]].dropna().drop_duplicates()
    if cells.empty or drawn.empty:
        fig = Figure(figsize=(3, 2), layout="constrained")
        fig.add_subplot().text(0.5, 0.5, message, ha="center", va="center")
        return fig, None
    n_loads, n_temps = cells[load].nunique(), cells[temperature].nunique()
    fig = Figure(figsize=(2.2 * n_loads + 0.8, 1.8 * n_temps + 0.9), layout="constrained")
    ok = measurements(drawn)
    return fig, (*_axes(fig, rows, load, temperature), ok[ok["status"] == "ok"])


def slice_figure(df: pd.DataFrame, kinds: Sequence[str] = LINES, split: str = "train", load: str = "width",
                 temperature: str = "batch_size") -> Figure:
    """A matplotlib Figure with one axis per cell: the 1D loss slices of `kinds` on `split` (module docstring).

    `df` is a results table holding `loss_slice` rows; x is the slice coordinate t (each direction
    on its own grid: the eigenvectors' radius is in parameter units, the random directions' in
    units of the filter norms), y the loss rise dL(t), shared by every panel.
    """
    rows = _rows(df)
    picked = rows[(rows["split"] == split) & rows["metric"].isin([f"slice_{k}" for k in kinds])]
    fig, layout = _figure(rows, picked, load, temperature, "no loss slices yet")
    if layout is None:
        return fig
    axes, loads, temps, ok = layout
    drawn = set()
    for i, t_val in enumerate(temps):
        for j, l_val in enumerate(loads):
            ax = axes[i][j]
            cell = rows[(rows[load] == l_val) & (rows[temperature] == t_val)]
            good = ok[(ok[load] == l_val) & (ok[temperature] == t_val)]
            if good.empty:
                _empty_note(ax, cell)
                continue
            for kind in kinds:
                for seed, curve in good[good["metric"] == f"slice_{kind}"].sort_values("coord").groupby("seed"):
                    label = LABELS.get(kind, kind) if kind not in drawn else None
                    ax.plot(curve["coord"].to_numpy(float), curve["value"].to_numpy(float), lw=0.9, alpha=0.8,
                            color=COLOURS.get(kind), label=label)
                    drawn.add(kind)
            ax.axhline(0.0, color="0.7", lw=0.5, zorder=0)
    for ax in axes[-1]:
        ax.set_xlabel("t", fontsize=7)
    for row in axes:
        row[0].set_ylabel("loss rise", fontsize=7)
    fig.suptitle(f"loss slices L(w + t d) - L(w), {split} split\n{_axis_note(load, temperature)}", fontsize=8)
    if drawn:
        fig.legend(*_handles(axes), loc="outside lower center", ncol=len(drawn), fontsize=7, frameon=False)
    return fig


def _handles(axes) -> tuple[list, list]:
    """The legend entries of every panel, each label once."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    return handles, labels


def plane_grid(cell: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a values, b values, dL[b, a]) of one seed's plane rows (metric `slice_random2d(x=a)`, coord b)."""
    xs = cell["metric"].map(parse_quantity_2d)
    table = pd.DataFrame({"a": xs.to_numpy(float), "b": cell["coord"].to_numpy(float),
                          "v": cell["value"].to_numpy(float)}).pivot_table(index="b", columns="a", values="v")
    return table.columns.to_numpy(float), table.index.to_numpy(float), table.to_numpy(float)


def plane_figure(df: pd.DataFrame, split: str = "train", load: str = "width", temperature: str = "batch_size",
                 seed: int | None = None, levels: int = 12) -> Figure:
    """A matplotlib Figure with one axis per cell (and one colour bar): contours of the 2D loss slice.

    Each panel draws dL(a, b) = L(w + a d_1 + b d_2) - L(w) of one seed of its cell (`seed`, or the
    lowest seed with plane rows) as filled contours on `levels` levels spanning every panel's range,
    the trained weights marked at the origin.
    """
    rows = _rows(df)
    picked = rows[(rows["split"] == split) & rows["metric"].map(lambda m: parse_quantity_2d(str(m)) is not None)]
    fig, layout = _figure(rows, picked, load, temperature, "no 2D loss slices yet")
    if layout is None:
        return fig
    axes, loads, temps, ok = layout
    if seed is not None:
        ok = ok[ok["seed"] == seed]
    planes = {}
    for (t_val, l_val), cell in ok.groupby([temperature, load]):
        first = cell[cell["seed"] == cell["seed"].min()]
        planes[(t_val, l_val)] = plane_grid(first)
    values = np.concatenate([p[2].ravel() for p in planes.values()]) if planes else np.zeros(1)
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    bounds = np.linspace(low, high if high > low else low + 1.0, levels + 1)
    mappable = None
    for i, t_val in enumerate(temps):
        for j, l_val in enumerate(loads):
            ax = axes[i][j]
            if (t_val, l_val) not in planes:
                _empty_note(ax, rows[(rows[load] == l_val) & (rows[temperature] == t_val)])
                continue
            a, b, v = planes[(t_val, l_val)]
            mappable = ax.contourf(a, b, v, levels=bounds, cmap="viridis")
            ax.contour(a, b, v, levels=bounds, colors="white", linewidths=0.3)
            ax.plot([0.0], [0.0], marker="+", color="red", ms=5)
            ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("a", fontsize=7)
    for row in axes:
        row[0].set_ylabel("b", fontsize=7)
    fig.suptitle(f"loss rise L(w + a d1 + b d2) - L(w), {split} split\n{_axis_note(load, temperature)}",
                 fontsize=8)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, fraction=0.05, shrink=0.8)
        bar.ax.tick_params(labelsize=6)
    return fig
