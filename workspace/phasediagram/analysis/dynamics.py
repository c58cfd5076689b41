"""Rules on trajectories: what each run's tracked sharpness and loss did, and each cell's outcome.

On one run's trajectory (rows of `analysis.trajectories.collect`), with the tracked steps k_0 = 0 < ...
< k_m, T = k_m, and r_k = lr_k lambda_max(k) / 2 (the tracked `lr_lambda_max` / 2: 1 is the edge of
stability, lambda_max = 2 / lr), every threshold a field of `TrajectoryRule`:

    diverged                the run's status is "diverged", or its last tracked loss is not finite
    edge_of_stability       |median of r_k over k >= (1 - last_fraction) T  -  1|  <=  eos_tolerance
                            (default: within 10 % of 2 / lr over the last quarter)
    catapult                the largest loss at k <= early_fraction T exceeds catapult_factor x loss(0),
                            and at the first point after that peak where the loss is back below loss(0),
                            r_k < 1 (Lewkowycz et al. 2020: the loss spikes, then lambda_max < 2 / lr)
    progressive_sharpening  max_k lambda_max(k) > sharpening_factor x lambda_max(0)

A diverged run holds no other outcome. A cell's outcome is the first of diverged, catapult,
edge_of_stability, progressive_sharpening that holds for more than half of its tracked seeds, else
"stable". In the results table (`with_outcomes`): per cell, one row per rule holding the fraction of
its seeds where the rule holds, and one row `outcome` holding the outcome's code (`OUTCOME_CODES`);
source "dynamics", split "train", no seed, kind "diagnostic" (so figures, phases and correlations,
which read the measurements, leave them out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from phasediagram.analysis.phases import CELL_COLUMNS
from phasediagram.analysis.table import COLUMNS, normalise
from phasediagram.metrics import DIAGNOSTIC

SOURCE = "dynamics"
RULES = ("diverged", "catapult", "edge_of_stability", "progressive_sharpening")  # in order of precedence
OUTCOMES = ("stable", "progressive_sharpening", "edge_of_stability", "catapult", "diverged")
OUTCOME_CODES = {name: i + 1 for i, name in enumerate(OUTCOMES)}


@dataclass(frozen=True)
class TrajectoryRule:
    """The thresholds of the rules (module docstring)."""

    eos_tolerance: float = 0.10
    last_fraction: float = 0.25
    catapult_factor: float = 2.0
    early_fraction: float = 0.25
    sharpening_factor: float = 2.0

    def __post_init__(self):
        for name in ("eos_tolerance", "last_fraction", "early_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValueError(f"TrajectoryRule.{name} must lie in (0, 1], got {v!r}")
        for name in ("catapult_factor", "sharpening_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 1):
                raise ValueError(f"TrajectoryRule.{name} must be a finite number >= 1, got {v!r}")


def run_outcomes(run: pd.DataFrame, status: str, rule: TrajectoryRule | None = None) -> dict[str, bool]:
    """{rule: holds} for one run's trajectory rows (step, quantity, value) and its status."""
    rule = rule or TrajectoryRule()
    series = {q: g.sort_values("step").set_index("step")["value"] for q, g in run.groupby("quantity")}
    loss, lam, ratio = series.get("loss"), series.get("lambda_max"), series.get("lr_lambda_max")
    out = dict.fromkeys(RULES, False)
    out["diverged"] = status == "diverged" or (loss is not None and not math.isfinite(loss.iloc[-1]))
    if out["diverged"]:
        return out
    total = int(run["step"].max())
    if ratio is not None:
        last = ratio[ratio.index >= (1 - rule.last_fraction) * total] / 2
        out["edge_of_stability"] = bool(len(last)) and abs(float(np.median(last)) - 1) <= rule.eos_tolerance
    if lam is not None and lam.iloc[0] > 0:
        out["progressive_sharpening"] = float(lam.max()) > rule.sharpening_factor * float(lam.iloc[0])
    if loss is not None and ratio is not None:
        out["catapult"] = _catapult(loss, ratio, total, rule)
    return out


def _catapult(loss: pd.Series, ratio: pd.Series, total: int, rule: TrajectoryRule) -> bool:
    early = loss[loss.index <= rule.early_fraction * total]
    if early.max() <= rule.catapult_factor * loss.iloc[0]:
        return False
    back = loss[(loss.index > early.idxmax()) & (loss < loss.iloc[0])]
    if back.empty or back.index[0] not in ratio.index:
        return False
    return bool(ratio[back.index[0]] / 2 < 1)


def classify(trajectories: pd.DataFrame, rule: TrajectoryRule | None = None) -> pd.DataFrame:
    """One row per cell: the cell columns, the fraction of its seeds where each rule holds, `seeds` and
    `outcome` (module docstring)."""
    records = []
    for _, cell in trajectories.groupby("cell", sort=False):
        runs = [run_outcomes(run, run["status"].iloc[0], rule) for _, run in cell.groupby("seed")]
        fractions = {name: float(np.mean([r[name] for r in runs])) for name in RULES}
        outcome = next((name for name in RULES if fractions[name] > 0.5), "stable")
        records.append({**{c: cell[c].iloc[0] for c in CELL_COLUMNS}, **fractions, "seeds": len(runs),
                        "outcome": outcome})
    return pd.DataFrame(records, columns=[*CELL_COLUMNS, *RULES, "seeds", "outcome"])


def outcome_rows(cells: pd.DataFrame) -> pd.DataFrame:
    """Results-table rows of `classify`'s cells (module docstring)."""
    rows = []
    for rec in cells.to_dict("records"):
        values = {**{name: rec[name] for name in RULES}, "outcome": float(OUTCOME_CODES[rec["outcome"]])}
        rows += [{**{c: rec[c] for c in CELL_COLUMNS}, "seed": None, "seed_b": None, "split": "train", "metric": name,
                  "coord": None, "value": value, "status": "ok", "source": SOURCE, "kind": DIAGNOSTIC}
                 for name, value in values.items()]
    return pd.DataFrame(rows, columns=COLUMNS)


def with_outcomes(table: pd.DataFrame, trajectories: pd.DataFrame, rule: TrajectoryRule | None = None) -> pd.DataFrame:
    """The results table with its dynamics rows replaced by fresh ones from `trajectories` (unchanged
    when there are none)."""
    if trajectories.empty:
        return table
    base = table[table["source"] != SOURCE]
    new = outcome_rows(classify(trajectories, rule))
    return normalise(pd.concat([f for f in (base, new) if not f.empty], ignore_index=True))


def read_outcomes(table: pd.DataFrame) -> pd.DataFrame:
    """The cell columns and `outcome` (a label) of the table's dynamics rows."""
    sel = table[(table["source"] == SOURCE) & (table["metric"] == "outcome")]
    names = {code: name for name, code in OUTCOME_CODES.items()}
    return sel[CELL_COLUMNS].assign(outcome=[names[int(v)] for v in sel["value"]]).reset_index(drop=True)
