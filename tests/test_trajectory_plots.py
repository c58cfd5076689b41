"""The trajectory figures (`analysis.trajectory_plots`) on trajectories built by hand over a 2 x 2 grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phasediagram.analysis import dynamics, trajectory_plots
from phasediagram.errors import SpecError

STEPS = (0, 1, 2, 5, 10, 20, 50, 100)


def trajectories() -> pd.DataFrame:
    """Two seeds of four cells (width 8, 16 x lr 0.1, 0.2): lambda_max rising to 2 / lr at lr 0.2 only."""
    rows = []
    for width in (8, 16):
        for lr in (0.1, 0.2):
            for seed in (0, 1):
                for k in STEPS:
                    lam = 1 + (9 if lr == 0.2 else 2) * k / 100 + 0.01 * seed
                    values = {"loss": 2.0 / (1 + k), "lambda_max": lam, "two_over_lr": 2 / lr, "lr_lambda_max": lr * lam}
                    rows += [{"experiment": "t", "cell": f"w{width}_lr{lr}", "width": width, "batch_size": 32, "lr": lr,
                              "weight_decay": 0.0, "train_fraction": 1.0, "label_noise": 0.0, "seed": seed,
                              "status": "ok", "step": k, "epoch": k / 10, "quantity": q, "value": v}
                             for q, v in values.items()]
    return pd.DataFrame(rows)


def test_grid_figure_draws_every_cell_with_its_outcome(tmp_path):
    df = trajectories()
    fig = trajectory_plots.grid_figure(df, "width", "lr")
    assert fig.titles == ["width 8, lr 0.1\nprogressive sharpening", "width 16, lr 0.1\nprogressive sharpening",
                          "width 8, lr 0.2\nedge of stability", "width 16, lr 0.2\nedge of stability"]
    assert fig.outcomes.equals(dynamics.classify(df).reset_index(drop=True)[fig.outcomes.columns])
    ax = fig.axes[2]  # width 8, lr 0.2
    lines = ax.get_lines()
    assert len(lines) == 3  # two seeds and 2 / lr
    assert np.allclose(lines[2].get_ydata(), 10.0) and lines[2].get_linestyle() == "--"
    assert np.allclose(lines[0].get_ydata(), df[(df["cell"] == "w8_lr0.2") & (df["seed"] == 0)
                                                & (df["quantity"] == "lambda_max")]["value"])
    assert ax.get_xscale() == "symlog" and ax.get_ylim()[1] == pytest.approx(1.15 * 10.01)
    fig.savefig(tmp_path / "grid.png")


def test_cell_figure_has_lambda_max_with_two_over_lr_and_the_loss(tmp_path):
    df = trajectories()
    fig = trajectory_plots.cell_figure(df, "w16_lr0.1")
    sharpness, loss = fig.axes
    assert len(sharpness.get_lines()) == 3 and np.allclose(sharpness.get_lines()[2].get_ydata(), 20.0)
    assert len(loss.get_lines()) == 2 and loss.get_yscale() == "log"
    fig.savefig(tmp_path / "cell.png")


def test_non_finite_points_are_left_out_of_the_lines():
    df = trajectories()
    df.loc[(df["cell"] == "w8_lr0.1") & (df["seed"] == 1) & (df["step"] == 100), "value"] = np.inf
    fig = trajectory_plots.cell_figure(df, "w8_lr0.1")
    assert len(fig.axes[1].get_lines()[1].get_xdata()) == len(STEPS) - 1


@pytest.mark.parametrize("call, message", [
    (lambda df: trajectory_plots.cell_figure(df.iloc[:0]), "no tracked trajectories"),
    (lambda df: trajectory_plots.cell_figure(df), "the trajectories hold 4 cells"),
    (lambda df: trajectory_plots.cell_figure(df, "w4_lr1"), "cell 'w4_lr1' has no trajectory"),
    (lambda df: trajectory_plots.grid_figure(df, quantity="trace"), "'trace' was not tracked"),
])
def test_what_cannot_be_drawn_is_refused(call, message):
    with pytest.raises(SpecError, match=message):
        call(trajectories())
