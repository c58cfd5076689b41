"""The notebook runs headless (nbclient) on a small table and draws the figure, the phase map and the correlations."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import phasediagram  # noqa: E402
from phasediagram.analysis import table  # noqa: E402

from .conftest import tiny_spec  # noqa: E402
from .test_phases import synthetic_table  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "workspace" / "notebooks" / "phase_plots.ipynb"


def test_notebook_metadata_and_parameter_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.language_info.name == "python"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'results_path = "checkpoint/demo"' in params[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored without outputs


def _run(nb_params: str, tmp_path, monkeypatch):
    for var in ("MPLCONFIGDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        folder = tmp_path / var.lower()
        folder.mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(folder))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n" + nb_params  # as papermill injects
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    return nb


def _check_outputs(nb, out: Path, cells: int):
    for name in ("phase_plot.png", "phase_plot.pdf", "phase_map.png", "correlations.csv", "correlations.md",
                 "correlations.png"):
        assert (out / name).stat().st_size > 0, name
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"{cells} cells; load = width, temperature = batch_size" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    markdown = [o for c in nb.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert len(images) == 3 and "Correlation with test accuracy" in markdown[0]["data"]["text/markdown"]


def test_notebook_runs_headless_on_a_small_table(tmp_path, monkeypatch):
    csv = tmp_path / "results.csv"
    table.write(synthetic_table(), csv)
    out = tmp_path / "figures"
    nb = _run(f"results_path = {str(csv)!r}\nout_dir = {str(out)!r}\ndpi = 40\n", tmp_path, monkeypatch)
    _check_outputs(nb, out, 16)


def test_notebook_defines_and_runs_a_tiny_study(root, tmp_path, monkeypatch):
    nb = _run(f"study_root = {str(root)!r}\ndpi = 40\n", tmp_path, monkeypatch)
    exp = root / "checkpoint" / "notebook"
    df = table.read(exp / "results.csv", "notebook")
    assert set(df.source) >= {"train", "loss_acc", "dist"} and df.cell.nunique() == 4
    _check_outputs(nb, exp, 4)


def test_notebook_opens_a_study_folder(root, tmp_path, monkeypatch):
    study = phasediagram.Study(tiny_spec(name="folder"), root)
    study.run(executor=phasediagram.InProcess())
    out = tmp_path / "figures"
    nb = _run(f"results_path = {str(study.layout.exp_dir)!r}\nout_dir = {str(out)!r}\ndpi = 40\n", tmp_path,
              monkeypatch)
    _check_outputs(nb, out, 4)
