"""Figures of tracked trajectories (`analysis.trajectories.collect`), each a function returning a Figure.

- `cell_figure`: one cell, two panels against the step: lambda_max with the line 2 / lr (dashed; it
  steps down where the schedule lowers the lr), and the loss on the tracked subset (log scale),
  every seed overlaid in its own colour.
- `grid_figure`: small multiples over the grid, one panel per cell (temperature axis down, load axis
  across, both in increasing order): a quantity (lambda_max by default, with 2 / lr) of every seed,
  each panel titled and framed in the colour of the cell's outcome (`analysis.dynamics.classify`).

The step axis is symlog (linear below 1, logarithmic above), since the tracked steps are log-spaced
from 0. Non-finite values (a diverged run's last points) are left out of the lines. A lambda_max
panel reaches up to its largest value or the lowest 2 / lr, whichever is higher (a 2 / lr raised
tenfold by the schedule's decay runs off its top). The Figure's
`titles` list the panels' titles; `grid_figure`'s `outcomes` holds the classification.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from phasediagram.analysis import dynamics
from phasediagram.errors import SpecError

OUTCOME_COLORS = {"stable": "#7f7f7f", "progressive_sharpening": "#9467bd", "edge_of_stability": "#ff7f0e",
                  "catapult": "#17becf", "diverged": "#d62728"}
LABELS = {"lambda_max": r"$\lambda_{max}$", "loss": "loss (subset)", "trace": "tr H", "grad_norm": "|g|",
          "noise_scale": r"$B_{simple}$", "weight_norm": r"$|\theta|$", "distance": r"$|\theta - \theta_0|$",
          "accuracy": "accuracy (%, subset)", "lr_lambda_max": r"lr $\lambda_{max}$"}
LOG_SCALE = ("loss", "noise_scale", "grad_norm")


def _series(rows: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """The finite (step, value) points of `quantity`, by step."""
    sel = rows[(rows["quantity"] == quantity) & np.isfinite(rows["value"].astype(float))]
    return sel.sort_values("step")[["step", "value"]]


def _draw(ax, runs: pd.DataFrame, quantity: str, colors: dict) -> None:
    """`quantity` of every seed of `runs`, and 2 / lr beside lambda_max (or 2 beside lr lambda_max)."""
    for seed, rows in runs.groupby("seed"):
        line = _series(rows, quantity)
        ax.plot(line["step"], line["value"], color=colors[seed], lw=1.0, marker=".", ms=2.5)
    if quantity == "lambda_max":
        limit = _series(runs[runs["seed"] == runs["seed"].min()], "two_over_lr")
        ax.plot(limit["step"], limit["value"], color="k", ls="--", lw=0.9, drawstyle="steps-post")
        values = _series(runs, quantity)["value"]
        if len(values) and len(limit):
            ax.set_ylim(min(0.0, float(values.min())), 1.15 * max(float(values.max()), float(limit["value"].min())))
    if quantity == "lr_lambda_max":
        ax.axhline(2.0, color="k", ls="--", lw=0.9)
    ax.set_xscale("symlog", linthresh=1.0)
    if quantity in LOG_SCALE:
        ax.set_yscale("log")


def _colors(seeds) -> dict:
    palette = ("#1f77b4", "#2ca02c", "#8c564b", "#e377c2", "#bcbd22", "#ff7f0e", "#9467bd", "#7f7f7f")
    return {s: palette[i % len(palette)] for i, s in enumerate(sorted(seeds))}


def cell_figure(trajectories: pd.DataFrame, cell: str | None = None) -> Figure:
    """lambda_max with 2 / lr, and the loss, against the step for one cell (the only one when None)."""
    cells = list(dict.fromkeys(trajectories["cell"]))
    if not cells:
        raise SpecError("figure", "no tracked trajectories to draw (was the study trained with `track`?)")
    if cell is None and len(cells) > 1:
        raise SpecError("figure", f"the trajectories hold {len(cells)} cells; name one of {', '.join(cells)}")
    cell = cells[0] if cell is None else cell
    if cell not in cells:
        raise SpecError("figure", f"cell {cell!r} has no trajectory; tracked cells: {', '.join(cells)}")
    runs = trajectories[trajectories["cell"] == cell]
    colors = _colors(runs["seed"].unique())
    fig = Figure(figsize=(8.0, 3.0), layout="constrained")
    axes = fig.subplots(1, 2)
    titles = []
    for ax, quantity in zip(axes, ("lambda_max", "loss")):
        _draw(ax, runs, quantity, colors)
        ax.set_xlabel("step")
        ax.set_ylabel(LABELS[quantity])
        titles.append(f"{LABELS[quantity]}: {cell}")
        ax.set_title(titles[-1], fontsize=8, loc="left")
    handles = [Line2D([], [], color=c, lw=1.2, label=f"seed {s}") for s, c in colors.items()]
    handles.append(Line2D([], [], color="k", ls="--", lw=0.9, label="2 / lr"))
    axes[0].legend(handles=handles, fontsize=7, frameon=False)
    fig.titles = titles
    return fig


def grid_figure(trajectories: pd.DataFrame, load: str = "width", temperature: str = "batch_size",
                quantity: str = "lambda_max", rule: dynamics.TrajectoryRule | None = None) -> Figure:
    """Small multiples of `quantity` against the step over the load x temperature grid (module docstring)."""
    if trajectories.empty:
        raise SpecError("figure", "no tracked trajectories to draw (was the study trained with `track`?)")
    if quantity not in set(trajectories["quantity"]):
        raise SpecError("figure", f"{quantity!r} was not tracked; tracked: {', '.join(sorted(set(trajectories['quantity'])))}")
    outcomes = dynamics.classify(trajectories, rule).set_index("cell")
    xs, ys = sorted(trajectories[load].unique()), sorted(trajectories[temperature].unique())
    fig = Figure(figsize=(2.4 * len(xs) + 0.6, 1.9 * len(ys) + 0.8), layout="constrained")
    axes = fig.subplots(len(ys), len(xs), squeeze=False, sharex=True)
    colors = _colors(trajectories["seed"].unique())
    titles = []
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            ax = axes[i, j]
            part = trajectories[(trajectories[load] == x) & (trajectories[temperature] == y)]
            if part.empty:
                ax.axis("off")
                continue
            _draw(ax, part, quantity, colors)
            outcome = outcomes.loc[part["cell"].iloc[0], "outcome"]
            titles.append(f"{load} {x:g}, {temperature} {y:g}\n{outcome.replace('_', ' ')}")
            ax.set_title(titles[-1], fontsize=7, loc="left", color=OUTCOME_COLORS[outcome])
            for side in ax.spines.values():
                side.set_edgecolor(OUTCOME_COLORS[outcome])
                side.set_linewidth(1.5)
            ax.tick_params(labelsize=7)
            if i == len(ys) - 1:
                ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel(LABELS.get(quantity, quantity), fontsize=8)
    handles = [Line2D([], [], color=c, lw=1.2, label=f"seed {s}") for s, c in colors.items()]
    if quantity in ("lambda_max", "lr_lambda_max"):
        handles.append(Line2D([], [], color="k", ls="--", lw=0.9, label="2 / lr" if quantity == "lambda_max" else "2"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.titles, fig.outcomes = titles, outcomes.reset_index()
    return fig
