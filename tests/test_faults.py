"""Faults a study survives: SIGKILL at random points, corrupted files, concurrent workers, a full disk."""

from __future__ import annotations

import multiprocessing
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from phasediagram import cli
from phasediagram.analysis import table
from phasediagram.execution import jobs
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage import checkpoints, results
from phasediagram.storage.layout import Layout

ARGV = ["--name", "kill", "--arch", "mlp", "--widths", "4", "8", "--batch-sizes", "256", "512", "--seeds", "0", "1",
        "--epochs", "3", "--train-fractions", "0.25", "--metrics", "train", "loss_acc", "dist", "--run",
        "--executor", "inprocess", "--ensemble", "off"]


def _run_cli(root: Path, epoch_log: Path | None = None) -> None:
    """Child process body: run the study, logging every finished (checkpointed) epoch."""
    if epoch_log is not None:
        plain = jobs.run_job

        def logged(spec, layout, job, device="cpu", log=print, on_epoch=None, models=None):
            def note(cell, seed, epoch):
                with open(epoch_log, "a") as f:
                    f.write(f"{cell.id} {seed} {epoch}\n")
                    f.flush()
                    os.fsync(f.fileno())
            return plain(spec, layout, job, device, log, note, models)

        jobs.run_job = logged
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")
    os._exit(cli.main([*ARGV, "--root", str(root)]))


def _fork(target, *args) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    return proc


def _values(df: pd.DataFrame) -> pd.DataFrame:
    return df[["cell", "seed", "seed_b", "split", "metric", "value", "status"]].reset_index(drop=True)


def _all_files_valid(exp: Path) -> None:
    for p in exp.glob("runs/*/seed*/*.pt"):
        checkpoints.load(p)
    for p in exp.glob("results/*/*.json"):
        results.read(p)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_cache):
    """An uninterrupted run: its table and its duration."""
    import shutil

    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(mnist_cache, root / "data")
    start = time.perf_counter()
    proc = _fork(_run_cli, root)
    proc.join()
    assert proc.exitcode == 0
    return table.read(root / "checkpoint" / "kill" / "results.csv", "kill"), time.perf_counter() - start


def test_sigkill_at_random_points_loses_nothing(reference, root):
    """Rounds of: a fresh study killed at 4-5 random points (training, metric jobs or table
    collection), then rerun to completion; the table equals the uninterrupted one and no
    checkpointed epoch is ever trained twice."""
    import shutil

    ref_table, duration = reference
    rng = random.Random(1234)
    exp = root / "checkpoint" / "kill"
    kills = 0
    for round_ in range(5):
        shutil.rmtree(exp, ignore_errors=True)
        epoch_log = root / f"epochs{round_}.log"
        for _ in range(5):
            proc = _fork(_run_cli, root, epoch_log)
            proc.join(timeout=rng.uniform(0.02, 0.4) * duration)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.join()
            _all_files_valid(exp)  # whatever was written is whole
        proc = _fork(_run_cli, root, epoch_log)
        proc.join()
        assert proc.exitcode == 0
        done = table.read(exp / "results.csv", "kill")
        pd.testing.assert_frame_equal(_values(done), _values(ref_table))
        lines = epoch_log.read_text().splitlines() if epoch_log.exists() else []
        assert len(lines) == len(set(lines)), "a finished epoch was trained twice"
    assert kills >= 20


@pytest.mark.parametrize("target", ["final.pt", "result.json", "last.pt"])
@pytest.mark.parametrize("damage", ["truncate", "random_bytes"])
def test_corrupted_files_are_detected_moved_aside_and_redone(reference, root, target, damage, capsys):
    ref_table, _ = reference
    assert cli.main([*ARGV, "--root", str(root)]) == 0
    exp = root / "checkpoint" / "kill"
    layout = Layout(root, "kill")
    cell = jobs.stage_jobs(ExperimentSpec.from_file(
        layout.spec_path), "train")[1].cell
    if target == "final.pt":
        path = layout.checkpoint(cell, 1, "final")
    elif target == "result.json":
        path = layout.result_path("loss_acc", cell)
    else:  # a half-finished run's state, as a kill leaves it
        path = layout.checkpoint(cell, 1, "last")
        path.write_bytes(layout.checkpoint(cell, 1, "final").read_bytes())
        layout.checkpoint(cell, 1, "final").unlink()
        layout.result_path("train", cell).unlink()
    blob = bytearray(path.read_bytes())
    rng = random.Random(7)
    if damage == "truncate":
        blob = blob[:rng.randrange(1, len(blob) - 1)]
    else:
        for i in rng.sample(range(len(blob)), 8):
            blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    capsys.readouterr()
    assert cli.main([*ARGV, "--root", str(root)]) == 0
    err = capsys.readouterr()
    assert str(path) in err.out + err.err and "moved aside" in err.out + err.err
    assert list(path.parent.glob(path.name + ".corrupt*"))
    pd.testing.assert_frame_equal(_values(table.read(exp / "results.csv", "kill")), _values(ref_table))


