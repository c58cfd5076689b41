"""The Model-Diagnosis importer: values against the CSV read independently, labels, refusals, the figure."""

from __future__ import annotations

import csv
import math
import random
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

import phasediagram
from phasediagram import failure
from phasediagram.analysis import correlations, improvement, phases, table
from phasediagram.analysis import model_diagnosis as md
from phasediagram.analysis.small_multiples import phase_small_multiples
from phasediagram.cli import main
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS
from phasediagram.models import families
from phasediagram.spec.experiment import Cell
from phasediagram.spec.presets import PRESET_SPECS
from phasediagram.storage import checkpoints
from phasediagram.study import Study
from tests.conftest import tiny_spec

SHIPPED = {name: md.shipped(name) for name in md.COLLECTIONS}


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=sorted(md.COLLECTIONS))
def collection(request):
    return request.param, md.load_model_diagnosis(request.param), csv_rows(SHIPPED[request.param])


def value(df, width, bs, fraction, metric, split=None):
    sel = df[(df["width"] == width) & (df["batch_size"] == bs) & np.isclose(df["train_fraction"], fraction)
             & (df["metric"] == metric)]
    if split is not None:
        sel = sel[sel["split"] == split]
    assert len(sel) == 1, (width, bs, fraction, metric, split)
    return sel.iloc[0]


def test_the_public_loader_is_the_importer():
    assert phasediagram.load_model_diagnosis is md.load_model_diagnosis


def test_values_at_random_cells_match_the_csv(collection):
    name, df, rows = collection
    assert len(rows) == 1690 and len(df) == 1690 * 18
    noise = {"clean": 0.0, "noisy": 0.1}[name]
    for row in random.Random(33).sample(rows, 25):
        w, bs, frac = int(row["width"]), int(row["bs"]), int(row["data"]) / 10
        expected = {("acc", "train"): float(row["train_acc"]), ("acc", "test"): float(row["test_acc"]),
                    ("loss", "train"): float(row["train_loss"]), ("loss", "test"): float(row["test_loss"]),
                    ("cka_softmax", "train"): float(row["CKA"]), ("mc", "train"): float(row["mode_connectivity"]),
                    ("err_peak", "train"): -float(row["mode_connectivity_peak"]),
                    ("top_abs_eigenvalue", "train"): math.exp(float(row["hessian_e"])),
                    ("trace", "train"): math.exp(float(row["hessian_t"]))}
        for (metric, split), v in expected.items():
            got = value(df, w, bs, frac, metric, split)
            assert got["value"] == pytest.approx(v, rel=1e-12, abs=0)
            assert got["kind"] == "value" and got["status"] == "ok" and pd.isna(got["seed"])
            assert got["label_noise"] == noise and got["lr"] == 0.1 and got["weight_decay"] == 5e-4
        # the error columns the importer leaves out follow from the accuracies it keeps
        assert 100 - expected["acc", "test"] == pytest.approx(float(row["test_error"]), abs=1e-9)
        for column in md.RFI:
            assert value(df, w, bs, frac, column)["value"] == pytest.approx(float(row[column]), rel=1e-12)
        assert value(df, w, bs, frac, "parameters")["value"] == int(row["para_amount"])
        assert value(df, w, bs, frac, "train_images")["value"] == int(row["data_amount"])


def test_the_log_columns_are_natural_logs_of_the_stored_values(collection):
    _, df, rows = collection
    eig = df[df["metric"] == "top_abs_eigenvalue"].set_index(md.INDEX)["value"]
    row = rows[0]
    key = (int(row["width"]), int(row["bs"]), int(row["data"]) / 10)
    assert math.log(eig[key]) == pytest.approx(float(row["hessian_e"]), rel=1e-12)
    assert math.log10(eig[key]) != pytest.approx(float(row["hessian_e"]), rel=1e-3)
    assert (eig > 0).all()


