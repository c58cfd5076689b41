"""`diagnose`: a study's own checkpoints reproduce their cell's rows and phase; the marker; the CLI."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from phasediagram import InProcess, Study, diagnose
from phasediagram.analysis import plots
from phasediagram.cli import main
from phasediagram.diagnosis import ADVICE, MARKER_ID, ONE_SEED, marker_position
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS
from phasediagram.models import families
from phasediagram.storage import checkpoints
from tests.conftest import tiny_spec

PHASE_SOURCES = ("loss_acc", "curve", "CKA")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_cache):
    """A finished 2x2 study (mlp widths 4, 16; batch sizes 32, 512; 2 seeds) with the phase metrics."""
    root = tmp_path_factory.mktemp("diagnose")
    shutil.copytree(mnist_cache, root / "data")
    metrics = ("loss_acc", "dist", "curve", "CKA")
    spec = tiny_spec(widths=(4, 16), batch_sizes=(32, 512), epochs=2, metrics=metrics,
                     metric_options={m: dict(METRICS[m].test_options) for m in metrics if METRICS[m].test_options})
    study = Study(spec, root)
    reports = study.run(executor=InProcess())
    assert all(not r.failed for r in reports.values())
    return study


def seed_paths(study, cell):
    return [study.layout.checkpoint(cell, seed, "final") for seed in study.spec.seeds]


def files_under(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_each_cell_reproduces_its_rows_and_lands_in_its_phase(finished):
    table = finished.table(write=False)
    own = finished.phases(table).set_index("cell")["phase"]
    assert own.astype(bool).all()  # every cell of the study is classified, so each comparison means something
    for cell in finished.spec.cells():
        d = diagnose(seed_paths(finished, cell), finished)
        assert d.cell == cell and d.seeds == finished.spec.seeds
        assert d.phase == own[cell.id] == d.study_phase
        assert d.advice == ADVICE[d.phase]
        for source in PHASE_SOURCES:
            key = ["seed", "seed_b", "split", "metric", "coord"]
            ours = d.rows[d.rows["source"] == source].sort_values(key)
            study_rows = table[(table["cell"] == cell.id) & (table["source"] == source)].sort_values(key)
            assert len(ours) == len(study_rows) > 0
            np.testing.assert_allclose(ours["value"].to_numpy(float), study_rows["value"].to_numpy(float),
                                       rtol=1e-12, atol=0)


def test_figure_marks_the_cell_position(finished, tmp_path):
    cell = finished.spec.cells()[1]
    fig = diagnose(seed_paths(finished, cell), finished).figure()
    markers = [line for line in fig.axes[0].get_lines() if line.get_gid() == MARKER_ID]
    assert len(markers) == 1
    x, y = markers[0].get_xdata()[0], markers[0].get_ydata()[0]
    assert (x, y) == (cell.width, cell.batch_size)
    ex, ey = plots.edges(finished.spec.widths), plots.edges(finished.spec.batch_sizes)
    j, i = sorted(finished.spec.widths).index(cell.width), sorted(finished.spec.batch_sizes).index(cell.batch_size)
    assert ex[j] < x < ex[j + 1] and ey[i] < y < ey[i + 1]
    fig.savefig(tmp_path / "diagnosis.png", dpi=80)
    assert (tmp_path / "diagnosis.png").stat().st_size > 0


def test_marker_position_between_the_grid_edges():
    # log axis, grid 4, 16: edges at 2, 8 (the geometric midpoint), 32
    assert marker_position(16, [4, 16]) == (16.0, True)
    assert marker_position(8, [4, 16]) == (8.0, True)
    assert marker_position(100, [4, 16]) == pytest.approx((32.0, False))
    assert marker_position(1, [4, 16]) == pytest.approx((2.0, False))
    # linear axis (a value 0), grid 0, 0.1: edges at -0.05, 0.05, 0.15
    assert marker_position(0.3, [0.0, 0.1]) == pytest.approx((0.15, False))
    assert marker_position(0.07, [0.0, 0.1]) == pytest.approx((0.07, True))


def test_one_checkpoint_gets_single_model_metrics_and_no_phase(finished):
    cell = finished.spec.cells()[0]
    d = diagnose(seed_paths(finished, cell)[:1], finished)
    assert d.phase == "" and d.advice == ONE_SEED
    measured = set(d.rows.loc[d.rows["source"] != "train", "source"])
    assert measured == {"loss_acc"}
    assert math.isnan(d.classified["mc"]) and d.classified["train_loss"] > 0
    assert "second seed" in d.summary()


def test_cli_prints_the_phase_and_writes_the_figure(finished, tmp_path, capsys):
    cell = finished.spec.cells()[2]
    out = tmp_path / "map.png"
    paths = [str(p) for p in seed_paths(finished, cell)]
    assert main(["diagnose", *paths, "--study", str(finished.layout.exp_dir), "--figure", str(out)]) == 0
    phase = finished.phases().set_index("cell")["phase"][cell.id]
    printed = capsys.readouterr().out
    assert f"phase: {phase} " in printed and ADVICE[phase] in printed
    assert out.read_bytes().startswith(b"\x89PNG")
    assert main(["diagnose", *paths, "--root", str(finished.layout.root), "--name", finished.spec.name]) == 0
    assert f"phase: {phase} " in capsys.readouterr().out


def other_family_checkpoint(path):
    model = families.create("resnet1d", 2, (40,), 10)
    checkpoints.save(path, {"model": model.state_dict(), "model_args": families.model_args("resnet1d", 2, (40,), 10),
                            "cell": dict(width=2, batch_size=32, lr=0.1, weight_decay=0.0), "seed": 0, "epoch": 0,
                            "status": "ok"})


@pytest.mark.parametrize("case", ["missing", "corrupt", "other_family", "mismatched_weights", "no_results", "no_study"])
def test_cli_bad_input_one_line_exit_2_nothing_written(finished, tmp_path, capsys, case):
    good = [str(p) for p in seed_paths(finished, finished.spec.cells()[0])]
    study = str(finished.layout.exp_dir)
    if case == "missing":
        given = [good[0], str(tmp_path / "nothing.pt")]
    elif case == "corrupt":
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
        given = [good[0], str(tmp_path / "bad.pt")]
    elif case == "other_family":
        other_family_checkpoint(tmp_path / "resnet.pt")
        given = [str(tmp_path / "resnet.pt")]
    elif case == "mismatched_weights":  # model_args of width 8 over width-4 weights
        ckpt = checkpoints.load(good[0])
        checkpoints.save(tmp_path / "wide.pt", {**ckpt, "model_args": {**ckpt["model_args"], "width": 8}})
        given = [str(tmp_path / "wide.pt")]
    else:
        given = good
        empty = Study(tiny_spec(name=case.replace("_", "")), finished.layout.root)
        if case == "no_results":
            empty.record()
        study = str(empty.layout.exp_dir)
    before = files_under(finished.layout.root), files_under(tmp_path)
    figure = tmp_path / "never.png"
    assert main(["diagnose", *given, "--study", study, "--figure", str(figure)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: ")
    assert (files_under(finished.layout.root), files_under(tmp_path)) == before
    assert not figure.exists()


def test_figure_suffix_checked_before_any_work(finished, tmp_path, capsys):
    paths = [str(p) for p in seed_paths(finished, finished.spec.cells()[0])]
    assert main(["diagnose", *paths, "--study", str(finished.layout.exp_dir), "--figure",
                 str(tmp_path / "map.jpg")]) == 2
    assert "figure" in capsys.readouterr().err
    assert main(["diagnose", *paths, "--study", str(finished.layout.exp_dir), "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: threads: must be an integer >= 1, got 0"


def test_threads_are_set_while_measuring_and_restored(finished, monkeypatch):
    """`threads` is the torch thread count during the metrics (seen from inside a metric job), restored after;
    0 and non-integers are refused before any work."""
    import torch

    from phasediagram import diagnosis

    seen = []
    real = diagnosis.metric_rows
    monkeypatch.setattr(diagnosis, "metric_rows", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    cell = finished.spec.cells()[0]
    diagnose(seed_paths(finished, cell), finished, threads=1)
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    diagnose(seed_paths(finished, cell), finished, threads=2)
    assert set(seen) == {2} and torch.get_num_threads() == before
    seen.clear()
    diagnose(seed_paths(finished, cell), finished, threads=None)
    assert set(seen) == {before}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SpecError, match="threads: must be an integer >= 1"):
            diagnose(seed_paths(finished, cell), finished, threads=bad)
    assert torch.get_num_threads() == before
