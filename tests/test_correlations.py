"""Rank correlations: known monotone relations, the granulated Kendall coefficient by hand, outputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from phasediagram.analysis import correlations as C
from phasediagram.analysis.table import COLUMNS, normalise
from phasediagram.spec.experiment import Cell

from .test_phases import synthetic_table


def table_from(values: dict[tuple[int, int], dict[str, float]]) -> pd.DataFrame:
    """A one-seed table: {(width, batch size): {quantity: value}}; 'acc'/'train_acc' are accuracies."""
    rows = []
    for (w, bs), v in values.items():
        cell = Cell(width=w, batch_size=bs, lr=0.1, weight_decay=0.0)
        for q, x in v.items():
            source, split, metric = {"acc": ("loss_acc", "test", "acc"), "train_acc": ("loss_acc", "train", "acc")
                                     }.get(q, ("m", "train", q))
            rows.append({"experiment": "c", "cell": cell.id, **cell.as_dict(), "seed": 0, "seed_b": None,
                         "split": split, "metric": metric, "coord": None, "value": x, "status": "ok",
                         "source": source})
    return normalise(pd.DataFrame(rows, columns=COLUMNS))


def monotone_table():
    """4 x 3 cells, test acc all distinct; up = exp(acc) (tau 1), down = -acc^3 (tau -1), gap = 100 - 2 acc."""
    rng = np.random.default_rng(0)
    accs = rng.permutation(np.linspace(50, 90, 12))
    cells = [(w, bs) for w in (1, 2, 4, 8) for bs in (16, 64, 256)]
    return table_from({c: {"acc": a, "train_acc": 100 - a, "up": math.exp(a / 10), "down": -a ** 3,
                           "noise": float(rng.normal())} for c, a in zip(cells, accs)})


def test_monotone_relations_give_plus_and_minus_one():
    res = C.correlations(monotone_table(), min_cells=3)
    allc = res[res.group == "all"].set_index(["quantity", "target"])
    for q, sign in (("up (train)", 1), ("down (train)", -1)):
        row = allc.loc[(q, "test_acc")]
        assert row.n == 12
        assert row.kendall_tau == pytest.approx(sign) and row.spearman_rho == pytest.approx(sign)
        assert row.granulated_kendall == pytest.approx(sign)
        assert set(row.granulated_axes.split(";")) == {f"width={sign:.4g}", f"batch_size={sign:.4g}"}
        gap = allc.loc[(q, "gap")]  # gap = train acc - test acc = 100 - 2 acc: the order reversed
        assert gap.kendall_tau == pytest.approx(-sign) and gap.spearman_rho == pytest.approx(-sign)
    assert abs(allc.loc[("noise (train)", "test_acc")].kendall_tau) < 0.5
    assert ("acc (test)", "test_acc") not in allc.index  # the target is not correlated with itself
    assert allc.loc[("acc (test)", "gap")].kendall_tau == pytest.approx(-1)


def test_granulated_kendall_against_a_hand_computation():
    # widths 1, 2, 3 x batch sizes 10, 20; metric q against test accuracy g:
    #   bs 10: g = 1 2 3, q = 1 2 3 -> tau along width 1
    #   bs 20: g = 4 5 6, q = 5 4 6 -> pairs (-, +, +): tau 1/3
    #   along batch size every width has g and q rising: tau 1, 1, 1
    # psi_width = (1 + 1/3) / 2 = 2/3, psi_bs = 1, Psi = 5/6; over all 6 cells 14 of 15 pairs agree: 13/15.
    g = {(1, 10): 1, (2, 10): 2, (3, 10): 3, (1, 20): 4, (2, 20): 5, (3, 20): 6}
    q = {(1, 10): 1, (2, 10): 2, (3, 10): 3, (1, 20): 5, (2, 20): 4, (3, 20): 6}
    df = table_from({c: {"acc": float(g[c]), "q": float(q[c])} for c in g})
    cells, names = C.cell_table(df)
    psi, per_axis = C.granulated_kendall(cells, "q (train)", "test_acc")
    assert per_axis == pytest.approx({"width": 2 / 3, "batch_size": 1.0})
    assert psi == pytest.approx(5 / 6)
    res = C.correlations(df, min_cells=3).set_index(["quantity", "target", "group"])
    row = res.loc[("q (train)", "test_acc", "all")]
    assert row.kendall_tau == pytest.approx(13 / 15) and row.granulated_kendall == pytest.approx(5 / 6)
    assert row.spearman_rho == pytest.approx(1 - 6 * 2 / (6 * 35))  # ranks differ by 1 at two cells


def test_slices_without_a_tau_are_left_out_of_the_granulated_mean():
    g = {(1, 10): 1.0, (2, 10): 2.0, (1, 20): 3.0, (2, 20): 4.0, (3, 20): 5.0}
    q = {(1, 10): 1.0, (2, 10): 1.0, (1, 20): 1.0, (2, 20): 2.0, (3, 20): 3.0}  # constant along bs 10
    cells, _ = C.cell_table(table_from({c: {"acc": g[c], "q": q[c]} for c in g}))
    psi, per_axis = C.granulated_kendall(cells, "q (train)", "test_acc")
    # width: bs 10 constant q (no tau), bs 20 tau 1 -> 1; bs: width 1 constant q, width 2 tau 1, width 3 one cell.
    assert per_axis == pytest.approx({"width": 1.0, "batch_size": 1.0}) and psi == pytest.approx(1.0)


def test_per_phase_groups_and_minimum_cells():
    res = C.correlations(synthetic_table(), min_cells=3)
    groups = set(res.group)
    assert groups == {"all", "I", "II", "III", "IV-A", "IV-B"}
    mc = res[(res.quantity == "mc (train)") & (res.target == "test_acc")].set_index("group")
    assert mc.loc["all", "n"] == 16 and mc.loc["I", "n"] == 5 and mc.loc["III", "n"] == 2
    assert math.isnan(mc.loc["III", "kendall_tau"])  # 2 cells < min_cells
    assert mc.loc["all", "kendall_tau"] > 0.3  # mc rises with accuracy across the phases
    assert mc.loc[mc.index != "all", "granulated_kendall"].isna().all()
    quantities = set(res.quantity)
    assert {"loss (train)", "top_eigenvalue (train)", "trace (train)", "cka_softmax (train)", "dist"} <= quantities
    assert not any(q.startswith(("epochs", "err", "phase")) for q in quantities)  # bookkeeping, curves, phases


def test_csv_markdown_and_bar_chart(tmp_path):
    res = C.correlations(synthetic_table())
    paths = C.write(res, tmp_path / "corr", formats=("png",), dpi=50)
    assert [p.name for p in paths] == ["corr.csv", "corr.md", "corr.png"]
    back = pd.read_csv(paths[0])
    assert list(back.columns) == C.RESULT_COLUMNS and len(back) == len(res)
    md = paths[1].read_text()
    assert "### Correlation with test accuracy" in md and "### Correlation with the generalisation gap" in md
    header = next(line for line in md.splitlines() if line.startswith("| quantity"))
    assert header.split(" | ")[1:5] == ["n", "tau", "rho", "Psi"] and "tau IV-B" in header
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    summary = C.summary(res)
    assert list(summary.columns[:5]) == ["quantity", "n", "tau", "rho", "Psi"]


def test_markdown_formatting():
    frame = pd.DataFrame({"name": ["a", "b"], "x": [0.12345, math.nan]})
    assert C.to_markdown(frame, 2) == "| name | x |\n| --- | ---: |\n| a | 0.12 |\n| b |  |\n"
    empty = C.correlations(synthetic_table().iloc[:0])
    assert empty.empty and "No correlations" in C.markdown(empty)


def test_only_measurements_are_correlated():
    """Standard errors and run diagnostics (here the Hessian's product count and its trace's standard error,
    as the registry declares them) stay in the table, marked by `kind`, but are not ranked."""
    base = monotone_table()
    extra = base[(base.metric == "up")].assign(source="hessian")
    rows = pd.concat([extra.assign(metric=m, kind=None) for m in ("hvp_trace", "trace_stderr", "trace_hutchpp")])
    df = normalise(pd.concat([base, rows], ignore_index=True))
    kinds = df.drop_duplicates("metric").set_index("metric")["kind"]
    assert (kinds["hvp_trace"], kinds["trace_stderr"], kinds["trace_hutchpp"], kinds["up"]) == \
        ("diagnostic", "stderr", "value", "value")
    ranked = set(C.correlations(df, min_cells=3)["metric"])
    assert "trace_hutchpp" in ranked and "up" in ranked
    assert not ranked & {"hvp_trace", "trace_stderr"}
