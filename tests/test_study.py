"""The Python API: a `Study` trains, measures, tabulates and draws; recording a study is atomic."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from matplotlib.figure import Figure

import phasediagram
from phasediagram.analysis import phases, table
from phasediagram.errors import SpecError

from .conftest import tiny_spec


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


def _record(root, epochs: int, barrier, outcomes) -> None:
    """In a forked process: the tiny study with `epochs`, recorded once every process is at `barrier`."""
    study = phasediagram.Study(tiny_spec(epochs=epochs), root)
    barrier.wait()
    try:
        study.record()
        outcomes.put((epochs, "recorded"))
    except SpecError:
        outcomes.put((epochs, "refused"))
    except BaseException as exc:
        outcomes.put((epochs, repr(exc)))
    os._exit(0)


@pytest.mark.parametrize("epochs", [(2, 3, 2, 3), (2, 2, 2, 2)], ids=["different", "identical"])
def test_synchronised_recorders_agree_with_spec_json(tmp_path, epochs):
    """Many processes record at the same instant: of different training settings exactly the first
    recorded is accepted and is what spec.json says; identical settings are all accepted."""
    context = multiprocessing.get_context("fork")
    for trial in range(8):
        root = tmp_path / str(trial)
        barrier, outcomes = context.Barrier(len(epochs)), context.SimpleQueue()
        processes = [context.Process(target=_record, args=(root, e, barrier, outcomes)) for e in epochs]
        for p in processes:
            p.start()
        results = [outcomes.get() for _ in processes]
        for p in processes:
            p.join(60)
        recorded = phasediagram.load_spec(root / "checkpoint" / "tiny" / "spec.json").epochs
        assert all((outcome == "recorded") == (e == recorded) for e, outcome in results), results


def test_the_table_leaves_out_results_of_other_training_settings(root):
    study = phasediagram.Study(tiny_spec(metrics=("loss_acc",)), root)
    study.run(executor=phasediagram.InProcess())
    path = study.layout.result_path("loss_acc", study.spec.cells()[0])
    doc = json.loads(path.read_text())
    assert len(study.table(write=False).query("source == 'loss_acc'").cell.unique()) == 4
    doc["training_hash"] = "another"
    path.write_text(json.dumps(doc))
    assert len(study.table(write=False).query("source == 'loss_acc'").cell.unique()) == 3


def test_a_recorded_study_opens_from_its_folder_or_its_root(root):
    study = phasediagram.Study(tiny_spec(metrics=("loss_acc",)), root)
    with pytest.raises(SpecError, match="holds 0 studies"):
        phasediagram.Study.open(root)
    study.record()
    for opened in (phasediagram.Study.open(study.layout.exp_dir), phasediagram.Study.open(root),
                   phasediagram.Study.open(root, "tiny")):
        assert opened.spec == study.spec and opened.layout == study.layout
    phasediagram.Study(tiny_spec(name="other"), root).record()
    with pytest.raises(SpecError, match="holds 2 studies \\(other, tiny\\)"):
        phasediagram.Study.open(root)
    with pytest.raises(SpecError, match="no study 'third'"):
        phasediagram.Study.open(root, "third")


def test_the_study_writes_the_scripts_the_command_line_writes(root, tmp_path):
    from phasediagram import cli
    from phasediagram.execution.scripts import SlurmOptions

    spec = tiny_spec(metrics=("loss_acc", "dist"))
    study = phasediagram.Study(spec, root)
    options = SlurmOptions(time="01:00:00", mem="4G", python="python")
    with pytest.raises(SpecError, match="not one of train"):
        study.write_scripts(["train", "sharpness"], options)
    assert not study.layout.exp_dir.exists()  # refused before anything is written
    written = study.write_scripts(options=options, slurm=True)
    assert [p.name for p in written] == ["train.sh", "train.sbatch", "loss_acc.sh", "loss_acc.sbatch", "dist.sh",
                                         "dist.sbatch"]
    other = tmp_path / "cli"
    argv = ["--root", str(other), "--name", "tiny", "--arch", "mlp", "--widths", "4", "8", "--batch-sizes", "256",
            "512", "--seeds", "0", "1", "--epochs", "2", "--train-fractions", "0.25", "--metrics", "train", "loss_acc",
            "dist", "--generate-slurm-scripts", "--time", "01:00:00", "--mem", "4G", "--python", "python"]
    assert cli.main(argv) == 0
    for path in written:
        expected = (other / "bash_scripts" / "tiny" / path.name).read_text().replace(str(other), str(root))
        assert path.read_text() == expected, path.name
    with pytest.raises(SpecError, match="does not exist"):
        phasediagram.Study(tiny_spec(name="unscripted"), root).submit()
