"""A study's state from its files: status (done, failed with the log tail, missing, Slurm's running
and pending tasks), verification of every kept file, read-only drawing, a validated --table, and
the clean-up of temporary files left by killed writes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from phasediagram import cli
from phasediagram.execution import cluster, jobs
from phasediagram.execution.executors import InProcess
from phasediagram.execution.runtime import process_alive
from phasediagram.storage import checkpoints
from phasediagram.study import Study, remove_stale_temporaries

from .conftest import tiny_spec

ARGV = ["--name", "tiny", "--arch", "mlp", "--widths", "4", "8", "--batch-sizes", "256", "512", "--seeds", "0", "1",
        "--epochs", "2", "--train-fractions", "0.25", "--metrics", "train", "loss_acc", "dist"]


@pytest.fixture
def study(root):
    s = Study(tiny_spec(), root)
    reports = s.run(executor=InProcess())
    assert all(not r.failed for r in reports.values())
    return s


def test_status_counts_done_failed_and_missing_with_the_failure_tail(study, monkeypatch):
    status = study.status()
    assert status[["stage", "jobs", "done", "failed", "missing"]].values.tolist() == [
        ["train", 4, 4, 0, 0], ["loss_acc", 4, 4, 0, 0], ["dist", 4, 4, 0, 0]]
    assert status["running"].isna().all()  # nothing submitted to Slurm
    cell = study.spec.cells()[1]
    study.layout.result_path("loss_acc", cell).unlink()
    study.layout.result_path("dist", cell).unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("the node ran out of luck")

    monkeypatch.setattr(jobs, "_metric_job", broken)
    report = study.run(["loss_acc"], InProcess())["loss_acc"]
    assert len(report.failed) == 1
    status = study.status().set_index("stage")
    assert (status.loc["loss_acc", "failed"], status.loc["loss_acc", "missing"]) == (1, 0)
    assert (status.loc["dist", "failed"], status.loc["dist", "missing"]) == (0, 1)
    (failure,) = study.failures()
    assert failure["job"] == f"loss_acc:{cell.id}" and "ran out of luck" in failure["error"]
    assert any("broken" in line for line in failure["trace"]) and failure["pid"] == os.getpid()
    monkeypatch.undo()
    study.run(["loss_acc", "dist"], InProcess())
    assert study.failures() == [] and not study.layout.failure_path("loss_acc", cell).exists()
    assert study.status()["done"].tolist() == [4, 4, 4]


def test_status_asks_sacct_for_the_submitted_arrays(study, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nprintf '71_0|COMPLETED\\n71_1|RUNNING\\n71_2|RUNNING\\n71_[3-9%%2]|PENDING\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    cluster.record_submitted(study.layout, "train", "71")
    status = study.status().set_index("stage")
    assert (status.loc["train", "running"], status.loc["train", "pending"]) == (2, 7)
    assert pd.isna(status.loc["loss_acc", "running"])
    assert cluster.array_tasks("71") == {"COMPLETED": 1, "RUNNING": 2, "PENDING": 7}
    assert cluster.array_tasks("71; rm -rf /") is None  # not a job id: nothing is run


@pytest.mark.parametrize("task, count", [("12", 1), ("12_3", 1), ("12_[4-9]", 6), ("12_[0-2,7,9-10%3]", 6)])
def test_array_task_count(task, count):
    assert cluster._task_count(task) == count


def test_verify_moves_damaged_files_aside_and_the_next_run_redoes_them(study, capsys):
    layout, cell = study.layout, study.spec.cells()[0]
    assert study.verify() == []
    best = layout.checkpoint(cell, 0, "best")
    best.write_bytes(best.read_bytes()[:300])
    result = layout.result_path("dist", cell)
    result.write_text(result.read_text()[:40])
    problems = study.verify()
    assert len(problems) == 2 and all("moved aside" in p for p in problems)
    assert not best.exists() and not result.exists()
    assert cli.main([*ARGV, "--root", str(layout.root), "--verify"]) == 0  # nothing damaged now
    assert "verify: 0 damaged" in capsys.readouterr().out
    before = checkpoints.load(layout.checkpoint(cell, 1, "final"))["model"]
    study.run(executor=InProcess())
    assert checkpoints.load(best)["seed"] == 0 and result.exists()
    after = checkpoints.load(layout.checkpoint(cell, 1, "final"))["model"]
    assert all((before[k] == after[k]).all() for k in before)  # retrained to the same weights


def test_verify_through_the_cli_reports_and_exits_1(study, capsys):
    final = study.layout.checkpoint(study.spec.cells()[2], 1, "final")
    final.write_bytes(b"\0" * 100)
    assert cli.main([*ARGV, "--root", str(study.layout.root), "--verify", "--status"]) == 1
    out = capsys.readouterr()
    assert "damaged: " in out.err and "final.pt" in out.err and "verify: 1 damaged" in out.out
    assert "train" in out.out and "missing" in out.out


def test_plot_only_reads_the_spec_and_the_scripts(study):
    root = study.layout.root
    assert cli.main([*ARGV, "--root", str(root)]) == 0  # writes the scripts
    spec_bytes = study.layout.spec_path.read_bytes()
    stamp = study.layout.spec_path.stat().st_mtime_ns
    script = study.layout.script_path("train", ".sh")
    script.unlink()
    assert cli.main([*ARGV, "--root", str(root), "--plot"]) == 0
    assert study.layout.spec_path.read_bytes() == spec_bytes and study.layout.spec_path.stat().st_mtime_ns == stamp
    assert not script.exists()
    assert (study.layout.exp_dir / "phase_plot.png").stat().st_size > 10_000


def test_plot_of_a_study_that_does_not_exist(root, capsys):
    assert cli.main([*ARGV, "--root", str(root), "--plot"]) == 2
    assert "no study 'tiny'" in capsys.readouterr().err
    assert not (root / "checkpoint").exists()


@pytest.mark.parametrize("column, value, words", [
    ("width", "wide", "width 'wide' is not an integer"),
    ("batch_size", "2.5", "batch_size '2.5' is not an integer"),
    ("lr", "fast", "lr 'fast' is not a number"),
    ("value", "high", "value 'high' is not a number"),
    ("seed", "zero", "seed 'zero' is not an integer"),
    ("status", "great", "status 'great' is not one of ok, diverged, missing"),
    ("kind", "guess", "kind 'guess' is not one of value, stderr, diagnostic"),
])
def test_a_table_with_bad_values_is_refused_naming_the_row(study, tmp_path, capsys, column, value, words):
    study.table()
    df = pd.read_csv(study.layout.table_path)
    df[column] = df[column].astype(object)
    df.loc[3, column] = value
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    other_root = tmp_path / "fresh"
    assert cli.main([*ARGV, "--root", str(other_root), "--table", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: table: ") and f"row 4: {words}" in err, err
    assert not other_root.exists()  # nothing written


def test_a_table_that_is_not_the_current_one_is_reported(study, tmp_path, capsys):
    df = study.table()
    partial = tmp_path / "partial.csv"
    df[df["source"] != "dist"].to_csv(partial, index=False)
    assert cli.main([*ARGV, "--root", str(study.layout.root), "--table", str(partial)]) == 0
    assert "is not the current table" in capsys.readouterr().err


def test_stale_temporary_files_are_removed(study):
    layout = study.layout
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = layout.exp_dir / f".results.csv~{checkpoints.HOST}~{os.getpid()}~abc123.tmp"
    gone = layout.exp_dir / "runs" / f".final.pt~{checkpoints.HOST}~{dead.pid}~x1.tmp"
    old_other = layout.exp_dir / ".phase_plot.png~elsewhere~12~q9.tmp"
    new_other = layout.exp_dir / ".phase_plot.pdf~elsewhere~12~q8.tmp"
    unrelated = layout.exp_dir / ".notes.tmp"
    for path in (mine, gone, old_other, new_other, unrelated):
        path.write_bytes(b"partial")
    long_ago = time.time() - 2 * 3600
    os.utime(old_other, (long_ago, long_ago))
    removed = remove_stale_temporaries(layout)
    assert sorted(removed) == sorted([gone, old_other])
    assert mine.exists() and new_other.exists() and unrelated.exists()


def _plot(argv: list[str]) -> None:
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")
    os._exit(cli.main(argv))


def _forked_plot(argv: list[str]):
    proc = multiprocessing.get_context("fork").Process(target=_plot, args=(argv,))
    proc.start()
    return proc


def test_a_kill_while_drawing_leaves_no_partial_figure(study):
    """SIGKILL at several points of --plot: every figure on disk is whole, and the next run leaves no
    temporary file of a dead writer behind."""
    argv = [*ARGV, "--root", str(study.layout.root), "--plot"]
    start = time.perf_counter()
    proc = _forked_plot(argv)
    proc.join()
    assert proc.exitcode == 0
    duration = time.perf_counter() - start
    for fraction in (0.3, 0.6, 0.8, 0.95):
        proc = _forked_plot(argv)
        proc.join(timeout=fraction * duration)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        for path in study.layout.exp_dir.glob("*.*"):
            if path.suffix in (".png", ".pdf", ".csv", ".md"):
                assert path.stat().st_size > 0, path
    time.sleep(0.5)  # a forked side process of a killed run may still be finishing its files
    proc = _forked_plot(argv)
    proc.join()
    assert proc.exitcode == 0
    leftovers = [p for p in Path(study.layout.exp_dir).rglob("*.tmp")]
    assert all(checkpoints.temp_writer(p) is not None for p in leftovers)
    assert not [p for p in leftovers if not _alive_writer(p)]
    assert stat.S_ISREG((study.layout.exp_dir / "phase_plot.pdf").stat().st_mode)


def _alive_writer(path: Path) -> bool:
    return process_alive(checkpoints.temp_writer(path)[1])
