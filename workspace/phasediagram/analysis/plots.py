"""The phase-diagram figure of Yang et al. (2021), drawn from the tidy results table.

:func:`phase_figure` draws, on one shared pair of axes per panel,

    (a) test accuracy, with the phase regions of :mod:`.phases` outlined and labelled
    (b) training loss                      (c) top Hessian eigenvalue (log colour scale; the
                                               largest-magnitude one where a table has only that)
    (d) Hessian trace, Hutch++ (Hutchinson where a table has no Hutch++ rows; log colour scale)
    (e) mode connectivity, diverging colormap centred at 0
    (f) CKA similarity                     (g) L2 distance between seeds
    (h) the phase map (categorical colours)

and one panel more for every further quantity registered in ``metrics.METRICS`` that the table
holds, e.g. the Fisher metric or the local energy. Every panel, (a)-(g) included, is drawn as its
registry entry's ``Panel`` says (label, colormap, log scale, range, fallback); `CORE_KEYS` only
picks the paper's seven and their order. A panel without a value to draw (no rows of its quantity
with status ``ok`` and a finite value: absent, or only NaN, diverged or missing rows) is left out
and named in a note under the figure.

Conventions:

- x: the load axis (width, ...), y: the temperature axis, both on log scales (linear if a value
  is <= 0); cells are centred on their values with edges at the geometric midpoints.
- High temperature at the top: small batch sizes, large learning rates, large weight decays.
- Each cell shows the mean over seeds (or seed pairs) of the rows with status ``ok``.
- A cell where every run diverged is hatched and labelled "diverged"; one where some runs
  diverged is hatched lightly and labelled "k/n div". A cell without data stays blank
  (transparent), never zero; on a log colour scale a mean <= 0 is blank too and noted.
- Colour ranges: `ranges` maps a quantity name (or "source/quantity") to (vmin, vmax) in data
  units; otherwise the panel's default; otherwise the data's min and max (for a centred panel,
  symmetric about the centre).
"""

from __future__ import annotations

import io
import math
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from phasediagram.analysis import phases as phases_mod
from phasediagram.analysis.table import measurements
from phasediagram.metrics import METRICS, Panel
from phasediagram.storage.checkpoints import atomic_write_bytes

AXIS_LABELS = {"width": "width (load)", "train_fraction": "training-set fraction (load)",
               "label_noise": "label-noise fraction (load)", "batch_size": "batch size (temperature)",
               "lr": "learning rate (temperature)", "weight_decay": "weight decay (temperature)"}
# Temperature axes whose *small* values are the high temperature (drawn at the top).
HOT_WHEN_SMALL = {"batch_size"}
STEPS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # the 4-neighbourhood of a cell


@dataclass(frozen=True)
class PanelSpec:
    """One panel of the figure: which rows it averages and how it is drawn."""

    source: str
    panel: Panel

    @property
    def fallback(self) -> Panel | None:
        return self.panel.fallback

    @property
    def key(self) -> tuple[str, str, str]:
        return self.source, self.panel.quantity, self.panel.split

    def panels(self) -> tuple[Panel, ...]:
        return (self.panel,) if self.fallback is None else (self.panel, self.fallback)

    def for_table(self, df: pd.DataFrame) -> "PanelSpec":
        """This spec, or its fallback where the table has rows of the fallback's quantity only."""
        if self.fallback is None or has_data(df, self):
            return self
        alternative = PanelSpec(self.source, replace(self.fallback, fallback=None))
        return alternative if has_data(df, alternative) else self


# The paper's panels (a)-(g), in its order: (metric, quantity, split) of registered panels.
CORE_KEYS = (
    ("loss_acc", "acc", "test"),
    ("loss_acc", "loss", "train"),
    ("hessian", "top_eigenvalue", "train"),
    ("hessian", "trace_hutchpp", "train"),
    ("curve", "mc", "train"),
    ("CKA", "cka_softmax", "train"),
    ("dist", "dist", "-"),
)


