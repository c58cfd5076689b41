"""The rules on trajectories (`analysis.dynamics`) on trajectories built by hand, each rule at its threshold."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from phasediagram.analysis import dynamics
from phasediagram.analysis.dynamics import TrajectoryRule
from phasediagram.analysis.table import empty

LR = 0.2  # 2 / lr = 10
STEPS = range(0, 101, 5)


def trajectory(loss, lam, seed: int = 0, status: str = "ok", cell: str = "c", lr: float = LR) -> pd.DataFrame:
    """Rows of one run: loss(k) and lambda_max(k) at k in STEPS, with lr_lambda_max beside."""
    rows = []
    for k in STEPS:
        rows += [[k, "loss", loss(k)], [k, "lambda_max", lam(k)], [k, "lr_lambda_max", lr * lam(k)]]
    df = pd.DataFrame(rows, columns=["step", "quantity", "value"])
    cell_columns = {"experiment": "t", "cell": cell, "width": 8, "batch_size": 64, "lr": lr, "weight_decay": 0.0,
                    "train_fraction": 1.0, "label_noise": 0.0}
    return df.assign(seed=seed, status=status, epoch=df["step"] / 10, **cell_columns)


def eos(k):
    """Sharpening from 1 to 2 / lr by step 50, then hovering 3 % and 7 % above it in turn (median 5 %)."""
    return 1 + 9 * k / 50 if k <= 50 else 10 * (1.05 + 0.02 * (-1) ** (k // 5))


def catapult_loss(k):
    return {10: 5.0}.get(k, 1.0 if k < 10 else 0.5)


def catapult_lam(k):
    return 12.0 if k <= 10 else 6.0  # r = 1.2 before the spike, 0.6 after


def outcomes(df, status="ok", rule=None):
    return {name for name, holds in dynamics.run_outcomes(df, status, rule).items() if holds}


def test_edge_of_stability_after_progressive_sharpening():
    run = trajectory(lambda k: 1 / (1 + k), eos)
    assert outcomes(run) == {"edge_of_stability", "progressive_sharpening"}
    assert outcomes(run, rule=TrajectoryRule(eos_tolerance=0.04)) == {"progressive_sharpening"}
    assert outcomes(run, rule=TrajectoryRule(sharpening_factor=11)) == {"edge_of_stability"}


def test_catapult_needs_the_spike_and_then_lambda_max_below_two_over_lr():
    assert outcomes(trajectory(catapult_loss, catapult_lam)) == {"catapult"}
    assert outcomes(trajectory(catapult_loss, catapult_lam), rule=TrajectoryRule(catapult_factor=5.0)) == set()
    assert outcomes(trajectory(catapult_loss, lambda k: 12.0)) == set()  # lambda_max stays above 2 / lr
    late_spike = trajectory(lambda k: 5.0 if k == 40 else 1.0 if k < 40 else 0.5, catapult_lam)
    assert outcomes(late_spike) == set()  # after the first quarter


def test_divergence_excludes_the_rest():
    assert outcomes(trajectory(catapult_loss, catapult_lam), status="diverged") == {"diverged"}
    assert outcomes(trajectory(lambda k: math.inf if k == 100 else 1.0, eos)) == {"diverged"}


def test_a_cell_takes_the_first_outcome_most_of_its_seeds_show():
    runs = pd.concat([trajectory(catapult_loss, catapult_lam, seed=0), trajectory(catapult_loss, catapult_lam, seed=1),
                      trajectory(lambda k: 1.0, eos, seed=2, status="diverged"),
                      trajectory(lambda k: 1.0, lambda k: 1.0, seed=0, cell="d"),
                      trajectory(lambda k: 1.0, eos, seed=1, cell="d")])
    cells = dynamics.classify(runs).set_index("cell")
    assert cells.loc["c", "outcome"] == "catapult" and cells.loc["c", "catapult"] == pytest.approx(2 / 3)
    assert cells.loc["c", "diverged"] == pytest.approx(1 / 3) and cells.loc["c", "seeds"] == 3
    assert cells.loc["d", "outcome"] == "stable"  # edge of stability in one of two seeds: not more than half
    table = dynamics.with_outcomes(empty(), runs)
    assert set(table["source"]) == {"dynamics"} and set(table["kind"]) == {"diagnostic"}
    assert set(table["metric"]) == {*dynamics.RULES, "outcome"} and table["seed"].isna().all()
    read = dynamics.read_outcomes(table)
    assert dict(zip(read["cell"], read["outcome"])) == {"c": "catapult", "d": "stable"}
    assert dynamics.with_outcomes(table, runs).equals(table)  # replaced, not added twice
    assert dynamics.with_outcomes(table, runs.iloc[:0]) is table


@pytest.mark.parametrize("field, value", [("eos_tolerance", 0), ("last_fraction", 1.5), ("catapult_factor", 0.5),
                                          ("sharpening_factor", math.nan)])
def test_thresholds_are_checked(field, value):
    with pytest.raises(ValueError, match=f"TrajectoryRule.{field}"):
        TrajectoryRule(**{field: value})
