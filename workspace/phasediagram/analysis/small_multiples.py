"""Small multiples of phase maps: one load x temperature panel per value of a third axis.

A grid over three axes (e.g. width x batch size x training fraction, as the Model-Diagnosis
collections) is drawn as one categorical phase map (:func:`.plots.draw_phase_map`) per value of
the third axis `by`, in increasing order, on shared axis values, with one legend for the figure.
The phases are those of :func:`.phases.classify` on the whole table (measurements only), so every
panel uses the same rule.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from phasediagram.analysis import phases as phases_mod
from phasediagram.analysis.plots import axes_values, divergence, draw_phase_map, phase_grid
from phasediagram.errors import SpecError


def phase_small_multiples(df: pd.DataFrame, by: str = "train_fraction", load: str = "width",
                          temperature: str = "batch_size", rule: phases_mod.PhaseRule | None = None,
                          columns: int = 5, title: str | None = None) -> Figure:
    """One phase map per value of `by`; the Figure's ``titles`` list the panels' titles and
    ``phases`` holds the classification (one row per cell)."""
    table = df[df["source"] != phases_mod.PHASE_SOURCE]
    if table.empty:
        raise SpecError("figure", "the table holds no rows to draw")
    ph = phases_mod.classify(table, rule)
    xs, ys = axes_values(table, load, temperature)
    values = sorted(table[by].dropna().unique())
    cols = min(columns, len(values))
    rows = math.ceil(len(values) / cols)
    fig = Figure(figsize=(3.0 * cols + 0.8, 2.6 * rows + (0.5 if title else 0.2)))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    titles, seen = [], set()
    for ax, value in zip(axes.flat, values):
        part = table[table[by] == value]
        grid = phase_grid(ph[ph[by] == value], xs, ys, load, temperature)
        draw_phase_map(ax, grid, divergence(part, load, temperature), load, temperature)
        if ax.get_legend():
            ax.get_legend().remove()
        seen |= set(grid.to_numpy().ravel()) - {""}
        titles.append(f"{by} = {value:g}")
        ax.set_title(titles[-1], fontsize=9, loc="left")
        ax.label_outer()
    for ax in list(axes.flat)[len(values):]:
        ax.axis("off")
    order = [p for p in (*phases_mod.PHASES, *phases_mod.PARTIAL) if p in seen]
    fig.legend(handles=[Patch(color=phases_mod.PHASE_COLORS[p], label=p) for p in order], loc="center right",
               fontsize=8, frameon=False, title="phase", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 0.7 / fig.get_figwidth(), 1))
    fig.titles, fig.phases = titles, ph
    return fig
