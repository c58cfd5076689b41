"""Rank correlations between every metric and generalisation, over all cells and within each phase.

For every measured scalar quantity q of the table (one per (source, split, metric) of kind
"value"; standard errors, run diagnostics, training rows, curve points and phase rows are left
out) take its cell mean over seeds (and seed pairs),
and correlate it over cells with two targets:

- ``test_acc``: the mean test accuracy (percent);
- ``gap``: the generalisation gap, mean train accuracy - mean test accuracy (percent points).

Statistics, computed over the cells where both are finite:

- Kendall's tau (tau-b, which equals the pair-counting tau-a of Jiang et al. when nothing is
  tied) and Spearman's rho, over all cells (``group == "all"``) and within each phase
  (``group`` = the phase label, from :func:`phases.classify`); NaN with fewer than
  `min_cells` cells or a constant input.
- The granulated Kendall coefficient of Jiang et al. (2020, "Fantastic generalization measures
  and where to find them"), over all cells only: for each grid axis i that takes more than one
  value (load and temperature, and any other varying axis),

      psi_i = mean over the values theta_{-i} of the other axes of
              tau({(q(theta), g(theta)) : theta_i varies, theta_{-i} fixed}),
      Psi   = mean_i psi_i,

  where a slice with fewer than two finite cells, or a constant q or g, has no tau and is left
  out of the mean (``granulated_axes`` records psi_i per axis).

:func:`write` stores the table as CSV and as markdown, and draws a bar chart (PNG and PDF).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from phasediagram.analysis import phases as phases_mod
from phasediagram.analysis.plots import save_figure
from phasediagram.analysis.table import measurements
from phasediagram.storage.checkpoints import atomic_write_bytes

GRID_AXES = ("width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise")
TARGETS = ("test_acc", "gap")
EXCLUDED_SOURCES = ("train", phases_mod.PHASE_SOURCE)
RESULT_COLUMNS = ["quantity", "source", "split", "metric", "target", "group", "n", "kendall_tau", "spearman_rho",
                  "granulated_kendall", "granulated_axes"]


def quantity_name(source: str, split: str, metric: str) -> str:
    """A readable unique name: 'acc (train)', 'dist', ... ('-' splits are not named)."""
    return metric if split in ("-", "", None) else f"{metric} ({split})"


def cell_table(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, tuple[str, str, str]]]:
    """One row per cell: the grid axes, ``test_acc``, ``gap`` and the mean of every scalar quantity.

    Returns the wide table and {column name: (source, split, metric)} for the quantity columns.
    """
    sel = measurements(df)
    sel = sel[(sel["status"] == "ok") & sel["coord"].isna() & ~sel["source"].isin(EXCLUDED_SOURCES)
              & sel["value"].notna()]
    key = ["experiment", "cell", *GRID_AXES]
    base = df[key].drop_duplicates(["experiment", "cell"]).reset_index(drop=True)
    means = sel.groupby(["experiment", "cell", "source", "split", "metric"])["value"].mean().reset_index()
    names = {}
    for (source, split, metric), _ in means.groupby(["source", "split", "metric"]):
        name = quantity_name(source, split, metric)
        if name in names:
            name = f"{name} [{source}]"
        names[name] = (source, split, metric)
    wide = base
    for name, (source, split, metric) in names.items():
        col = means[(means["source"] == source) & (means["split"] == split) & (means["metric"] == metric)]
        wide = wide.merge(col[["experiment", "cell", "value"]].rename(columns={"value": name}),
                          on=["experiment", "cell"], how="left")

    def pick(metric, split):
        hits = [n for n, (so, sp, me) in names.items() if me == metric and sp == split]
        own = [n for n in hits if names[n][0] == "loss_acc"]
        return (own or hits or [None])[0]

    test_acc, train_acc = pick("acc", "test"), pick("acc", "train")
    wide["test_acc"] = wide[test_acc] if test_acc else np.nan
    wide["gap"] = (wide[train_acc] - wide["test_acc"]) if train_acc else np.nan
    return wide, names


def _finite(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def kendall(x, y, min_cells: int = 2) -> float:
    """Kendall's tau-b over the finite pairs; NaN if fewer than `min_cells` or an input is constant."""
    x, y = _finite(x, y)
    if len(x) < max(2, min_cells) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.kendalltau(x, y).statistic)


def spearman(x, y, min_cells: int = 2) -> float:
    """Spearman's rho over the finite pairs; NaN if fewer than `min_cells` or an input is constant."""
    x, y = _finite(x, y)
    if len(x) < max(2, min_cells) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def granulated_kendall(cells: pd.DataFrame, quantity: str, target: str,
                       axes: tuple[str, ...] | None = None) -> tuple[float, dict[str, float]]:
    """Psi = mean_i psi_i of Jiang et al. (module docstring); returns (Psi, {axis: psi_i}).

    `axes` defaults to every grid axis that takes more than one value in `cells`.
    """
    axes = axes or tuple(a for a in GRID_AXES if a in cells and cells[a].nunique(dropna=True) > 1)
    per_axis = {}
    for axis in axes:
        others = [a for a in GRID_AXES if a in cells and a != axis]
        taus = []
        groups = cells.groupby(others, dropna=False) if others else [((), cells)]
        for _, sl in groups:
            t = kendall(sl[quantity], sl[target])
            if not math.isnan(t):
                taus.append(t)
        per_axis[axis] = float(np.mean(taus)) if taus else math.nan
    vals = [v for v in per_axis.values() if not math.isnan(v)]
    return (float(np.mean(vals)) if vals else math.nan), per_axis