def registered(source: str, quantity: str, split: str) -> PanelSpec:
    """The panel `metrics.METRICS[source]` registers for (quantity, split)."""
    return PanelSpec(source, next(p for p in METRICS[source].panels if (p.quantity, p.split) == (quantity, split)))


CORE = tuple(registered(*key) for key in CORE_KEYS)


class PhaseFigure(Figure):
    """The matplotlib Figure :func:`phase_figure` draws, carrying what it drew: `titles` (one per
    panel), `notes` (panels left out, values a log scale cannot show) and `phases` (per cell)."""

    titles: list[str]
    notes: list[str]
    phases: pd.DataFrame


def _positive(values) -> bool:
    return all(v > 0 for v in values)


def edges(values) -> np.ndarray:
    """Cell edges for sorted `values`: geometric midpoints on a log axis (arithmetic if a value is <= 0)."""
    v = np.asarray(sorted(values), dtype=float)
    log = _positive(v)
    t = np.log(v) if log else v
    if len(t) == 1:
        half = 0.4 if log else max(abs(t[0]) * 0.5, 0.5)
        e = np.array([t[0] - half, t[0] + half])
    else:
        mid = (t[1:] + t[:-1]) / 2
        e = np.concatenate([[t[0] - (mid[0] - t[0])], mid, [t[-1] + (t[-1] - mid[-1])]])
    return np.exp(e) if log else e


def axes_values(df: pd.DataFrame, load: str, temperature: str) -> tuple[list, list]:
    """Sorted distinct load and temperature values of the table (every panel uses these axes)."""
    xs = sorted(v for v in pd.unique(df[load]) if pd.notna(v))
    ys = sorted(v for v in pd.unique(df[temperature]) if pd.notna(v))
    return xs, ys


def infer_axes(df: pd.DataFrame) -> tuple[str, str]:
    """(load, temperature): the first load axis and the first temperature axis that vary in the
    table (width and batch size when none does)."""
    def varying(axes, default):
        return next((a for a in axes if a in df and df[a].nunique(dropna=True) > 1), default)

    return (varying(("width", "train_fraction", "label_noise"), "width"),
            varying(("batch_size", "lr", "weight_decay"), "batch_size"))


def cell_grid(df: pd.DataFrame, spec: PanelSpec, xs, ys, load: str, temperature: str) -> pd.DataFrame:
    """Mean over seeds of the panel's quantity, reindexed to the full axes (NaN where missing).

    Rows of the panel's source are used; if the table has none, rows of the same quantity and
    split from any source (a table written by other tools).
    """
    sel = panel_rows(df, spec)
    if sel.empty:
        return pd.DataFrame(np.nan, index=ys, columns=xs)
    grid = sel.groupby([temperature, load])["value"].mean().unstack(load)
    return grid.reindex(index=ys, columns=xs).astype(float)


def panel_rows(df: pd.DataFrame, spec: PanelSpec) -> pd.DataFrame:
    """The rows a panel averages: measurements of its quantity and split without a coordinate, with
    status ok and a finite value; those of its source, or of any source where its source has none."""
    p, sel = spec.panel, measurements(df)
    sel = sel[(sel["metric"] == p.quantity) & (sel["split"] == p.split) & (sel["status"] == "ok") & sel["coord"].isna()
              & np.isfinite(sel["value"].astype(float))]
    own = sel[sel["source"] == spec.source]
    return own if not own.empty else sel


def has_data(df: pd.DataFrame, spec: PanelSpec) -> bool:
    """Whether the panel has a value to draw."""
    return not panel_rows(df, spec).empty


