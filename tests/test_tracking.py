"""Tracking the landscape during training (`training.tracking`): the spec, the storage, and the physics.

Physics, in float64 where a value is exact:
- a quadratic loss L = theta^T A theta / 2 with known A: the tracked lambda_max is A's top eigenvalue,
  and gradient descent diverges exactly where lr > 2 / lambda_max (2 % either side);
- edge of stability (Cohen et al. 2021): a tanh MLP (4-32-32-3, 64 points, MSE, random targets) under
  full-batch GD sharpens from lambda_max ~ 2.5 to 2 / lr and stays there: the median of
  lambda_max / (2 / lr) over the last quarter of 500 steps is within 10 % of 1 at lr 0.27, 0.2, 0.15;
  SGD at batch 8 and lr 0.2 settles below 0.8 times GD's sharpness;
- the warm-started Lanczos value equals a cold Lanczos at the same weights to 1e-6 relative.
Training with tracking: the rows of a run interrupted anywhere equal an uninterrupted run's, bit for
bit, sequentially and as an ensemble, and the trained checkpoints equal those trained without tracking.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from phasediagram.analysis import dynamics
from phasediagram.cli import build_parser, spec_from_args
from phasediagram.data.datasets import Dataset, Split
from phasediagram.errors import SpecError
from phasediagram.models import families
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.spec.presets import PRESET_SPECS
from phasediagram.spec.tracking import QUANTITIES, TrackOptions
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.study import Study
from phasediagram.training import ensemble, tracking

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread
QUIET = {"log": lambda *_: None}


# --------------------------------------------------------------------------- the spec
def test_tracking_off_keeps_the_training_hashes_and_on_changes_them():
    pinned = {"demo": "073619beca22e021", "tiny": "a1bd54e51ff36f12", "reference": "3a0aef69c2049913"}
    assert {name: ExperimentSpec.from_dict(PRESET_SPECS[name]).training_hash() for name in pinned} == pinned
    assert ExperimentSpec.from_dict({**PRESET_SPECS["tiny"], "track": False}).training_hash() == pinned["tiny"]
    on = ExperimentSpec.from_dict({**PRESET_SPECS["tiny"], "track": True})
    assert on.track == TrackOptions() and on.training_hash() != pinned["tiny"]
    assert ExperimentSpec.from_dict(on.to_dict()) == on
    other = ExperimentSpec.from_dict({**PRESET_SPECS["tiny"], "track": {"quantities": ["loss", "trace"]}})
    assert other.track.quantities == ("loss", "trace") and other.training_hash() != on.training_hash()


@pytest.mark.parametrize("track, message", [
    ({"every_steps": 0}, "track.every_steps: 0 is out of range"),
    ({"every_steps": -3}, "track.every_steps: -3 is out of range"),
    ({"log_points": -1}, "track.log_points: -1 is out of range"),
    ({"quantities": ["loss", "sharpness"]}, "track.quantities: .* is out of range"),
    ({"cadence": 3}, r"track: unknown option\(s\) \['cadence'\]"),
    ({"subset": 8, "noise_batch": 8}, "track.noise_batch: 8 is out of range"),
    ("yes", "track: expected true, false or a mapping"),
])
def test_bad_tracking_options_are_refused(track, message):
    with pytest.raises(SpecError, match=message):
        ExperimentSpec(track=track)


def test_tracking_refuses_autocast():
    with pytest.raises(SpecError, match="track: .* needs autocast off"):
        ExperimentSpec(track=True, autocast="bf16")


def test_the_command_line_sets_tracking():
    parser = build_parser()
    assert spec_from_args(parser.parse_args(["--preset", "tiny"])).track is None
    assert spec_from_args(parser.parse_args(["--preset", "tiny", "--track"])).track == TrackOptions()
    spec = spec_from_args(parser.parse_args(["--preset", "tiny", "--track", "quantities=[loss,lambda_max]",
                                             "every_steps=5"]))
    assert spec.track == TrackOptions(quantities=("loss", "lambda_max"), every_steps=5)


def test_schedule_is_log_spaced_steps_plus_every_epoch():
    steps = tracking.schedule(TrackOptions(log_points=5), steps_per_epoch=10, epochs=3)
    assert steps == [0, 1, 2, 5, 10, 13, 20, 30]  # geomspace(1, 30, 5) = 1, 2.34, 5.48, 12.8, 30
    assert tracking.schedule(TrackOptions(log_points=0, every_epoch=False, every_steps=7), 10, 2) == [0, 7, 14]


# --------------------------------------------------------------------------- physics
class Quadratic(torch.nn.Module):
    """theta in R^n, output theta whatever the input; with `quadratic_loss`, L = theta^T A theta / 2."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def quadratic_problem(n: int = 12):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(0.5, 4.0, n, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    theta0 = torch.randn(n, generator=g, dtype=torch.float64)
    return a, float(eigenvalues.max()), theta0


