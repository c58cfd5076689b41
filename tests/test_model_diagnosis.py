"""The Model-Diagnosis importer: values against the CSV read independently, labels, refusals, the figure."""

from __future__ import annotations

import csv
import math
import random
import shutil

import numpy as np
import pandas as pd
import pytest

import phasediagram
from phasediagram.analysis import correlations, improvement, phases, table
from phasediagram.analysis import model_diagnosis as md
from phasediagram.analysis.small_multiples import phase_small_multiples
from phasediagram.errors import SpecError

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