def divergence(df: pd.DataFrame, load: str, temperature: str) -> dict[tuple, tuple[int, int]]:
    """{(temperature, load): (runs diverged, runs)} for every cell with at least one diverged run.

    Runs are the seeds of the training rows (source 'train'); a table without training rows
    uses the per-seed rows (no seed_b) of any source. A run counts as diverged if any of its
    rows has status 'diverged'.
    """
    runs = df[df["source"] == "train"]
    if runs.empty:
        runs = df[df["seed_b"].isna() & df["seed"].notna()]
    if runs.empty:
        return {}
    per_run = runs.groupby([temperature, load, "seed"])["status"].agg(lambda s: bool((s == "diverged").any()))
    per_cell = per_run.groupby(level=[0, 1]).agg(["sum", "count"])
    return {k: (int(r["sum"]), int(r["count"])) for k, r in per_cell.iterrows() if r["sum"] > 0}


def _range(spec: PanelSpec, ranges: dict) -> tuple:
    for k in (f"{spec.source}/{spec.panel.quantity}", spec.panel.quantity):
        if k in ranges:
            return tuple(ranges[k])
    return spec.panel.vmin, spec.panel.vmax


def tick_labels(values, min_gap: float) -> list[str]:
    """Labels for ticks at sorted `values`: the first and the last always, and in between, greedily,
    each one at least `min_gap` (a fraction of the axis, log or linear as the axis) after the
    last one kept and before the last value."""
    t = np.log(np.asarray(values, float)) if _positive(values) else np.asarray(values, float)
    span = float(t[-1] - t[0]) or 1.0
    out, last = [], None
    for k, (v, x) in enumerate(zip(values, t)):
        keep = last is None or k == len(values) - 1 or (
            (x - last) / span >= min_gap and (t[-1] - x) / span >= min_gap)
        out.append(f"{v:g}" if keep else "")
        last = x if keep else last
    return out


def _ticks(ax, values, axis: str):
    labels = tick_labels(values, 0.09 if axis == "x" else 0.05)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(values, labels, fontsize=6.5)


def _frame(ax, xs, ys, load: str, temperature: str):
    """Log axes (linear if a value is <= 0), cell extents, ticks at the values, high temperature on top."""
    ex, ey = edges(xs), edges(ys)
    ax.set_xscale("log" if _positive(xs) else "linear")
    ax.set_yscale("log" if _positive(ys) else "linear")
    ax.set_xlim(ex[0], ex[-1])
    ax.set_ylim((ey[-1], ey[0]) if temperature in HOT_WHEN_SMALL else (ey[0], ey[-1]))
    ax.minorticks_off()
    _ticks(ax, xs, "x")
    _ticks(ax, ys, "y")
    ax.set_xlabel(AXIS_LABELS.get(load, load), fontsize=8)
    ax.set_ylabel(AXIS_LABELS.get(temperature, temperature), fontsize=8)
    ax.set_facecolor("white")
    ax.autoscale(False)
    return ex, ey


def _mark_diverged(ax, xs, ys, ex, ey, diverged: dict):
    for (t, l), (k, n) in diverged.items():
        if l not in xs or t not in ys:
            continue
        i, j = ys.index(t), xs.index(l)
        full = k == n
        ax.add_patch(Rectangle((ex[j], ey[i]), ex[j + 1] - ex[j], ey[i + 1] - ey[i], fill=False, linewidth=0,
                               hatch="xxx" if full else "///", edgecolor="#b00000" if full else "#555555"))
        cx = math.sqrt(ex[j] * ex[j + 1]) if ex[0] > 0 else (ex[j] + ex[j + 1]) / 2
        cy = math.sqrt(ey[i] * ey[i + 1]) if ey[0] > 0 else (ey[i] + ey[i + 1]) / 2
        ax.text(cx, cy, "diverged" if full else f"{k}/{n} div", ha="center", va="center", fontsize=4.5,
                color="#b00000" if full else "#333333", rotation=0 if len(xs) < 8 else 90)