def test_quadratic_loss_top_eigenvalue_is_exact_and_gd_diverges_beyond_two_over_lambda_max():
    a, top, theta0 = quadratic_problem()

    def loss(theta, _):
        return 0.5 * theta @ a @ theta

    options = TrackOptions(quantities=("loss", "lambda_max", "grad_norm", "weight_norm", "distance"),
                           lanczos_iters=12, tol=1e-12, subset=None)
    data = Split(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))
    final = {}
    for factor in (0.98, 1.02):
        model = Quadratic(theta0)
        tracker = tracking.tracker_of(options, 0, model)
        lr = factor * 2.0 / top
        for step in range(401):
            values = tracker.measure(model, data, step, 1, lr, loss=loss) if step % 100 == 0 else None
            if values is not None:
                theta = model.theta.detach()
                assert values["lambda_max"] == pytest.approx(top, rel=1e-12)
                assert values["lr_lambda_max"] == pytest.approx(2 * factor, rel=1e-12)
                assert values["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(a @ theta)), rel=1e-12)
                assert values["distance"] == pytest.approx(float(torch.linalg.vector_norm(theta - theta0)), rel=1e-12)
            with torch.no_grad():
                model.theta -= lr * (a @ model.theta)
        final[factor] = [r[3] for r in tracker.rows if r[2] == "loss"]
    below, above = final[0.98], final[1.02]
    assert below[-1] < 1e-3 * below[0]  # |1 - lr lambda| < 1 along every eigenvector: GD converges
    assert above[-1] > 1e3 * above[0]  # |1 - lr lambda_max| = 1.04: the top component's loss grows by 1.04^800


X_DIM, HIDDEN, OUT, POINTS = 4, 32, 3, 64


def mse(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(1).mean()


def tanh_mlp() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(X_DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)).double()


def regression_data() -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randn(POINTS, X_DIM, generator=g, dtype=torch.float64),
                 torch.randn(POINTS, OUT, generator=g, dtype=torch.float64))