def test_labels_round_trip_and_agree_with_the_rfi_rule(collection):
    _, df, rows = collection
    labels = md.labels(df)
    assert list(labels.columns) == list(md.LABEL_COLUMNS) and len(labels) == 1690
    assert labels.index.names == md.INDEX
    for row in rows:
        got = labels.loc[(int(row["width"]), int(row["bs"]), int(row["data"]) / 10)]
        assert (got["bs_failure"], got["width_vs_batch"], got["data_vs_batch"]) == \
            (row["bs_failure"], row["width_vs_batch"], row["data_vs_batch"])
    inc, dec = labels["rfi_inc_temp"], labels["rfi_dec_temp"]
    rule = np.where(dec > inc, "large", np.where(inc > dec, "small", "optimal"))
    assert (labels["bs_failure"] == rule).all()


def test_labels_derived_from_test_accuracy_reproduce_the_published_ones(collection):
    _, df, _ = collection
    published, derived = md.labels(df), md.labels(improvement.with_labels(df))
    pd.testing.assert_index_equal(derived.index, published.index)
    for column in md.RFI:
        np.testing.assert_allclose(derived[column], published[column], rtol=0, atol=1e-12)
    for question in md.QUESTIONS:
        assert (derived[question] == published[question]).all(), question


def test_labels_need_a_grid_of_width_batch_size_and_fraction_only():
    df = md.load_model_diagnosis("clean")
    other = df.assign(lr=0.05, cell=df["cell"] + "_lr0.05")
    with pytest.raises(SpecError, match="several cells per"):
        improvement.with_labels(pd.concat([df, other]))
    with pytest.raises(SpecError, match="no test accuracy"):
        improvement.with_labels(df[df["split"] != "test"])