def heatmap(ax, grid: pd.DataFrame, panel: Panel, diverged: dict | None = None, vmin=None, vmax=None,
            load: str = "width", temperature: str = "batch_size"):
    """Draw one panel from `grid` (temperature rows x load columns, NaN = missing); return (mesh, notes)."""
    xs, ys = list(grid.columns), list(grid.index)
    z = grid.to_numpy(dtype=float)
    notes = []
    if panel.log:
        non_positive = int(np.sum(np.isfinite(z) & (z <= 0)))
        if non_positive:
            notes.append(f"{panel.label}: {non_positive} cell(s) <= 0 left blank on the log scale")
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)
        vmin = math.log10(vmin) if vmin is not None and vmin > 0 else None
        vmax = math.log10(vmax) if vmax is not None and vmax > 0 else None
    else:
        shown = np.where(np.isfinite(z), z, np.nan)
    finite = shown[np.isfinite(shown)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if panel.center is not None:
        c = panel.center
        span = max(abs(lo - c), abs(hi - c), 1e-12)
        norm = colors.TwoSlopeNorm(c, c - span, c + span)
    else:
        norm = colors.Normalize(lo, hi if hi > lo else lo + 1e-12)
    cmap = matplotlib.colormaps[panel.cmap].with_extremes(bad=(0, 0, 0, 0))
    ex, ey = _frame(ax, xs, ys, load, temperature)
    mesh = ax.pcolormesh(ex, ey, np.ma.masked_invalid(shown), cmap=cmap, norm=norm, shading="flat")
    _mark_diverged(ax, xs, ys, ex, ey, diverged or {})
    cbar = ax.figure.colorbar(mesh, ax=ax, fraction=0.046, pad=0.03)
    cbar.ax.tick_params(labelsize=6)
    if panel.log:
        cbar.set_label("log10", fontsize=6)
    return mesh, notes


def phase_grid(phases: pd.DataFrame, xs, ys, load: str, temperature: str) -> pd.DataFrame:
    """The phase label of every cell on the full axes ('' where unclassified or missing)."""
    if phases.empty:
        return pd.DataFrame("", index=ys, columns=xs)
    grid = phases.drop_duplicates([temperature, load]).pivot(index=temperature, columns=load, values="phase")
    return grid.reindex(index=ys, columns=xs).fillna("").astype(str)


def _components(labels: np.ndarray) -> list[tuple[str, list[tuple[int, int]]]]:
    """4-connected regions of equal non-empty label: (label, cells)."""
    seen = np.zeros(labels.shape, bool)
    out = []
    for i0, j0 in np.ndindex(labels.shape):
        if seen[i0, j0] or not labels[i0, j0]:
            continue
        lab, cells, queue = labels[i0, j0], [], deque([(i0, j0)])
        seen[i0, j0] = True
        while queue:
            i, j = queue.popleft()
            cells.append((i, j))
            for a, b in ((i + di, j + dj) for di, dj in STEPS):
                if 0 <= a < labels.shape[0] and 0 <= b < labels.shape[1] and not seen[a, b] and labels[a, b] == lab:
                    seen[a, b] = True
                    queue.append((a, b))
        out.append((lab, cells))
    return out


def _depth(cell: tuple[int, int], inside: set) -> int:
    """How many cells a region (`inside`) extends from `cell` in all four directions."""
    d = 0
    while all((cell[0] + a * (d + 1), cell[1] + b * (d + 1)) in inside for a, b in STEPS):
        d += 1
    return d


def label_cells(labels: np.ndarray) -> dict[str, tuple[int, int]]:
    """For each label, the cell of its largest region deepest inside it (ties: nearest the region's centre)."""
    best: dict[str, list] = {}
    for lab, cells in _components(labels):
        if lab in best and len(best[lab]) >= len(cells):
            continue
        best[lab] = cells
    out = {}
    for lab, cells in best.items():
        inside = set(cells)
        ci = np.mean([c[0] for c in cells])
        cj = np.mean([c[1] for c in cells])
        out[lab] = max(cells, key=lambda c: (_depth(c, inside), -((c[0] - ci) ** 2 + (c[1] - cj) ** 2)))
    return out


def draw_boundaries(ax, labels: np.ndarray, ex, ey, color="black", linewidth=1.6):
    """Draw the cell edges between neighbouring cells of different (non-empty) phase labels."""
    n, m = labels.shape
    for i in range(n):
        for j in range(m):
            if j + 1 < m and labels[i, j] and labels[i, j + 1] and labels[i, j] != labels[i, j + 1]:
                ax.plot([ex[j + 1]] * 2, [ey[i], ey[i + 1]], color=color, linewidth=linewidth, solid_capstyle="round")
            if i + 1 < n and labels[i, j] and labels[i + 1, j] and labels[i, j] != labels[i + 1, j]:
                ax.plot([ex[j], ex[j + 1]], [ey[i + 1]] * 2, color=color, linewidth=linewidth, solid_capstyle="round")


def _centre(e, k):
    return math.sqrt(e[k] * e[k + 1]) if e[0] > 0 else (e[k] + e[k + 1]) / 2


def label_anchor(e, k: int) -> tuple[float, str]:
    """Where the label of cell k along an axis with edges `e` sits and how it is aligned: at the centre
    of an inner cell, against the outer edge of a first or last cell (so it stays inside the axes)."""
    if len(e) > 2 and k == 0:
        return e[0], "left"
    if len(e) > 2 and k == len(e) - 2:
        return e[-1], "right"
    return _centre(e, k), "center"


def draw_phase_labels(ax, labels: np.ndarray, ex, ey, fontsize=9, box=True):
    for lab, (i, j) in label_cells(labels).items():
        x, ha = label_anchor(ex, j)
        ax.text(x, _centre(ey, i), lab, ha=ha, va="center", fontsize=fontsize, fontweight="bold",
                color="black", bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75) if box else None)


