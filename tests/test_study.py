"""The Python API: a `Study` trains, measures, tabulates and draws; README's example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.figure import Figure

import phasediagram
from phasediagram.analysis import phases, table
from phasediagram.errors import SpecError

from .conftest import tiny_spec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_public_api_is_listed_and_lazy():
    assert phasediagram.__version__ and set(phasediagram.__all__) <= set(dir(phasediagram))
    for name in phasediagram.__all__:
        assert getattr(phasediagram, name) is not None, name
    assert phasediagram.check_spec is phasediagram.resolve.check
    with pytest.raises(AttributeError):
        phasediagram.no_such_name  # noqa: B018


def test_a_study_trains_measures_and_draws(root):
    spec = tiny_spec(seeds=(0, 1), metrics=("loss_acc", "dist"))
    study = phasediagram.Study(spec, root)
    status = study.status()
    assert status[["stage", "jobs", "done", "failed", "missing"]].to_dict("records") == [
        {"stage": s, "jobs": 4, "done": 0, "failed": 0, "missing": 4} for s in ("train", "loss_acc", "dist")]
    assert status["running"].isna().all() and status["pending"].isna().all()  # nothing sent to Slurm
    trained = study.train(phasediagram.InProcess())
    assert (trained.done, trained.skipped, trained.failed) == (4, 0, [])
    assert list(study.status().done) == [4, 0, 0]
    measured = study.measure(executor=phasediagram.InProcess())
    assert {s: r.done for s, r in measured.items()} == {"loss_acc": 4, "dist": 4}
    again = study.run(executor=phasediagram.InProcess())
    assert all(r.skipped == 4 and r.done == 0 for r in again.values())
    df = study.table()
    assert df.equals(table.read(study.layout.table_path, spec.name))
    assert {"train", "loss_acc", "dist"} <= set(df.source) <= {"train", "loss_acc", "dist", phases.PHASE_SOURCE}
    fig = study.figure(df)
    assert isinstance(fig, Figure) and fig.titles[:2] == ["(a) test accuracy (%)", "(b) log10 training loss"]
    assert len(study.phases(df)) == 4
    assert isinstance(study.phase_map(df), Figure) and study.density_figure(df) is None
    written = study.save_figures(df, log=lambda _: None)
    assert {p.name for p in written} >= {"phase_plot.png", "phase_plot.pdf", "phases.csv", "correlations.csv"}
    assert all(p.stat().st_size > 0 for p in written)


def test_a_study_checks_its_spec_and_its_folder(root):
    with pytest.raises(SpecError, match="arch: 'vgg' is not one of"):
        phasediagram.Study(phasediagram.ExperimentSpec(name="t", arch="vgg"), root)
    phasediagram.Study(tiny_spec(), root).record()
    with pytest.raises(SpecError, match="different training settings \\(epochs\\)"):
        phasediagram.Study(tiny_spec(epochs=3), root).record()
    more = phasediagram.Study({**tiny_spec().to_dict(), "metrics": ["hessian"]}, root)
    assert more.record().metrics == ("loss_acc", "dist", "hessian")  # metrics may be added
    with pytest.raises(SpecError, match="not one of train"):
        more.run(["sharpness"], phasediagram.InProcess())


def readme_example() -> str:
    text = README.read_text()
    match = re.search(r"## Python\n.*?```python\n(.*?)```", text, re.S)
    assert match, "README has a ## Python section with a python block"
    return match.group(1)


def test_the_readme_example_runs_as_printed(root, monkeypatch, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(root)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "phase" in out and (root / "runs" / "checkpoint" / "tiny" / "results.csv").exists()
    assert (root / "runs" / "tiny.png").stat().st_size > 10_000
    df = table.read(root / "runs" / "checkpoint" / "tiny" / "results.csv", "tiny")
    assert isinstance(df, pd.DataFrame) and df.cell.nunique() == 4
