"""End to end: a 2x2 grid through both executors, the table, the plot, resume and determinism."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch

from phasediagram import cli
from phasediagram.analysis import table
from phasediagram.execution.inprocess import run_inprocess
from phasediagram.execution.jobs import Job, dataset_for, run_job, run_jobs, stage_jobs
from phasediagram.execution.local_pool import run_pool, start_pool
from phasediagram.metrics.base import evaluate
from phasediagram.storage import checkpoints, results
from phasediagram.storage.layout import Layout
from phasediagram.training import train

from .conftest import tiny_spec


def run_all(spec, layout, executor):
    for stage in ("train", *spec.metrics):
        report = executor(spec, layout, stage_jobs(spec, stage))
        assert not report.failed, report.failed
    return table.collect(layout, spec.name)


def values(df: pd.DataFrame) -> pd.DataFrame:
    return df[["cell", "seed", "seed_b", "split", "metric", "coord", "value", "status"]].reset_index(drop=True)


def check_table(df: pd.DataFrame, spec) -> None:
    n_cells, n_seeds = len(spec.cells()), len(spec.seeds)
    acc = df[(df.source == "loss_acc")]
    assert len(acc) == n_cells * n_seeds * 4  # train/test x loss/acc
    assert set(zip(acc.split, acc.metric)) == {("train", "loss"), ("train", "acc"), ("test", "loss"), ("test", "acc")}
    assert not acc.duplicated(["cell", "seed", "split", "metric"]).any()
    dist = df[df.source == "dist"]
    assert len(dist) == n_cells and (dist.seed == 0).all() and (dist.seed_b == 1).all() and (dist.value > 0).all()
    assert (acc.value.between(0, 100) | (acc.metric == "loss")).all()
    assert (df.status == "ok").all()
    assert set(df.width) == set(spec.widths) and set(df.batch_size) == set(spec.batch_sizes)


def test_inprocess_and_pool_give_the_same_table(root, tmp_path_factory, mnist_cache):
    spec = tiny_spec()
    df_in = run_all(spec, Layout(root, "a"), lambda s, l, j: run_inprocess(s, l, j))
    check_table(df_in, spec)
    root_b = tmp_path_factory.mktemp("pool")
    reports = run_pool(spec, Layout(root_b, "a"), ["train", *spec.metrics], workers=2)
    assert {s: (r.done, len(r.failed)) for s, r in reports.items()} == {s: (4, 0) for s in ["train", *spec.metrics]}
    df_pool = table.collect(Layout(root_b, "a"), spec.name)
    pd.testing.assert_frame_equal(values(df_in), values(df_pool))
    # a pool started first (as the CLI does, to import torch while it checks the dataset) serves the
    # same jobs and stays the caller's: still open afterwards
    root_c = tmp_path_factory.mktemp("started_pool")
    with start_pool(2) as pool:
        reports = run_pool(spec, Layout(root_c, "a"), ["train", *spec.metrics], pool=pool)
        assert pool.submit(max, 1, 2).result() == 2
    assert {s: (r.done, len(r.failed)) for s, r in reports.items()} == {s: (4, 0) for s in ["train", *spec.metrics]}
    pd.testing.assert_frame_equal(values(df_in), values(table.collect(Layout(root_c, "a"), spec.name)))


def test_cli_writes_spec_scripts_checkpoints_table_and_plot(root, capsys):
    argv = ["--root", str(root), "--name", "e2e", "--arch", "mlp", "--widths", "4", "8", "--batch-sizes", "256",
            "512", "--seeds", "0", "1", "--epochs", "2", "--train-fractions", "0.25", "--metrics", "train",
            "loss_acc", "dist", "--run", "--executor", "inprocess", "--generate-slurm-scripts"]
    assert cli.main(argv) == 0
    exp = root / "checkpoint" / "e2e"
    assert (exp / "spec.json").is_file() and (exp / "phase_plot.png").stat().st_size > 10_000
    assert len(list((exp / "runs").glob("*/seed*/final.pt"))) == 8
    assert len(list((exp / "results").glob("*/*.json"))) == 12  # 3 stages x 4 cells
    lines = (root / "bash_scripts" / "e2e" / "train.sh").read_text().splitlines()
    assert sum("phasediagram.execution.worker" in line for line in lines) == 4
    assert "#SBATCH --array=0-3" in (root / "bash_scripts" / "e2e" / "dist.sbatch").read_text()
    check_table(table.read(exp / "results.csv", "e2e"), tiny_spec())
    assert "figure:" in capsys.readouterr().out
    # rerunning the same command trains nothing again
    before = {p: p.stat().st_mtime_ns for p in (exp / "runs").glob("*/seed*/*.pt")}
    assert cli.main(argv) == 0
    assert "train: 0 done, 4 skipped" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in (exp / "runs").glob("*/seed*/*.pt")}


def test_same_seed_same_weights_bit_for_bit(tiny):
    spec, layout = tiny
    cell = spec.cells()[0]
    from phasediagram.execution.jobs import dataset_for

    data = dataset_for(spec, cell, layout)
    a = train.init_model(spec, cell, 3, data)
    b = train.init_model(spec, cell, 3, data)
    c = train.init_model(spec, cell, 4, data)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert torch.equal(train.epoch_order(100, 3, 1), train.epoch_order(100, 3, 1))
    assert not torch.equal(train.epoch_order(100, 3, 1), train.epoch_order(100, 3, 2))
    other = Layout(layout.root, "again")
    train.train_seed(spec, cell, 0, layout, data, log=lambda *_: None)
    train.train_seed(spec, cell, 0, other, data, log=lambda *_: None)
    x = checkpoints.load(layout.checkpoint(cell, 0))["model"]
    y = checkpoints.load(other.checkpoint(cell, 0))["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


class Interrupt(Exception):
    pass


def test_resume_trains_no_epoch_twice_and_matches_uninterrupted(root):
    spec = tiny_spec(epochs=4, ensemble="off")
    cell = spec.cells()[0]
    from phasediagram.execution.jobs import dataset_for

    full, cut = Layout(root, "full"), Layout(root, "cut")
    data = dataset_for(spec, cell, full)
    train.train_seed(spec, cell, 0, full, data, log=lambda *_: None)
    trained = []

    def stop_after_two(c, seed, epoch):
        trained.append(epoch)
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.train_seed(spec, cell, 0, cut, data, log=lambda *_: None, on_epoch=stop_after_two)
    assert checkpoints.load(cut.checkpoint(cell, 0, "last"))["epoch"] == 2
    train.train_seed(spec, cell, 0, cut, data, log=lambda *_: None, on_epoch=lambda c, s, e: trained.append(e))
    assert trained == [1, 2, 3, 4]
    a, b = checkpoints.load(full.checkpoint(cell, 0)), checkpoints.load(cut.checkpoint(cell, 0))
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4]
    assert a["history"] == b["history"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not cut.checkpoint(cell, 0, "last").exists() and cut.checkpoint(cell, 0, "best").exists()


def test_divergence_is_an_outcome_not_a_crash(root):
    spec = tiny_spec(lrs=(100.0,), batch_sizes=(16, 512), widths=(8,), epochs=2)
    layout = Layout(root, spec.name)
    df = run_all(spec, layout, lambda s, l, j: run_inprocess(s, l, j))
    diverged = df[(df.source == "train") & (df.status == "diverged")]
    assert set(diverged.batch_size) >= {16}
    ckpt = checkpoints.load(layout.checkpoint(spec.cells()[0], 0))
    assert ckpt["status"] == "diverged" and set(ckpt["diverged_at"]) == {"epoch", "step"}
    metric_rows = df[(df.source == "loss_acc") & (df.batch_size == 16)]
    assert (metric_rows.status == "diverged").all() and metric_rows.value.isna().all()
    assert table.diverged_cells(df) >= {(16, 8)}
    from phasediagram.analysis.plots import phase_figure, save_figure

    save_figure(phase_figure(df), layout.exp_dir / "p.png")
    assert (layout.exp_dir / "p.png").stat().st_size > 5_000


def test_lr_schedule():
    spec = tiny_spec(epochs=8, schedule="step", lr_decay_at=0.75, lr_decay_factor=0.1)
    assert [train.lr_at(spec, 0.1, e) for e in range(8)] == [0.1] * 6 + [pytest.approx(0.01)] * 2
    flat = tiny_spec(epochs=8, schedule="constant")
    assert {train.lr_at(flat, 0.1, e) for e in range(8)} == {0.1}


def test_metric_job_needs_trained_checkpoints(tiny):
    spec, layout = tiny
    from phasediagram.errors import MissingCheckpoint

    with pytest.raises(MissingCheckpoint, match="run the train stage first"):
        run_job(spec, layout, Job("loss_acc", spec.cells()[0]))
    assert not layout.result_path("loss_acc", spec.cells()[0]).exists()


def test_a_cells_metric_jobs_load_each_checkpoint_once(tiny, monkeypatch, tmp_path_factory):
    """`run_jobs` over a cell's metric jobs (a pool worker's task) loads each seed's final checkpoint once
    for all the cell's metric stages and writes the same results as one `run_job` per stage."""
    _, layout = tiny
    spec = tiny_spec(metrics=("loss_acc", "dist", "hessian"), metric_options={"hessian": {"density_iters": 10}})
    cell = spec.cells()[0]
    assert run_job(spec, layout, Job("train", cell)) == "done"
    loads = []
    real = train.load_model
    monkeypatch.setattr(train, "load_model", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    stages = ["loss_acc", "dist", "hessian"]
    outcomes = {job.stage: outcome for job, outcome in run_jobs(spec, layout, [Job(s, cell) for s in stages])}
    assert outcomes == {s: "done" for s in stages}
    assert sorted(loads) == sorted(layout.checkpoint(cell, seed, "final") for seed in spec.seeds)
    assert [outcome for _, outcome in run_jobs(spec, layout, [Job(s, cell) for s in stages])] == ["skipped"] * 3
    monkeypatch.setattr(train, "load_model", real)
    other = Layout(tmp_path_factory.mktemp("per_stage"), spec.name)
    for seed in spec.seeds:  # the same checkpoints, one job per stage
        dest = other.checkpoint(cell, seed, "final")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(layout.checkpoint(cell, seed, "final").read_bytes())
    for stage in stages:
        assert run_job(spec, other, Job(stage, cell)) == "done"
        a = results.read(layout.result_path(stage, cell))
        b = results.read(other.result_path(stage, cell))
        assert a["rows"] == b["rows"], stage


def test_no_progress_bar_and_no_tqdm_lock_without_a_terminal(monkeypatch, capsys):
    """Off a terminal no tqdm object is made, so no process ever holds tqdm's lock (a SIGKILLed one holding
    it would block its forked siblings forever); on a terminal the bar is tqdm's."""
    import io

    from tqdm.auto import tqdm

    from phasediagram.execution import jobs

    def taken(*_):
        raise AssertionError("tqdm's lock was taken")

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setattr(tqdm, "get_lock", classmethod(taken))
    with jobs.progress(3, "x") as bar:
        bar.update()
    jobs.write_line("a line")
    assert "a line" in capsys.readouterr().out

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.undo()
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = jobs.progress(3, "x")
    assert isinstance(bar, tqdm)
    bar.close()


def test_metrics_read_the_best_checkpoint_when_asked(tiny):
    """metric_checkpoint="best": the metric jobs read best.pt (lowest training loss), not final.pt; the
    result records it, so switching redoes the metric jobs but not the training."""
    _, layout = tiny
    spec = tiny_spec(epochs=4, lrs=(2.0,))  # a large lr, so the last epoch is not the best one in some run
    cell = spec.cells()[0]
    assert run_job(spec, layout, Job("train", cell)) == "done"
    best = tiny_spec(epochs=4, lrs=(2.0,), metric_checkpoint="best")
    assert best.training_hash() == spec.training_hash()
    assert run_job(spec, layout, Job("loss_acc", cell)) == "done"
    final_rows = results.read(layout.result_path("loss_acc", cell))["rows"]
    assert run_job(best, layout, Job("train", cell)) == "skipped"
    assert run_job(best, layout, Job("loss_acc", cell)) == "done"
    best_rows = results.read(layout.result_path("loss_acc", cell))["rows"]
    for seed in spec.seeds:
        for name, rows in (("best", best_rows), ("final", final_rows)):
            model, _ = train.load_model(layout.checkpoint(cell, seed, name))
            expected = evaluate(model, dataset_for(spec, cell, layout).train)[0]
            got = next(r["value"] for r in rows if r["seed"] == seed and r["split"] == "train" and r["metric"] == "loss")
            assert got == pytest.approx(expected, rel=1e-6), (name, seed)
    assert any(checkpoints.load(layout.checkpoint(cell, s, "best"))["epoch"] < spec.epochs for s in spec.seeds)