def correlations(df: pd.DataFrame, rule: phases_mod.PhaseRule | None = None, min_cells: int = 3,
                 phases: pd.DataFrame | None = None) -> pd.DataFrame:
    """The long correlation table: one row per (quantity, target, group); see the module docstring.

    `phases` (the output of :func:`phases.classify`) is computed with `rule` when not given.
    """
    table = df[df["source"] != phases_mod.PHASE_SOURCE]
    cells, names = cell_table(table)
    ph = phases if phases is not None else phases_mod.classify(table, rule)
    cells = cells.merge(ph[["experiment", "cell", "phase"]], on=["experiment", "cell"], how="left")
    cells["phase"] = cells["phase"].fillna("")
    groups = [("all", cells)] + [(p, cells[cells["phase"] == p]) for p in phases_mod.PHASES
                                 if (cells["phase"] == p).any()]
    rows = []
    for name, (source, split, metric) in names.items():
        for target in TARGETS:
            if (target == "test_acc" and (metric, split) == ("acc", "test")) or cells[target].isna().all():
                continue
            psi, per_axis = granulated_kendall(cells, name, target)
            for group, sub in groups:
                n = int((np.isfinite(sub[name].to_numpy(float)) & np.isfinite(sub[target].to_numpy(float))).sum())
                rows.append({"quantity": name, "source": source, "split": split, "metric": metric,
                             "target": target, "group": group, "n": n,
                             "kendall_tau": kendall(sub[name], sub[target], min_cells),
                             "spearman_rho": spearman(sub[name], sub[target], min_cells),
                             "granulated_kendall": psi if group == "all" else math.nan,
                             "granulated_axes": (";".join(f"{a}={v:.4g}" for a, v in per_axis.items())
                                                 if group == "all" else "")})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def summary(result: pd.DataFrame, target: str = "test_acc") -> pd.DataFrame:
    """Wide view for one target: per quantity, tau / rho / Psi over all cells and tau within each phase."""
    sub = result[result["target"] == target]
    if sub.empty:
        return pd.DataFrame(columns=["quantity"])
    allc = sub[sub["group"] == "all"].set_index("quantity")[["n", "kendall_tau", "spearman_rho", "granulated_kendall"]]
    allc = allc.rename(columns={"kendall_tau": "tau", "spearman_rho": "rho", "granulated_kendall": "Psi"})
    per = sub[sub["group"] != "all"].pivot(index="quantity", columns="group", values="kendall_tau")
    per = per[[p for p in phases_mod.PHASES if p in per.columns]].add_prefix("tau ")
    return allc.join(per).reset_index()


def to_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table (numbers to `digits` decimals, NaN as an empty cell)."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{v:.{digits}f}"
        return str(v)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join(" ---: " if pd.api.types.is_numeric_dtype(frame[c]) else " --- " for c in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


def markdown(result: pd.DataFrame) -> str:
    """Both targets' summaries as markdown, with a heading each."""
    titles = {"test_acc": "Correlation with test accuracy", "gap": "Correlation with the generalisation gap "
                                                                  "(train acc - test acc)"}
    parts = []
    for target in TARGETS:
        s = summary(result, target)
        if not s.empty:
            parts.append(f"### {titles[target]}\n\n"
                         "tau: Kendall, rho: Spearman over all cells; Psi: granulated Kendall (Jiang et al. 2020); "
                         "tau <phase>: Kendall within the phase.\n\n" + to_markdown(s))
    return "\n".join(parts) if parts else "No correlations: the table lacks test accuracy or metrics.\n"


def correlation_figure(result: pd.DataFrame) -> Figure:
    """Grouped bars per quantity (Kendall tau, Spearman rho, granulated Kendall Psi), one panel per target."""
    targets = [t for t in TARGETS if not summary(result, t).empty]
    n_q = max([len(summary(result, t)) for t in targets] or [1])
    fig = Figure(figsize=(max(4.0, 0.55 * n_q + 1.5) * max(1, len(targets)), 3.4))
    axes = fig.subplots(1, max(1, len(targets)), squeeze=False)
    labels = {"test_acc": "with test accuracy", "gap": "with generalisation gap"}
    for ax, target in zip(axes.flat, targets):
        s = summary(result, target)
        x = np.arange(len(s))
        for k, (col, name) in enumerate((("tau", "Kendall τ"), ("rho", "Spearman ρ"), ("Psi", "granulated Ψ"))):
            ax.bar(x + (k - 1) * 0.27, s[col].to_numpy(float), width=0.27, label=name)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(x, s["quantity"], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"rank correlation {labels[target]}", fontsize=9, loc="left")
        ax.legend(fontsize=6, frameon=False)
    if not targets:
        axes.flat[0].text(0.5, 0.5, "no correlations to show", ha="center", va="center")
        axes.flat[0].axis("off")
    fig.tight_layout()
    return fig


def write(result: pd.DataFrame, stem: str | Path, formats=("png", "pdf"), dpi: int = 200) -> list[Path]:
    """Write `<stem>.csv`, `<stem>.md` and `correlation_figure` as `<stem>.png|pdf`; return the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_bytes(csv, result.to_csv(index=False).encode())
    atomic_write_bytes(md, markdown(result).encode())
    return [csv, md, *save_figure(correlation_figure(result), stem, formats, dpi)]