@functools.lru_cache(maxsize=None)
def descend(lr: float, batch: int, steps: int = 500) -> tuple[list[float], torch.nn.Module, tracking.Tracker]:
    """(lambda_max every 5 steps, the final model, its tracker) of gradient descent on the tanh MLP's MSE
    with batches of `batch` examples (64: full batch) in orders drawn from a seeded generator; every 5
    steps, so that both parities of GD's period-2 oscillation at the edge of stability are sampled."""
    data, model = regression_data(), tanh_mlp()
    options = TrackOptions(quantities=("loss", "lambda_max"), lanczos_iters=100, tol=1e-4, subset=None)
    tracker = tracking.tracker_of(options, 0, model)
    order = torch.Generator().manual_seed(5)
    params = list(model.parameters())
    for step in range(steps + 1):
        if step % 5 == 0:
            tracker.measure(model, data, step, POINTS // batch, lr, loss=mse)
        if step == steps:
            break
        idx = torch.randperm(POINTS, generator=order)[:batch]
        grads = torch.autograd.grad(mse(model(data.x[idx]), data.y[idx]), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return [r[3] for r in tracker.rows if r[2] == "lambda_max"], model, tracker


def last_quarter_median(values: list[float]) -> float:
    return statistics.median(values[-len(values) // 4:])


def outcomes(tracker: tracking.Tracker, status: str = "ok") -> set[str]:
    """The rules of `analysis.dynamics` (default thresholds) that hold on the tracker's rows."""
    frame = pd.DataFrame(tracker.rows, columns=list(tracking.COLUMNS))
    return {name for name, holds in dynamics.run_outcomes(frame, status).items() if holds}


@pytest.mark.parametrize("lr", [0.27, 0.2, 0.15])
def test_full_batch_gd_reaches_the_edge_of_stability(lr):
    sharpness, _, tracker = descend(lr, POINTS)
    assert sharpness[0] < 0.4 * 2 / lr  # progressive sharpening: it starts far below 2 / lr
    assert last_quarter_median(sharpness) == pytest.approx(2 / lr, rel=0.10)
    assert outcomes(tracker) == {"edge_of_stability", "progressive_sharpening"}


def test_sgd_at_batch_8_settles_below_full_batch_sharpness():
    gd, _, _ = descend(0.2, POINTS)
    sgd, _, tracker = descend(0.2, 8)
    assert last_quarter_median(sgd) < 0.8 * last_quarter_median(gd)
    assert "edge_of_stability" not in outcomes(tracker)


def test_warm_started_lanczos_equals_a_cold_one():
    _, model, tracker = descend(0.2, POINTS)
    data = regression_data()
    warm = tracking.Tracker(TrackOptions(quantities=("lambda_max",), lanczos_iters=200, tol=1e-10, subset=None), 0,
                            tracker.init, vector=tracker.vector)
    value = warm.measure(model, data, 1, 1, 0.2, loss=mse)["lambda_max"]
    op = HessianOperator(model, data.x, data.y, loss=mse)
    cold = linalg.lanczos_eigs(op, op.dim, 1, 400, 1e-12, torch.Generator().manual_seed(7), magnitude=False)
    assert cold.converged and value == pytest.approx(float(cold.top[0]), rel=1e-6)


def test_measuring_leaves_the_model_and_the_random_numbers_alone():
    torch.manual_seed(0)
    model = families.create("resnet1d", 4, (40,), 10).double()
    model.train()
    split = Split(torch.randn(32, 40, dtype=torch.float64), torch.randint(0, 10, (32,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    tracker = tracking.tracker_of(TrackOptions(quantities=QUANTITIES, subset=None), 0, model)
    values = tracker.measure(model, split, 0, 1, 0.1)
    assert all(math.isfinite(v) for v in values.values()) and set(values) == {*QUANTITIES, "two_over_lr",
                                                                              "lr_lambda_max"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_noise_scale_of_identical_examples_is_zero():
    """Every example with the same gradient: tr(Sigma) = 0, so B_simple = 0 (exactly, up to rounding)."""
    model = torch.nn.Linear(3, 2).double()
    x = torch.ones(16, 3, dtype=torch.float64)
    y = torch.zeros(16, dtype=torch.long)
    big = float(torch.linalg.vector_norm(HessianOperator(model, x, y).gradient())) ** 2
    assert abs(tracking.noise_scale(model, x, y, 4, big)) < 1e-10


# --------------------------------------------------------------------------- training with tracking
SEEDS = (0, 1)
TRACK = {"quantities": list(QUANTITIES), "subset": 64, "log_points": 6, "lanczos_iters": 10}


def make_dataset(n: int = 128) -> Dataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n + 32, 40, generator=g)
    y = (x @ torch.randn(40, 10, generator=g)).argmax(1)
    return Dataset("mnist1d", Split(x[:n], y[:n]), Split(x[n:], y[n:]), 10)


def make_spec(mode: str, track=TRACK) -> ExperimentSpec:
    return ExperimentSpec(name="t", arch="mlp", widths=(8,), batch_sizes=(32,), lrs=(0.1,), seeds=SEEDS, epochs=3,
                          metrics=(), ensemble=mode, track=track)


class Killed(Exception):
    pass


def kill_at(seed: int, epoch: int):
    def on_epoch(cell, s, e):
        if (s, e) == (seed, epoch):
            raise Killed
    return on_epoch


def rows(layout: Layout, cell, seeds=SEEDS) -> dict:
    return {seed: tracking.load_trajectory(layout.trajectory_path(cell, seed))["rows"] for seed in seeds}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """{mode: (spec, layout)} of the uninterrupted tracked runs, sequential ("off") and as one ensemble ("on")."""
    out = {}
    for mode in ("off", "on"):
        spec = make_spec(mode)
        layout = Layout(tmp_path_factory.mktemp(f"ref_{mode}"), "t")
        assert ensemble.train_cell_auto(spec, spec.cells()[0], layout, make_dataset(), **QUIET) == {0: "ok", 1: "ok"}
        out[mode] = spec, layout
    return out


@pytest.mark.parametrize("mode", ["off", "on"])
def test_tracked_rows_resume_bit_for_bit(references, tmp_path, mode):
    """Killed after seed 1 wrote epoch 2, its last.pt then truncated; resumed; seed 0's trajectory file
    then deleted (the run is retrained to rebuild it): every row equals the uninterrupted run's."""
    spec, ref = references[mode]
    cell, data, run = spec.cells()[0], make_dataset(), Layout(tmp_path, "t")
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(1, 2), **QUIET)
    assert len(checkpoints.load(run.checkpoint(cell, 1, "last"))["tracking"]["rows"]) > 0
    path = run.checkpoint(cell, 1, "last")
    path.write_bytes(path.read_bytes()[:100])
    ensemble.train_cell_auto(spec, cell, run, data, **QUIET)
    run.trajectory_path(cell, 0).unlink()
    ensemble.train_cell_auto(spec, cell, run, data, **QUIET)
    expected = rows(ref, cell)
    assert rows(run, cell) == expected
    steps = sorted({r[0] for r in expected[0]})
    assert steps == [0, 1, 2, 3, 4, 7, 8, 12]  # 4 steps an epoch, 3 epochs; geomspace(1, 12, 6) rounded
    values = {(r[0], r[2]): r[3] for r in expected[0]}
    assert values[(0, "distance")] == 0.0 and values[(12, "two_over_lr")] == pytest.approx(2 / 0.01)
    assert all(math.isfinite(v) for v in values.values())


def test_tracking_does_not_change_the_trained_checkpoints(references, tmp_path):
    spec, ref = references["on"]
    cell, plain = spec.cells()[0], Layout(tmp_path, "t")
    ensemble.train_cell_auto(make_spec("on", track=None), cell, plain, make_dataset(), **QUIET)
    for seed in SEEDS:
        for kind in ("final", "best"):
            a, b = (checkpoints.load(layout.checkpoint(cell, seed, kind)) for layout in (ref, plain))
            assert a["history"] == b["history"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("optimizer", ["sam", "entropy_sgd", "replicated_sgd"])
def test_every_training_method_is_tracked_without_being_disturbed(tmp_path, optimizer):
    tracked = ExperimentSpec(name="t", arch="mlp", widths=(4,), batch_sizes=(64,), lrs=(0.1,), seeds=(0,), epochs=1,
                             metrics=(), optimizer=optimizer, track={"quantities": ["loss", "lambda_max"],
                                                                     "subset": 32, "lanczos_iters": 5})
    plain = dataclasses.replace(tracked, track=None)
    cell, data = tracked.cells()[0], make_dataset()
    layouts = [Layout(tmp_path / name, "t") for name in ("tracked", "plain")]
    for spec, layout in zip((tracked, plain), layouts):
        ensemble.train_cell_auto(spec, cell, layout, data, **QUIET)
    a, b = (checkpoints.load(layout.checkpoint(cell, 0, "final"))["model"] for layout in layouts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r[0] for r in rows(layouts[0], cell, (0,))[0] if r[2] == "lambda_max"] == [0, 1, 2]


def test_study_trajectories_is_a_tidy_table(references, tmp_path):
    spec, ref = references["off"]
    study = Study(spec, ref.root)
    df = study.trajectories()
    assert list(df.columns) == ["experiment", "cell", "width", "batch_size", "lr", "weight_decay", "train_fraction",
                                "label_noise", "seed", "status", "step", "epoch", "quantity", "value"]
    assert set(df["seed"]) == set(SEEDS) and set(df["status"]) == {"ok"}
    assert set(df["quantity"]) == {*QUANTITIES, "two_over_lr", "lr_lambda_max"}
    assert np.allclose(df["epoch"], df["step"] / 4)
    assert len(df) == sum(len(r) for r in rows(ref, spec.cells()[0]).values())
    assert Study(make_spec("off", track=None), tmp_path).trajectories().empty
    table = study.table(write=False)
    assert set(table["source"]) == {"dynamics"} and set(table["kind"]) == {"diagnostic"}
    assert list(dynamics.read_outcomes(table)["outcome"]) == list(study.dynamics()["outcome"])


def test_a_diverging_run_is_tracked_until_it_diverges(tmp_path):
    """A NaN put into the epoch-1 state: the run diverges at the first step of epoch 1, its trajectory
    file holds the points of epoch 0 and the status "diverged"."""
    spec = dataclasses.replace(make_spec("off"), seeds=(0,))
    cell, layout, data = spec.cells()[0], Layout(tmp_path, "t"), make_dataset()
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, layout, data, on_epoch=kill_at(0, 1), **QUIET)
    last = layout.checkpoint(cell, 0, "last")
    ckpt = checkpoints.load(last)
    next(iter(ckpt["model"].values())).view(-1)[0] = float("nan")
    checkpoints.save(last, ckpt)
    assert ensemble.train_cell_auto(spec, cell, layout, data, **QUIET) == {0: "diverged"}
    trajectory = tracking.load_trajectory(layout.trajectory_path(cell, 0))
    assert trajectory["status"] == "diverged" and sorted({r[0] for r in trajectory["rows"]}) == [0, 1, 2, 3, 4]


def test_a_product_that_is_not_finite_stops_lanczos():
    with pytest.raises(tracking.NonFinite):
        tracking.finite(lambda v: v / 0.0)(torch.ones(3))