def test_labels_survive_writing_and_reading_the_table(tmp_path):
    df = md.load_model_diagnosis("noisy")
    table.write(df, tmp_path / "t.csv")
    back = table.read(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(md.labels(back), md.labels(df))


def test_label_rows_reach_no_phase_figure_or_correlation():
    df = md.load_model_diagnosis("clean")
    assert set(table.measurements(df)["kind"]) == {"value"}
    _, names = correlations.cell_table(df)
    assert {metric for _, _, metric in names.values()} == {m for _, _, m, _ in md.MEASUREMENTS.values()}
    ph = phases.classify(df)
    assert len(ph) == 1690 and ph["phase"].isin(phases.PHASES).all()


def test_both_collections_together_need_one_selected_for_labels():
    both = pd.concat([md.load_model_diagnosis("clean"), md.load_model_diagnosis("noisy")])
    with pytest.raises(SpecError, match="several cells"):
        md.labels(both)
    with pytest.raises(SpecError, match="no rows of kind 'label'"):
        md.labels(table.measurements(both))


@pytest.fixture
def text():
    return pd.read_csv(SHIPPED["clean"], dtype=str, keep_default_na=False).head(20)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.drop(columns=["hessian_e"]), "missing columns ['hessian_e']"),
    (lambda t: t.assign(CKA=t["CKA"].where(t.index != 4, "high")), "row 5: CKA 'high' is not a finite number"),
    (lambda t: t.assign(test_acc=t["test_acc"].where(t.index != 2, "")), "row 3: test_acc '' is not a finite number"),
    (lambda t: t.assign(train_loss=t["train_loss"].where(t.index != 0, "nan")), "row 1: train_loss 'nan'"),
    (lambda t: t.assign(bs=t["bs"].where(t.index != 1, "16.5")), "row 2: bs '16.5' is not a positive integer"),
    (lambda t: t.assign(bs_failure=t["bs_failure"].where(t.index != 6, "huge")), "row 7: bs_failure 'huge'"),
    (lambda t: pd.concat([t, t.head(1)], ignore_index=True), "row 21: a second row for width 2"),
])
def test_bad_csv_is_refused_in_one_line(tmp_path, text, change, words):
    path = tmp_path / "dataframe_normal_public.csv"
    change(text).to_csv(path, index=False)
    with pytest.raises(SpecError) as err:
        md.load_model_diagnosis(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unknown_name_and_unreadable_files_are_refused(tmp_path):
    other = tmp_path / "mine.csv"
    shutil.copy(SHIPPED["clean"], other)
    with pytest.raises(SpecError, match="pass label_noise"):
        md.load_model_diagnosis(other)
    assert md.load_model_diagnosis(other, label_noise=0.0, experiment="mine")["experiment"].eq("mine").all()
    with pytest.raises(SpecError, match="cannot read"):
        md.load_model_diagnosis(tmp_path / "dataframe_noise_public.csv")
    with pytest.raises(SpecError, match="unknown collection"):
        md.shipped("dirty")


def test_small_multiples_one_panel_per_training_fraction():
    df = md.load_model_diagnosis("clean")
    sub = df[df["train_fraction"].isin([0.1, 0.5, 1.0])]
    fig = phase_small_multiples(sub)
    assert fig.titles == ["train_fraction = 0.1", "train_fraction = 0.5", "train_fraction = 1"]
    assert sum(ax.get_visible() and ax.axison for ax in fig.axes) == 3
    assert len(fig.phases) == 3 * 13 * 13


def test_the_command_writes_table_and_figure(tmp_path, capsys):
    assert md.main(["noisy", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_diagnosis_noisy.csv", "model_diagnosis_noisy.png"]
    assert md.main([str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------- diagnose wiring
@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_cache):
    """A finished 2x2 study (mlp widths 4, 16; batch sizes 32, 512; 2 seeds) with the phase metrics."""
    root = tmp_path_factory.mktemp("failure")
    shutil.copytree(mnist_cache, root / "data")
    metrics = ("loss_acc", "curve", "CKA")
    spec = tiny_spec(widths=(4, 16), batch_sizes=(32, 512), epochs=2, metrics=metrics,
                     metric_options={m: dict(METRICS[m].test_options) for m in metrics if METRICS[m].test_options})
    study = Study(spec, root)
    assert all(not r.failed for r in study.run(executor=phasediagram.InProcess()).values())
    return study


def seed_paths(study, cell):
    return [str(study.layout.checkpoint(cell, seed, "final")) for seed in study.spec.seeds]


def files_under(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def one_cell(df, width, bs, fraction):
    return df[(df["width"] == width) & (df["batch_size"] == bs) & np.isclose(df["train_fraction"], fraction)
              & (df["kind"] == "value")]


def test_answer_at_a_published_cell_is_the_diagnosers_with_that_cells_room():
    from phasediagram.analysis.diagnoser import fit_diagnoser

    df = md.load_model_diagnosis("noisy")
    ref = failure.Reference("model-diagnosis (noisy collection)", df, "resnet18", "cifar10", None)
    cell = Cell(width=16, batch_size=128, lr=0.1, weight_decay=5e-4, train_fraction=0.5, label_noise=0.1)
    rows = one_cell(df, 16, 128, 0.5)
    got = failure.answer(ref, rows, cell, (0, 1))
    for question in failure.QUESTIONS:
        want = fit_diagnoser(df, question).predict(df).loc[(16, 128, 0.5)]  # the cell among its neighbours
        assert got.answers[question] == want and got.rules[question]
    at = md.labels(df).loc[(16, 128, 0.5)]
    assert got.nearest == (16, 128, 0.5)
    assert got.room == {c: at[column] for c, column in failure.CHANGES.items()}
    assert got.change == failure.choose_change(got.answers, got.room) and got.change in got.summary()
    assert got.phase in phases.PHASES


def test_the_change_named():
    room = {"width up": 3.0, "more data": 5.0, "batch size up": 1.0, "batch size down": 0.0}
    assert failure.choose_change({"temperature": "large", "width_vs_temperature": "width",
                                  "data_vs_temperature": "data"}, room) == "more data"
    assert failure.choose_change({"temperature": "large", "width_vs_temperature": "width",
                                  "data_vs_temperature": "batch"}, room) == "width up"
    assert failure.choose_change({"temperature": "small", "width_vs_temperature": "batch"}, room) == "batch size down"
    assert failure.choose_change({"width_vs_temperature": "batch"}, room) == "batch size up"
    assert failure.choose_change({}, room) == ""


def test_nearest_grid_value_and_the_curve_peak():
    assert failure.nearest([16, 23, 32], 20, log=True) == 23  # |ln 23 - ln 20| < |ln 20 - ln 16|
    assert failure.nearest([0.4, 0.5, 0.6], 0.52, log=False) == 0.5
    df = md.load_model_diagnosis("clean")
    base = one_cell(df, 4, 64, 1.0).iloc[[0]]
    errs = [10.0, 30.0, 42.0, 25.0, 70.0]  # the endpoint at t = 1 is not an interior point
    curve = pd.concat([base.assign(source="curve", metric="err", split="train", coord=t, value=e, seed=0, seed_b=1)
                       for t, e in zip((0, 0.25, 0.5, 0.75, 1), errs)], ignore_index=True)
    peak = failure.peak_rows(curve)
    assert list(peak["metric"]) == ["err_peak"] and list(peak["value"]) == [42.0]


def test_differences_from_the_reference_are_named(tmp_path):
    cell = Cell(width=200, batch_size=128, lr=0.05, weight_decay=5e-4, train_fraction=1.0, label_noise=0.0)
    ref = failure.model_diagnosis_reference(cell, (0, 1), "svhn", tmp_path)
    assert ref.study.spec.metrics == failure.REFERENCE_METRICS and ref.study.spec.dataset == "svhn"
    assert ref.study.spec.metric_options["hessian"]["trace_rule"] == "change"
    notes = failure.differences(ref, cell, "svhn", md.labels(ref.table))
    assert any("data (svhn) differs from the reference's (cifar10)" in n for n in notes)
    assert any(n.startswith("lr 0.05 differs") for n in notes)
    assert any(n.startswith("width 200 lies outside the reference's range 2-128") for n in notes)
    assert not list(tmp_path.iterdir())


def test_diagnose_with_a_study_names_the_failure_source(finished, capsys):
    cell = finished.spec.cells()[1]
    paths = seed_paths(finished, cell)
    before = files_under(finished.layout.root)
    assert main(["diagnose", *paths, "--study", str(finished.layout.exp_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"failure source (reference: study '{finished.spec.name}')" in printed and "\nchange: " in printed
    assert "data_vs_temperature not asked: study 'tiny' varies no train fraction" in printed
    assert files_under(finished.layout.root) == before
    ref = failure.study_reference(finished)
    labels = md.labels(ref.table)
    got = failure.diagnose_failure(paths, finished)
    assert got.room == {c: labels.loc[(cell.width, cell.batch_size, cell.train_fraction)][column]
                        for c, column in failure.CHANGES.items()}


def resnet_checkpoints(folder, cell):
    model_args = families.model_args("resnet18", cell.width, (3, 32, 32), 10)
    paths = []
    for seed in (0, 1):
        model = families.create("resnet18", cell.width, (3, 32, 32), 10)
        paths.append(folder / f"seed{seed}.pt")
        checkpoints.save(paths[-1], {"model": model.state_dict(), "model_args": model_args, "cell": cell.as_dict(),
                                     "seed": seed, "epoch": 1, "status": "ok"})
    return [str(p) for p in paths]


def test_diagnose_with_the_published_reference(tmp_path, monkeypatch, capsys):
    """The command's path with --reference model-diagnosis, the measurement replaced by the noisy
    collection's own rows at the models' cell (measuring ResNet18 on CIFAR-10 is out of a unit test's reach)."""
    from phasediagram.analysis.diagnoser import fit_diagnoser

    noisy = md.load_model_diagnosis("noisy")
    cell = Cell(width=2, batch_size=128, lr=0.1, weight_decay=5e-4, train_fraction=0.5, label_noise=0.1)
    paths = resnet_checkpoints(tmp_path, cell)
    asked = []

    def measure_models(spec, layout, at, loaded, ckpts, stages, device):
        asked.append((spec.arch, spec.dataset, spec.data_root, tuple(stages), dict(spec.metric_options["hessian"]), at,
                      tuple(loaded)))
        return one_cell(noisy, 2, 128, 0.5)

    monkeypatch.setattr(failure, "measure_models", measure_models)
    before = files_under(tmp_path)
    assert main(["diagnose", *paths, "--reference", "model-diagnosis", "--root", str(tmp_path), "--data-root",
                 str(tmp_path / "cifar")]) == 0
    printed = capsys.readouterr().out
    assert asked == [("resnet18", "cifar10", str(tmp_path / "cifar"), failure.REFERENCE_METRICS,
                      PRESET_SPECS["reference"]["metric_options"]["hessian"], cell, (0, 1))]
    assert "failure source (reference: model-diagnosis (noisy collection))" in printed
    got = failure.diagnose_failure(paths, "model-diagnosis", tmp_path)
    for question in failure.QUESTIONS:
        assert got.answers[question] == fit_diagnoser(noisy, question).predict(noisy).loc[(2, 128, 0.5)]
        assert f"  {question}: {got.answers[question]}" in printed
    assert f"change: {got.change}, expected room for improvement" in printed and got.notes == []
    assert files_under(tmp_path) == before
    other = replace(cell, lr=0.05, label_noise=0.0)
    (tmp_path / "other").mkdir()
    monkeypatch.setattr(failure, "measure_models", lambda *a: one_cell(noisy, 2, 128, 0.5).assign(lr=0.05, label_noise=0.0))
    got = failure.diagnose_failure(resnet_checkpoints(tmp_path / "other", other), "model-diagnosis", tmp_path,
                                   dataset="svhn")
    assert got.reference == "model-diagnosis (clean collection)"
    assert [n.split(" (")[0] for n in got.notes] == ["the models' data", "lr 0.05 differs from the reference's"]


def test_one_checkpoint_gets_its_phase_diagnosis_and_no_question(finished, capsys):
    paths = seed_paths(finished, finished.spec.cells()[0])[:1]
    assert main(["diagnose", *paths, "--study", str(finished.layout.exp_dir)]) == 0
    printed = capsys.readouterr().out
    assert "second seed" in printed and "note: no question asked: the diagnosers read the models' full phase" in printed


@pytest.mark.parametrize("extra, words", [
    (["--reference", "nowhere"], "unknown reference 'nowhere'"),
    (["--reference", "model-diagnosis"], "holds a mlp model"),
    (["--reference", "model-diagnosis", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--reference", "model-diagnosis", "--figure", "x.png"], "--figure draws a study's phase map"),
    (["--study", "STUDY", "--question", "data_vs_temperature"], "data_vs_temperature: study 'tiny' varies no train"),
    (["--study", "STUDY", "--question", "colour"], "unknown question 'colour'"),
    (["--study", "STUDY", "--dataset", "cifar10"], "--dataset and --data-root go with --reference"),
    (["--study", "STUDY", "--data-root", "x"], "--dataset and --data-root go with --reference"),
    (["--study", "STUDY", "--reference", "model-diagnosis"], "give the study as"),
])
def test_diagnose_refusals_one_line_exit_2_nothing_written(finished, tmp_path, capsys, extra, words):
    paths = seed_paths(finished, finished.spec.cells()[0])
    extra = [str(finished.layout.exp_dir) if e == "STUDY" else e for e in extra]
    before = files_under(finished.layout.root), files_under(tmp_path)
    assert main(["diagnose", *paths, *extra, "--root", str(tmp_path)] if "--study" not in extra
                else ["diagnose", *paths, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and words in captured.err, captured.err
    assert (files_under(finished.layout.root), files_under(tmp_path)) == before
