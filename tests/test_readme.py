"""README's Python blocks run exactly as written, with the default executor (the local pool on
several cores): saved as a plain script without a main guard, typed into a REPL, and in a notebook."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phasediagram.analysis import table

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT_S = 300


def python_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has python blocks"
    return blocks


@pytest.fixture
def folder(tmp_path, mnist_cache, monkeypatch):
    """An empty working folder whose study root `runs` already has the MNIST-1D cache."""
    shutil.copytree(mnist_cache, tmp_path / "runs" / "data")
    for var in ("MPLCONFIGDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def check_outputs(folder: Path, printed: str) -> None:
    assert "phase" in printed
    df = table.read(folder / "runs" / "checkpoint" / "tiny" / "results.csv", "tiny")
    assert df.cell.nunique() == 4 and {"train", "loss_acc", "dist"} <= set(df.source)
    assert (folder / "runs" / "tiny.png").stat().st_size > 10_000


def run(command: list[str], folder: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=folder, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_every_block_runs_as_a_plain_script(folder):
    for i, code in enumerate(python_blocks()):
        script = folder / f"example{i}.py"
        script.write_text(code)
        done = run([sys.executable, script.name], folder)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    check_outputs(folder, done.stdout)


def test_every_block_runs_in_a_repl(folder):
    for code in python_blocks():
        done = run([sys.executable, "-q", "-i"], folder, stdin=code + "\n")
        assert "Traceback" not in done.stderr and done.returncode == 0, done.stderr[-3000:]
    check_outputs(folder, done.stderr + done.stdout)


def test_every_block_runs_in_a_notebook(folder):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in python_blocks()])
    nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    check_outputs(folder, "".join(o.get("text", "") for o in outputs))