def draw_phase_map(ax, grid: pd.DataFrame, diverged: dict | None = None, load="width", temperature="batch_size"):
    """Categorical phase map: one colour per phase, region labels, legend; unclassified cells blank."""
    xs, ys = list(grid.columns), list(grid.index)
    labels = grid.to_numpy(dtype=object)
    order = [p for p in (*phases_mod.PHASES, *phases_mod.PARTIAL) if (labels == p).any()]
    codes = np.full(labels.shape, np.nan)
    for k, p in enumerate(order):
        codes[labels == p] = k
    ex, ey = _frame(ax, xs, ys, load, temperature)
    if order:
        cmap = colors.ListedColormap([phases_mod.PHASE_COLORS[p] for p in order]).with_extremes(bad=(0, 0, 0, 0))
        ax.pcolormesh(ex, ey, np.ma.masked_invalid(codes), cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5,
                      shading="flat")
        draw_boundaries(ax, labels, ex, ey, linewidth=1.0)
        draw_phase_labels(ax, labels, ex, ey, fontsize=8, box=False)
        ax.legend(handles=[Patch(color=phases_mod.PHASE_COLORS[p], label=p) for p in order], fontsize=6,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, handlelength=1.0)
    _mark_diverged(ax, xs, ys, ex, ey, diverged or {})
    return labels


def further_panels(df: pd.DataFrame) -> list[PanelSpec]:
    """Registered panels (metrics.METRICS) whose quantity is in the table and not among the core panels."""
    core = {(w, p.quantity, p.split) for s in CORE for p in s.panels() for w in (s.source, None)}
    present = set(zip(df["source"], df["metric"], df["split"]))
    out = []
    for name, metric in METRICS.items():
        for p in metric.panels:
            if (name, p.quantity, p.split) in present and (name, p.quantity, p.split) not in core \
                    and (None, p.quantity, p.split) not in core:
                out.append(PanelSpec(name, p))
    return out