def test_eight_workers_at_once_keep_every_row(root):
    argv = ["--root", str(root), "--name", "eight", "--arch", "mlp", "--widths", "2", "4", "8", "16",
            "--batch-sizes", "256", "512", "--seeds", "0", "1", "--epochs", "1", "--train-fractions", "0.25"]
    assert cli.main([*argv, "--metrics", "train", "--run", "--executor", "inprocess"]) == 0
    assert cli.main([*argv, "--metrics", "loss_acc"]) == 0  # writes the scripts and records the metric
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "phasediagram.execution.worker", "--experiment-dir",
                               str(root / "checkpoint" / "eight"), "--stage", "loss_acc", "--index", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(8)]
    layout = Layout(root, "eight")
    partial = []
    while any(p.poll() is None for p in procs):  # collection while files are being written
        partial.append(len(table.collect(layout, "eight")))
        time.sleep(0.05)
    assert all(p.returncode == 0 for p in procs), [p.stderr.read() for p in procs]
    df = table.collect(layout, "eight")
    rows = df[df.source == "loss_acc"]
    assert len(rows) == 8 * 2 * 4 and not rows.duplicated(["cell", "seed", "split", "metric"]).any()
    assert all(n <= len(df) for n in partial)


def _train_with_file_size_limit(root: Path, limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.stdout = open(os.devnull, "w")
    err = open(root / "stderr.txt", "w")
    sys.stderr = err
    code = cli.main([*ARGV, "--root", str(root), "--widths", "4", "64"])
    err.flush()
    os._exit(code)


def test_full_disk_gives_a_clear_error_and_keeps_earlier_files(root):
    proc = _fork(_train_with_file_size_limit, root, 20_000)  # small checkpoints fit, width-64 ones do not
    proc.join()
    assert proc.exitcode == 2
    message = (root / "stderr.txt").read_text()
    assert "error: cannot write" in message and "files written before are intact" in message
    exp = root / "checkpoint" / "kill"
    assert (exp / "spec.json").is_file()
    _all_files_valid(exp)
    assert list(exp.glob("runs/w4_*/seed*/final.pt"))
    assert not list(exp.glob("runs/**/*.tmp"))
    assert cli.main([*ARGV, "--root", str(root), "--widths", "4", "64"]) == 0  # room again: it completes


SLOW = "PHASEDIAGRAM_TEST_SLOW"  # set: each forward of `slow_mlp` takes 20 ms more (its values are unchanged)
REPO = Path(__file__).resolve().parents[1]
CTRL_C = ["--name", "ctrlc", "--arch", f"{__name__}:slow_mlp", "--widths", "4", "8", "--batch-sizes", "256", "512",
          "--seeds", "0", "1", "--epochs", "2", "--train-fractions", "0.25", "--metrics", "train", "loss_acc", "dist",
          "--ensemble", "off", "--run"]


def slow_mlp(width, n_classes, input_shape):
    """The mlp family by import path, slowed down where SLOW is set (so that Ctrl-C lands mid-run)."""
    from phasediagram.models import families

    model = families.create("mlp", width, input_shape, n_classes)
    if os.environ.get(SLOW):
        model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    return model


@pytest.fixture(scope="module")
def ctrlc_reference(tmp_path_factory, mnist_cache):
    """The table of an uninterrupted run of CTRL_C."""
    import shutil

    ref_root = tmp_path_factory.mktemp("ctrlc_reference")
    shutil.copytree(mnist_cache, ref_root / "data")
    assert cli.main([*CTRL_C, "--executor", "inprocess", "--root", str(ref_root)]) == 0
    return table.read(ref_root / "checkpoint" / "ctrlc" / "results.csv", "ctrlc")


@pytest.mark.parametrize("executor", ["inprocess", "local"])
def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_completes(root, ctrlc_reference, executor):
    """SIGINT to the command's process group (a terminal's Ctrl-C: the pool's workers get it too) once
    training has begun: one line, exit status 130, no traceback from any process, no temporary file;
    the rerun's table equals an uninterrupted run's."""
    argv = [*CTRL_C, "--executor", executor, "--workers", "2"]
    exp = root / "checkpoint" / "ctrlc"
    proc = subprocess.Popen([sys.executable, "-m", "phasediagram", *argv, "--root", str(root)], cwd=REPO,
                            env={**os.environ, SLOW: "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(exp.glob("runs/*/seed*/last.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err == cli.INTERRUPTED + "\n", err
    assert not list(exp.rglob(f"*{checkpoints.TEMP_SUFFIX}"))
    _all_files_valid(exp)
    assert not (exp / "results.csv").exists()  # it was interrupted before the end
    assert cli.main([*argv, "--root", str(root)]) == 0
    pd.testing.assert_frame_equal(_values(table.read(exp / "results.csv", "ctrlc")), _values(ctrlc_reference))


def test_ctrl_c_while_the_command_line_is_imported_is_the_same_one_line(monkeypatch, capsys):
    """SIGINT while `cli` is being imported (torch, pandas, matplotlib: seconds) is held until the imports
    are done, then ends the command as Ctrl-C during a run does: the one line, exit status 130."""
    import builtins

    from phasediagram import __main__ as entry

    real_import = builtins.__import__

    def interrupted_import(name, *args, **kwargs):
        if name == "phasediagram" and "cli" in (args[2] or ()):
            os.kill(os.getpid(), signal.SIGINT)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    assert entry.console(["--list-metrics"]) == 130
    assert capsys.readouterr() == ("", cli.INTERRUPTED + "\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
