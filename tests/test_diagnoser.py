"""fit_diagnoser: the hand-written tree against scikit-learn's, the benchmark's protocol on synthetic
collections with a known answer, the API (index, answers, label rows never read) and refusals."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.tree import DecisionTreeClassifier

import phasediagram
from phasediagram.analysis import decision_tree
from phasediagram.analysis.diagnoser import QUESTIONS, fit_diagnoser
from phasediagram.analysis.model_diagnosis import load_model_diagnosis
from phasediagram.errors import SpecError

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = (2, 4, 8, 16)
BATCHES = (16, 32, 64, 128, 256)
FRACTIONS = (1, 2, 3)  # tenths of the training set


def bench():
    spec = importlib.util.spec_from_file_location("bench_diagnose", ROOT / "bench" / "bench_diagnose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collection(path: Path, noisy: bool) -> pd.DataFrame:
    """A synthetic collection in the published CSV format whose answers follow one quantity each:
    temperature "large" exactly where mc > 1 (batch 16, 32), "optimal" at batch 64, "small" above;
    "width" exactly for the two narrower widths (whose train loss is higher), "batch" for the wider.
    The noisy one shifts every raw value (higher losses and mc), as label noise does."""
    rows = []
    for w in WIDTHS:
        for b in BATCHES:
            for d in FRACTIONS:
                hot = b <= 32
                loss = (0.04 / w + 0.0005 * d) * (1.2 if noisy else 1.0)
                temp = "large" if hot else "optimal" if b == 64 else "small"
                rows.append({"data_amount": 5000 * d, "para_amount": 3000 * w * w, "log_data_amount": 0.0,
                             "log_para_amount": 0.0, "log_bs": np.log(b), "width": w, "data": d, "bs": b,
                             "test_acc": 80.0 - 10 / w - (5 if noisy else 0), "train_acc": 99.0, "generalization_gap": 0,
                             "test_loss": 0.6 + loss, "train_loss": loss, "CKA": 0.5, "hessian_e": 1.0, "hessian_t": 3.0,
                             "mode_connectivity": (8.0 if noisy else 5.0) if hot else 0.0,
                             "mode_connectivity_peak": -5.0, "test_error": 0, "train_error": 1.0, "rfi_width": 0,
                             "rfi_data": 0, "rfi_inc_temp": 0, "rfi_dec_temp": 0, "bs_failure": temp,
                             "width_vs_batch": "width" if w <= 4 else "batch", "data_vs_batch": "batch"})
    name = "dataframe_noise_public.csv" if noisy else "dataframe_normal_public.csv"
    pd.DataFrame(rows).to_csv(path / name, index=False)
    return load_model_diagnosis(path / name)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    path = tmp_path_factory.mktemp("md")
    return {"clean": collection(path, False), "noisy": collection(path, True)}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_tree_matches_scikit_learn(depth):
    rng = np.random.default_rng(depth)
    X = rng.normal(size=(300, 4)).astype(np.float32).astype(float)  # scikit-learn's trees split float32 copies
    y = ((X[:, 0] > 0.3) ^ (X[:, 2] * X[:, 1] > 0.2)).astype(int)
    ours = decision_tree.fit_tree(X, y, depth)
    sk = DecisionTreeClassifier(criterion="gini", max_depth=depth, random_state=0).fit(X, y)
    grid = rng.normal(size=(2000, 4))
    np.testing.assert_array_equal(decision_tree.predict_tree(ours, X), sk.predict(X))
    np.testing.assert_array_equal(decision_tree.predict_tree(ours, grid), sk.predict(grid))
    assert ours.threshold == pytest.approx(sk.tree_.threshold[0], abs=1e-7)
    assert ours.feature == sk.tree_.feature[0]


def test_tree_recovers_a_threshold():
    x = np.linspace(0.0, 1.0, 101)
    X = np.column_stack([np.cos(7 * x), x])
    y = (x > 0.62).astype(int)
    tree = decision_tree.fit_tree(X, y, 2)
    assert tree.feature == 1 and 0.62 <= tree.threshold <= 0.63
    assert (decision_tree.predict_tree(tree, X) == y).all()
    assert decision_tree.render(tree, ["cos", "x"], ["no", "yes"])[0].startswith("if x <= 0.62")


def test_benchmark_protocol_recovers_the_known_answer(tables):
    b = bench()
    wides = {name: b.wide(df) for name, df in tables.items()}
    for direction in ("clean-to-noisy", "noisy-to-clean"):
        args = argparse.Namespace(seeds=[0, 1], train_size=None, direction=direction, max_images=5000,
                                  max_params=12000)
        for case in (1, 2, 3, 4, 5):
            result = b.run_case(case, tables, wides, args)
            assert result["scores"]["ours"] == pytest.approx(100.0, abs=1e-9), (direction, case, result["rule"])
            assert 0 <= result["scores"]["md"] <= 100 and 0 <= result["scores"]["hyper"] <= 100
    assert len(b.training_cells(wides["clean"], 3, 0, args)) == len(BATCHES) * len(FRACTIONS)  # width 2 only


def test_predict_index_answers_and_rule(tables):
    d = phasediagram.fit_diagnoser(tables["clean"], "temperature")
    answer = d.predict(tables["noisy"])
    assert list(answer.index.names) == ["width", "batch_size", "train_fraction"]
    assert len(answer) == len(WIDTHS) * len(BATCHES) * len(FRACTIONS)
    assert set(answer) == {"large", "small"}
    assert (answer.xs(16, level="batch_size") == "large").all() and (answer.xs(256, level="batch_size") == "small").all()
    assert "the phase is not II" in d.explain() and "raise the batch size" in d.explain()
    w = fit_diagnoser(tables["clean"], "width_vs_temperature")
    assert set(w.predict(tables["noisy"])) == {"width", "batch"}
    assert "rank of train loss among widths" in w.explain()


def test_predict_never_reads_label_rows(tables):
    d = fit_diagnoser(tables["clean"], "width_vs_temperature")
    noisy = tables["noisy"]
    labels = noisy["kind"] == "label"
    scrambled = noisy.copy()
    scrambled.loc[labels, "value"] = np.random.default_rng(0).permutation(noisy.loc[labels, "value"].to_numpy())
    expected = d.predict(noisy)
    pd.testing.assert_series_equal(d.predict(scrambled), expected)
    pd.testing.assert_series_equal(d.predict(noisy[~labels]), expected)


def test_refusals(tables):
    clean = tables["clean"]
    with pytest.raises(SpecError, match="unknown question 'batch'"):
        fit_diagnoser(clean, "batch")
    with pytest.raises(SpecError, match="no 'bs_failure' labels"):
        fit_diagnoser(clean[clean["kind"] != "label"], "temperature")
    with pytest.raises(SpecError, match="only 'batch'"):
        fit_diagnoser(clean, "data_vs_temperature")
    broken = clean.copy()
    broken.loc[broken.index[(broken["metric"] == "mc")][0], "value"] = np.nan
    with pytest.raises(SpecError, match="no full phase") as exc:
        fit_diagnoser(broken, "temperature")
    assert "\n" not in str(exc.value)
    no_loss = clean[~((clean["metric"] == "loss") & (clean["split"] == "train"))]
    with pytest.raises(SpecError, match="no full phase"):
        fit_diagnoser(clean, "temperature").predict(no_loss)
    both = pd.concat([clean, tables["noisy"]], ignore_index=True)
    d = fit_diagnoser(both, "temperature")  # fitting on both collections is fine
    with pytest.raises(SpecError, match="several cells"):
        d.predict(both)
    assert set(QUESTIONS) == {"temperature", "width_vs_temperature", "data_vs_temperature"}