def save_figure(fig: Figure, path: str | Path, formats=("png", "pdf"), dpi: int = 200) -> list[Path]:
    """Write `fig` to `path` in each of `formats` (the suffix of `path` replaced by each format's;
    `dpi` applies to raster formats), each file atomically; return the paths written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("") if path.suffix.lower() in (".png", ".pdf", ".svg") else path
    written = []
    for fmt in formats:
        out = stem.with_suffix(f".{fmt}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight")
        atomic_write_bytes(out, buffer.getvalue())
        written.append(out)
    return written


def _left_out(spec: PanelSpec) -> str:
    return (f"left out: {spec.panel.label} (no finite '{spec.panel.quantity}' value, split '{spec.panel.split}', "
            f"in the table)")


def phase_figure(df: pd.DataFrame, load: str = "width", temperature: str = "batch_size",
                 ranges: dict | None = None, rule: phases_mod.PhaseRule | None = None, columns: int = 4,
                 title: str | None = None) -> PhaseFigure:
    """The multi-panel phase-diagram figure (module docstring) of the table `df`.

    Panels lacking data are left out and named in a note at the foot of the figure; nothing is
    raised for a table that holds no metric at all (the figure then says so). Saving is the
    caller's: `save_figure(fig, path)` or `fig.savefig`.
    """
    ranges = ranges or {}
    table = df[df["source"] != phases_mod.PHASE_SOURCE]
    xs, ys = axes_values(table, load, temperature)
    ph = phases_mod.classify(table, rule)
    pgrid = phase_grid(ph, xs, ys, load, temperature)
    diverged = divergence(table, load, temperature)
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    drawn: list[tuple[str, PanelSpec | None]] = []
    notes = []
    for spec in (c.for_table(table) for c in CORE):
        if has_data(table, spec):
            drawn.append((next(letters), spec))
        else:
            notes.append(_left_out(spec))
    has_phases = bool(pgrid.to_numpy(dtype=object).astype(bool).any())
    if has_phases:
        drawn.append((next(letters), None))
    else:
        notes.append("left out: phase map (no cell could be classified: needs mc and training loss)")
    for spec in further_panels(table):
        if has_data(table, spec):
            drawn.append((next(letters), spec))
        else:
            notes.append(_left_out(spec))
    n = max(1, len(drawn))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = PhaseFigure(figsize=(3.5 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    titles = []
    for ax, (letter, spec) in zip(axes.flat, drawn):
        if spec is None:
            draw_phase_map(ax, pgrid, diverged, load, temperature)
            t = f"({letter}) phases"
        else:
            grid = cell_grid(table, spec, xs, ys, load, temperature)
            vmin, vmax = _range(spec, ranges)
            _, more = heatmap(ax, grid, spec.panel, diverged, vmin, vmax, load, temperature)
            notes.extend(more)
            t = f"({letter}) " + ("log10 " if spec.panel.log else "") + spec.panel.label
            if letter == "a" and has_phases:
                ex, ey = edges(xs), edges(ys)
                labels = pgrid.to_numpy(dtype=object)
                draw_boundaries(ax, labels, ex, ey, color="white", linewidth=2.6)
                draw_boundaries(ax, labels, ex, ey, color="black", linewidth=1.2)
                draw_phase_labels(ax, labels, ex, ey)
        ax.set_title(t, fontsize=9, loc="left")
        titles.append(t)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    if not drawn:
        axes.flat[0].text(0.5, 0.5, "no metric results in the table yet", ha="center", va="center")
        axes.flat[0].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if notes:
        fig.text(0.01, 0.0, "\n".join(notes), fontsize=6, va="top", ha="left", color="#444444")
    fig.titles, fig.notes, fig.phases = titles, notes, ph
    return fig


def phase_map(df: pd.DataFrame, load: str = "width", temperature: str = "batch_size",
              rule: phases_mod.PhaseRule | None = None) -> Figure:
    """The categorical phase map alone (the phases of :func:`phases.classify`)."""
    table = df[df["source"] != phases_mod.PHASE_SOURCE]
    xs, ys = axes_values(table, load, temperature)
    grid = phase_grid(phases_mod.classify(table, rule), xs, ys, load, temperature)
    fig = Figure(figsize=(4.6, 3.4))
    ax = fig.add_subplot()
    draw_phase_map(ax, grid, divergence(table, load, temperature), load, temperature)
    ax.set_title("phases", fontsize=10, loc="left")
    fig.tight_layout()
    return fig
