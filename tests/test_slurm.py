"""The cluster path against a real Slurm: `scripts/slurm_localhost.sh up` starts a single-node Slurm
on this machine (installing Debian's packages when missing) for the session, `down` stops it.

Skipped, with the reason printed, where that is impossible (not root, or Slurm missing and no
apt-get to install it) or where PHASEDIAGRAM_SKIP_SLURM=1. Each task starts a fresh Python (about
5-7 s of importing torch on a small machine), so the grids are small and the tasks few.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phasediagram import cli
from phasediagram.analysis import table
from phasediagram.execution.cluster import log_tail, make_executor, run_submitit, submit, submitit_folder, tasks_of
from phasediagram.execution.jobs import stage_jobs
from phasediagram.execution.scripts import SlurmOptions, slurm_script
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.study import Study

# `make test` runs the suite with pytest-xdist's --dist loadfile: one worker runs this file, whose tests
# share one Slurm, started once
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm_localhost.sh"
# the 2x2 grid of tests/conftest.py's tiny_spec, as CLI flags
GRID = ["--arch", "mlp", "--widths", "4", "8", "--batch-sizes", "256", "512", "--seeds", "0", "1", "--epochs", "2",
        "--train-fractions", "0.25"]
STAGES = ["train", "loss_acc", "dist"]
KEYS = ["cell", "seed", "seed_b", "split", "metric", "coord", "source"]
JOB_TIMEOUT_S = 150


# --------------------------------------------------------------------------- the cluster
def _cannot_start() -> str | None:
    if os.environ.get("PHASEDIAGRAM_SKIP_SLURM") == "1":
        return "PHASEDIAGRAM_SKIP_SLURM=1"
    if not sys.platform.startswith("linux"):
        return f"a local Slurm needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "starting a local Slurm needs root (slurmd, munged's /run/munge); run the tests as root to include them"
    installed = all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in ("slurmctld", "slurmd", "munged", "sbatch"))
    if not installed and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _skip(reason: str):
    print(f"\nSKIPPING the Slurm tests: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm; SLURM_CONF points the clients (and submitit) at it."""
    reason = _cannot_start()
    if reason:
        _skip(reason)
    start = time.perf_counter()
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=1500,
                            stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)
        _skip("scripts/slurm_localhost.sh up did not finish within 25 minutes")
    if up.returncode == 3:  # Slurm missing and not installable here
        _skip(f"no Slurm here: {up.stderr.strip().splitlines()[-1] if up.stderr.strip() else 'install failed'}")
    if up.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)
        pytest.fail(f"scripts/slurm_localhost.sh up failed (exit {up.returncode}):\n{up.stderr[-3000:]}")
    match = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
    assert match, up.stdout
    ours = "already up" not in up.stderr  # a Slurm someone started before the session stays up after it
    print(f"\nlocal Slurm up in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "OMP_NUM_THREADS")}
    os.environ["SLURM_CONF"] = match.group(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # propagated to the jobs (sbatch --export=ALL)
    try:
        yield match.group(1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if ours:
            down = subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=180)
            assert down.returncode == 0, (down.returncode, down.stdout, down.stderr)


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def wait_jobs(ids: list[str], timeout: float = JOB_TIMEOUT_S) -> None:
    """Until none of the jobs (arrays included) is pending or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sh("squeue", "-h", "-o", "%i", "-j", ",".join(ids), check=False).strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"Slurm jobs {ids} still queued after {timeout} s:\n{sh('squeue', check=False)}")


def states(ids: list[str], tasks: int = 1, timeout: float = 30) -> dict[str, str]:
    """{array task id: final state} of arrays `ids` with `tasks` tasks each, from sacct (which lags a little)."""
    want = {f"{i}_{t}" for i in ids for t in range(tasks)}
    deadline = time.monotonic() + timeout
    while True:
        out = sh("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(ids), check=False)
        got = dict(line.split("|", 1) for line in out.splitlines() if line.strip())
        final = all(s.split()[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") for s in got.values())
        if (want <= set(got) and final) or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


# --------------------------------------------------------------------------- studies
@pytest.fixture(scope="session")
def study_parent(tmp_path_factory):
    # a parent folder with a space and a quote: the scripts must cope with such roots
    parent = tmp_path_factory.mktemp("slurm") / "lab's studies"
    parent.mkdir()
    return parent


def new_root(parent: Path, name: str, mnist_cache: Path) -> Path:
    root = parent / name
    shutil.copytree(mnist_cache, root / "data")
    return root


def values(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(KEYS, na_position="first").reset_index(drop=True)[[*KEYS, "value", "status"]]


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame) -> None:
    got, want = values(got), values(want)
    assert len(got) == len(want) and len(got) > 0
    pd.testing.assert_frame_equal(got[KEYS + ["status"]], want[KEYS + ["status"]])
    np.testing.assert_allclose(got["value"].to_numpy(float), want["value"].to_numpy(float), rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="session")
def reference(study_parent, mnist_cache):
    """The 2x2 grid with its metric stage, run in this process: the table the cluster runs must give."""
    root = new_root(study_parent, "in-process", mnist_cache)
    assert cli.main(["--root", str(root), "--name", "grid", *GRID, "--metrics", *STAGES, "--executor", "inprocess",
                     "--run"]) == 0
    return table.collect(Layout(root, "grid"), "grid")


# --------------------------------------------------------------------------- the tests
@pytest.mark.slurm
def test_sbatch_reads_the_generated_lines_as_written(slurm, study_parent):
    """Submit a generated array on hold and read back what Slurm understood; then cancel it."""
    layout = Layout(study_parent / "held", "held")
    (layout.scripts_dir / "slurm_logs").mkdir(parents=True)
    options = SlurmOptions(jobs_per_task=2, parallelism=3, time="0:07:00", cpus_per_task=1, mem="100M",
                           partition="debug", qos="normal", env_setup="true", python=sys.executable)
    path = layout.script_path("train", ".sbatch")
    path.write_text(slurm_script(layout, "train", 9, options))
    job = sh("sbatch", "--parsable", "--hold", str(path)).strip()
    try:
        shown = sh("scontrol", "show", "job", job)
    finally:
        sh("scancel", job, check=False)
    whole_line = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(WorkDir|StdOut|StdErr)=(.*)$", shown, re.M)}
    assert whole_line["WorkDir"] == str(layout.root)  # a root with a space and a quote, from #SBATCH --chdir
    assert whole_line["StdOut"].startswith(f"{layout.root}/bash_scripts/held/slurm_logs/train_{job}_")
    assert whole_line["StdErr"].endswith(".err")
    for key, value in [("JobName", "held-train"), ("ArrayTaskId", "0-4%3"), ("TimeLimit", "00:07:00"),
                       ("MinMemoryNode", "100M"), ("Partition", "debug"), ("QOS", "normal"), ("NumCPUs", "1")]:
        assert re.search(rf"\b{key}={re.escape(value)}(\s|$)", shown), (key, shown)


@pytest.mark.slurm
def test_generated_arrays_on_slurm_match_in_process(slurm, study_parent, mnist_cache, reference, capsys,
                                                    monkeypatch, tmp_path):
    """--generate-slurm-scripts --submit: train array, then the metric arrays (afterany), same table."""
    root = new_root(study_parent, "sbatch", mnist_cache)
    monkeypatch.chdir(tmp_path)  # submitted from elsewhere: the scripts' --chdir must take the tasks home
    assert cli.main(["--root", str(root), "--name", "grid", *GRID, "--metrics", *STAGES, "--generate-slurm-scripts",
                     "--submit", "--jobs-per-task", "2", "--python", sys.executable]) == 0
    out = capsys.readouterr().out
    ids = dict(re.findall(r"submitted (\w+): job (\d+)", out))
    assert list(ids) == STAGES, out
    assert f"starts after job {ids['train']} ends" in out
    deps = sh("squeue", "-h", "-o", "%i %E", "-j", ids["loss_acc"], check=False)
    wait_jobs(list(ids.values()))
    got = states(list(ids.values()), tasks=2)
    assert sorted(got) == sorted(f"{i}_{t}" for i in ids.values() for t in (0, 1)), got
    assert set(got.values()) == {"COMPLETED"}, (got, deps)
    # afterany: no metric task started before every training task had ended
    times = sh("sacct", "-n", "-X", "-P", "-o", "JobID,Start,End", "-j", ",".join(ids.values()))
    rows = [line.split("|") for line in times.splitlines() if line.strip()]
    train_end = max(end for jid, _, end in rows if jid.startswith(f"{ids['train']}_"))
    metric_start = min(start for jid, start, _ in rows if not jid.startswith(f"{ids['train']}_"))
    assert metric_start >= train_end, times
    logs = root / "bash_scripts" / "grid" / "slurm_logs"
    assert len(list(logs.glob("train_*_*.out"))) == 2
    assert_same_table(table.collect(Layout(root, "grid"), "grid"), reference)


@pytest.mark.slurm
def test_submitit_on_slurm_matches_in_process(slurm, study_parent, mnist_cache, reference):
    root = new_root(study_parent, "submitit", mnist_cache)
    assert cli.main(["--root", str(root), "--name", "grid", *GRID, "--metrics", *STAGES]) == 0  # spec + scripts
    layout = Layout(root, "grid")
    spec = ExperimentSpec.from_file(layout.spec_path)
    options = SlurmOptions(jobs_per_task=2, parallelism=2, time="10", python=sys.executable)
    for stage in STAGES:
        report = run_submitit(spec, layout, stage_jobs(spec, stage), "slurm", options, desc=stage)
        assert not report.failed, report.failed
        assert report.done == 4
    assert_same_table(table.collect(layout, "grid"), reference)
    again = run_submitit(spec, layout, stage_jobs(spec, "train"), "slurm", options)  # nothing left to do
    assert (again.done, again.skipped) == (0, 4)


def long_study(parent: Path, name: str, mnist_cache: Path, epochs: int = 30) -> tuple[ExperimentSpec, Layout]:
    """One cell, one seed, `epochs` epochs of about 0.3 s: long enough to be interrupted midway."""
    root = new_root(parent, name, mnist_cache)
    spec_file = root / "long.json"
    spec_file.write_text(ExperimentSpec(name="long", arch="mlp", widths=(16,), batch_sizes=(16,), seeds=(0,),
                                        epochs=epochs, metrics=("loss_acc",)).to_json())
    assert cli.main(["--root", str(root), "--spec", str(spec_file), "--metrics", "train", "--generate-slurm-scripts",
                     "--python", sys.executable]) == 0
    layout = Layout(root, "long")
    return ExperimentSpec.from_file(layout.spec_path), layout


def wait_for_epoch(path: Path, epoch: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if checkpoints.load(path)["epoch"] >= epoch:
                return
        except (FileNotFoundError, checkpoints.CorruptFile):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach epoch {epoch} within {timeout} s")


@pytest.mark.slurm
def test_scancel_midway_then_resubmit_resumes_without_retraining(slurm, study_parent, mnist_cache):
    spec, layout = long_study(study_parent, "scancel", mnist_cache)
    cell = spec.cells()[0]
    last, final = layout.checkpoint(cell, 0, "last"), layout.checkpoint(cell, 0, "final")
    script = str(layout.script_path("train", ".sbatch"))
    first = sh("sbatch", "--parsable", script).strip()
    wait_for_epoch(last, 3)
    sh("scancel", first)
    wait_jobs([first])
    assert states([first])[f"{first}_0"].startswith("CANCELLED")
    assert not final.exists(), "the run finished before it was cancelled: make it longer"
    # mark the epochs trained before the cancel; a resumed run keeps them, a restarted one would not
    ckpt = checkpoints.load(last)
    done_before = ckpt["epoch"]
    assert 3 <= done_before < spec.epochs
    ckpt["history"] = [{**h, "marker": "before scancel"} for h in ckpt["history"]]
    checkpoints.save(last, ckpt)
    second = sh("sbatch", "--parsable", script).strip()
    wait_jobs([second])
    assert states([second]) == {f"{second}_0": "COMPLETED"}
    result = checkpoints.load(final)
    epochs = [h["epoch"] for h in result["history"]]
    assert result["epoch"] == spec.epochs and epochs == list(range(1, spec.epochs + 1))  # none twice, none lost
    marked = [h["epoch"] for h in result["history"] if h.get("marker") == "before scancel"]
    assert marked == list(range(1, done_before + 1)), "the resubmitted task retrained epochs it had finished"


@pytest.mark.slurm
def test_status_reads_running_and_pending_tasks_from_sacct(slurm, study_parent, mnist_cache, capsys):
    """`--submit` records the arrays; while the training task runs, `Study.status` and `--status` count it
    as running (its metric array pending behind it), from the real sacct; after scancel, neither."""
    spec, layout = long_study(study_parent, "status", mnist_cache, epochs=60)
    argv = ["--root", str(layout.root), "--spec", str(layout.root / "long.json")]
    assert cli.main([*argv, "--metrics", "train", "loss_acc", "--generate-slurm-scripts", "--submit",
                     "--python", sys.executable]) == 0
    ids = dict(re.findall(r"submitted (\w+): job (\d+)", capsys.readouterr().out))
    assert list(ids) == ["train", "loss_acc"]
    study = Study(spec, layout.root)
    try:
        wait_for_epoch(layout.checkpoint(spec.cells()[0], 0, "last"), 2)
        deadline = time.monotonic() + 30
        while (status := study.status().set_index("stage")).loc["train", "running"] != 1:  # sacct lags a little
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status.loc["train", ["jobs", "done", "failed", "missing", "running", "pending"]].tolist() == \
            [1, 0, 0, 1, 1, 0]
        assert (status.loc["loss_acc", "running"], status.loc["loss_acc", "pending"]) == (0, 1)
        assert cli.main([*argv, "--status"]) == 0
        printed = capsys.readouterr().out.splitlines()
        header = printed[0].split()
        train = dict(zip(header, next(line for line in printed if line.split()[0] == "train").split()))
        assert (train["running"], train["pending"], train["done"]) == ("1", "0", "0"), printed
    finally:
        sh("scancel", *ids.values(), check=False)
        wait_jobs(list(ids.values()))
    states(list(ids.values()))
    status = study.status().set_index("stage")
    assert status[["running", "pending"]].values.tolist() == [[0, 0], [0, 0]], status
    assert status.loc["train", "done"] == 0 and not layout.checkpoint(spec.cells()[0], 0, "final").exists()


def preempt(handle, timeout: float = 60) -> None:
    """What Slurm does on preemption, as submitit's `_interrupt` sends it: SIGTERM, then submitit's USR2.
    USR2 goes once the task has logged that it ignored the SIGTERM: scancel delivers signals
    asynchronously, and a SIGTERM arriving late killed the `scontrol requeue` the USR2 handler runs."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    sh("scancel", handle.job_id, "--signal", "SIGTERM")
    stderr, deadline = Path(handle.paths.stderr), time.monotonic() + timeout
    while time.monotonic() < deadline and not (stderr.exists() and "Bypassing signal SIGTERM" in stderr.read_text()):
        time.sleep(0.1)
    sh("scancel", handle.job_id, "--signal", SlurmJobEnvironment.USR_SIG)


@pytest.mark.slurm
def test_submitit_requeue_on_preemption_resumes_from_disk(slurm, study_parent, mnist_cache):
    """Slurm signals the task; submitit calls StageTask.checkpoint, requeues it, and it resumes from last.pt."""
    spec, layout = long_study(study_parent, "requeue", mnist_cache)
    cell = spec.cells()[0]
    options = SlurmOptions(time="10", python=sys.executable)
    executor = make_executor(layout, "train", "slurm", options)
    [task] = tasks_of(layout, stage_jobs(spec, "train"), options)
    [handle] = submit(executor, [task])
    wait_for_epoch(layout.checkpoint(cell, 0, "last"), 3)
    preempt(handle)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not handle.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert handle.result() == [(f"train:{cell.id}", "done")], log_tail(handle)
    log = Path(handle.paths.stdout).read_text()
    assert "Calling checkpoint method" in log and "Requeued job" in log, log
    resumed = [int(m) for m in re.findall(r"resumes after epoch (\d+)", log)]
    assert resumed and resumed[0] >= 3, log
    result = checkpoints.load(layout.checkpoint(cell, 0, "final"))
    assert [h["epoch"] for h in result["history"]] == list(range(1, spec.epochs + 1))


@pytest.mark.slurm
def test_a_failing_task_is_reported_with_its_log_while_the_rest_complete(slurm, study_parent, mnist_cache):
    root = new_root(study_parent, "failing", mnist_cache)
    spec_file = root / "fails.json"
    spec_file.write_text(ExperimentSpec(name="fails", arch="mlp", widths=(4, 8), batch_sizes=(256,), seeds=(0,),
                                        epochs=1, train_fractions=(0.25,), metrics=("loss_acc",)).to_json())
    assert cli.main(["--root", str(root), "--spec", str(spec_file), "--metrics", "train"]) == 0
    layout = Layout(root, "fails")
    spec = ExperimentSpec.from_file(layout.spec_path)
    bad = spec.cells()[1]
    blocker = layout.run_dir(bad, 0).parent  # a file where the run folder must go: training raises
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    report = run_submitit(spec, layout, stage_jobs(spec, "train"), "slurm",
                          SlurmOptions(time="10", python=sys.executable), desc="train")
    assert report.done == 1 and report.skipped == 0
    [(job, error)] = report.failed
    assert job.cell == bad
    message = str(error)
    assert f"train:{bad.id}" in message
    assert "Error" in message.splitlines()[0]  # the exception, e.g. FileExistsError / NotADirectoryError
    assert str(submitit_folder(layout)) in message and "last" in message  # the log tail, with its path
    assert str(blocker) in message
    assert layout.checkpoint(spec.cells()[0], 0, "final").exists()


def test_submitit_local_executor_runs_the_grid(study_parent, mnist_cache, reference):
    """The job list through submitit's LocalExecutor (no Slurm needed), two processes at a time."""
    root = new_root(study_parent, "submitit-local", mnist_cache)
    assert cli.main(["--root", str(root), "--name", "grid", *GRID, "--metrics", *STAGES]) == 0
    layout = Layout(root, "grid")
    spec = ExperimentSpec.from_file(layout.spec_path)
    options = SlurmOptions(jobs_per_task=2, parallelism=2, python=sys.executable)
    stages = ["train", "dist"]  # two stages are enough here (each task costs a fresh Python)
    for stage in stages:
        report = run_submitit(spec, layout, stage_jobs(spec, stage), "submitit-local", options, desc=stage,
                              poll_s=0.2)
        assert not report.failed, report.failed
        assert report.done == 4
    assert_same_table(table.collect(layout, "grid"), reference[reference.source.isin(stages)])
