"""What a lab sharing a study folder on a cluster needs: scripts that run the generating interpreter,
files readable under the lab's umask, and a dataset cache that repairs itself."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from phasediagram import cli
from phasediagram.data import datasets

BASE = ["--name", "lab", "--arch", "mlp", "--widths", "4", "--batch-sizes", "256", "--seeds", "0", "1", "--epochs",
        "1", "--train-fractions", "0.25", "--metrics", "train", "loss_acc"]


def worker_lines(path: Path) -> list[list[str]]:
    return [shlex.split(line) for line in path.read_text().splitlines() if "phasediagram.execution.worker" in line]


def test_scripts_run_the_interpreter_that_wrote_them(root):
    assert cli.main([*BASE, "--root", str(root), "--generate-slurm-scripts"]) == 0
    scripts = root / "bash_scripts" / "lab"
    for name in ("train.sh", "train.sbatch", "loss_acc.sh", "loss_acc.sbatch"):
        lines = worker_lines(scripts / name)
        assert lines and all(words[0] == sys.executable for words in lines), name
    assert os.path.isabs(sys.executable)


def test_env_setup_keeps_its_python_and_resolves_relative_paths(root):
    (root / "env").mkdir()
    (root / "env" / "activate").write_text("true\n")
    assert cli.main([*BASE, "--root", str(root), "--generate-slurm-scripts", "--env-setup",
                     "source env/activate"]) == 0
    sbatch = (root / "bash_scripts" / "lab" / "train.sbatch").read_text()
    assert "source env/activate" in sbatch
    assert all(words[0] == "python" for words in worker_lines(root / "bash_scripts" / "lab" / "train.sbatch"))
    assert cli.main([*BASE, "--root", str(root), "--generate-slurm-scripts", "--python", "/opt/py/bin/python3"]) == 0
    assert all(words[0] == "/opt/py/bin/python3" for words in worker_lines(root / "bash_scripts" / "lab" / "train.sh"))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask(root, umask):
    old = os.umask(umask)
    try:
        assert cli.main([*BASE, "--root", str(root), "--run", "--executor", "inprocess"]) == 0
    finally:
        os.umask(old)
    exp = root / "checkpoint" / "lab"
    files = [exp / "spec.json", exp / "results.csv", *exp.glob("runs/*/*/*.pt"), *exp.glob("results/*/*.json")]
    assert len(files) > 6
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for script in (root / "bash_scripts" / "lab").glob("*.sh"):
        assert stat.S_IMODE(script.stat().st_mode) == 0o777 & ~umask, script


@pytest.mark.parametrize("damage", ["zip_garbage", "truncated", "empty"])
def test_a_damaged_dataset_cache_is_moved_aside_and_rebuilt(tmp_path, mnist_cache, damage):
    cache = tmp_path / "mnist1d_default.npz"
    good = (mnist_cache / "mnist1d_default.npz").read_bytes()
    cache.write_bytes({"zip_garbage": b"PK\x03\x04" + os.urandom(2000), "truncated": good[:len(good) // 2],
                       "empty": b""}[damage])
    data = datasets.load("mnist1d", cache_dir=tmp_path)
    assert (tmp_path / "mnist1d_default.corrupt").exists()
    with np.load(cache, allow_pickle=False) as z:
        assert z["x"].shape[0] == len(data.train)
    assert not list(tmp_path.glob("*.tmp"))  # the rebuilt cache was written atomically, no temp file left
    again = datasets.load("mnist1d", cache_dir=tmp_path)
    assert (again.train.x == data.train.x).all()


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """scontrol and sinfo on PATH answering as a cluster with MaxArraySize 3 and 8-CPU, 2-GPU nodes."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'MaxArraySize            = 3'\necho 'MaxJobCount = 10000'\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho '4|(null)'\necho '8|gpu:a100:2(S:0-1)'\n")
    for tool in ("scontrol", "sinfo"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


GRID = ["--widths", "4", "8", "--batch-sizes", "256", "512"]


@pytest.mark.parametrize("extra, words", [
    ([], "stage train needs 4 array tasks but the cluster's MaxArraySize is 3: pack jobs with --jobs-per-task 2"),
    (["--jobs-per-task", "2", "--cpus-per-task", "16"], "cpus_per_task: 16 CPUs per task, but a node of the default "
                                                          "partition has at most 8"),
    (["--jobs-per-task", "2", "--gpus", "4", "--partition", "gpu"], "gpus: 4 GPUs per task, but a node of partition "
                                                                    "gpu has at most 2"),
])
def test_arrays_the_cluster_would_refuse_are_refused_before_any_file(root, capsys, fake_slurm, extra, words):
    assert cli.main([*BASE, *GRID, "--root", str(root), "--generate-slurm-scripts", *extra]) == 2
    assert words in capsys.readouterr().err
    assert not (root / "checkpoint").exists() and not (root / "bash_scripts").exists()


def test_arrays_that_fit_are_written(root, fake_slurm):
    assert cli.main([*BASE, *GRID, "--root", str(root), "--generate-slurm-scripts", "--jobs-per-task", "2",
                     "--cpus-per-task", "8", "--gpus", "2"]) == 0
    assert "--array=0-1" in (root / "bash_scripts" / "lab" / "train.sbatch").read_text()
