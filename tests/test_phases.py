"""Phase classification: every branch of the rule, its thresholds, fallbacks and storage in the table.

`synthetic_table` (also used by the plot, correlation and notebook tests) builds a tidy table on
a 4 x 4 grid whose phases are known by construction (`KNOWN`).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from phasediagram.analysis import phases
from phasediagram.analysis.phases import PhaseRule, classify, decide
from phasediagram.analysis.table import COLUMNS, normalise
from phasediagram.spec.experiment import Cell

WIDTHS = (2, 4, 8, 16)
BATCH_SIZES = (16, 64, 256, 1024)
KNOWN = {  # batch size -> phases along the widths
    16: ("I", "II", "II", "II"),
    64: ("I", "I", "IV-B", "IV-B"),
    256: ("I", "III", "IV-B", "IV-A"),
    1024: ("I", "III", "IV-A", "IV-A"),
}
# Per-phase cell means: training loss, mc (error %), top eigenvalue, Hessian trace, CKA (softmax), test acc.
TYPICAL = {
    "I": dict(loss=1.0, mc=-10.0, top_eigenvalue=300.0, trace=3000.0, cka=0.40, acc=50.0),
    "II": dict(loss=0.3, mc=5.0, top_eigenvalue=50.0, trace=500.0, cka=0.50, acc=70.0),
    "III": dict(loss=0.01, mc=-5.0, top_eigenvalue=20.0, trace=200.0, cka=0.45, acc=75.0),
    "IV-A": dict(loss=0.002, mc=-0.2, top_eigenvalue=5.0, trace=50.0, cka=0.60, acc=85.0),
    "IV-B": dict(loss=0.001, mc=0.1, top_eigenvalue=2.0, trace=20.0, cka=0.80, acc=90.0),
}


def rows_for(cell: Cell, seeds, v: dict, experiment="synthetic", spread=0.01) -> list[dict]:
    """Rows of one cell whose means over seeds (pairs) are exactly the values in `v`."""
    out = []
    signs = [(-1) ** k for k in range(len(seeds))] if len(seeds) % 2 == 0 else [0] * len(seeds)

    def row(seed, seed_b, split, metric, value, source, status="ok", coord=None):
        out.append({"experiment": experiment, "cell": cell.id, **cell.as_dict(), "seed": seed, "seed_b": seed_b,
                    "split": split, "metric": metric, "coord": coord, "value": value, "status": status,
                    "source": source})

    for s, sign in zip(seeds, signs):
        f = 1 + sign * spread
        row(s, None, "train", "epochs", 10.0, "train")
        if "loss" in v:
            row(s, None, "train", "loss", v["loss"] * f, "loss_acc")
            row(s, None, "train", "acc", min(100.0, v["acc"] + 8 - 2 * v["loss"]) * f, "loss_acc")
            row(s, None, "test", "loss", (2 - v["acc"] / 50) * f, "loss_acc")
        if "acc" in v:
            row(s, None, "test", "acc", v["acc"] * f, "loss_acc")
        for q in ("top_eigenvalue", "trace"):
            if q in v:
                row(s, None, "train", q, v[q] * f, "hessian")
    pair = (seeds[0], seeds[1]) if len(seeds) > 1 else (seeds[0], seeds[0])
    if "mc" in v:
        row(*pair, "train", "mc", v["mc"], "curve")
        for t in (0.0, 0.5, 1.0):
            row(*pair, "train", "err", 10.0 - v["mc"] * (t == 0.5), "curve", coord=t)
    if "cka" in v:
        row(*pair, "train", "cka_softmax", v["cka"], "CKA")
    if "cka_logits" in v:
        row(*pair, "train", "cka_logits", v["cka_logits"], "CKA")
    if "dist" in v:
        row(*pair, "-", "dist", v["dist"], "dist")
    return out


def synthetic_table(known=None, drop=(), seeds=(0, 1), lr=0.1, experiment="synthetic") -> pd.DataFrame:
    """A table over WIDTHS x BATCH_SIZES with the phases of `known` (default KNOWN).

    Within a phase, test accuracy grows slightly with width and falls with batch size (no ties);
    `drop` lists quantities to leave out everywhere.
    """
    known = known or KNOWN
    rows = []
    for i, bs in enumerate(sorted(known)):
        for j, (w, ph) in enumerate(zip(WIDTHS, known[bs])):
            v = dict(TYPICAL[ph])
            v["acc"] += 0.5 * j - 0.25 * i
            v["dist"] = 20.0 + 3 * j + i
            for q in drop:
                v.pop(q, None)
            rows += rows_for(Cell(width=w, batch_size=bs, lr=lr, weight_decay=5e-4), seeds, v, experiment)
    return normalise(pd.DataFrame(rows, columns=COLUMNS))


def phase_map(ph: pd.DataFrame) -> dict:
    grid = ph.pivot(index="batch_size", columns="width", values="phase")
    return {int(bs): tuple(grid.loc[bs]) for bs in grid.index}


def test_synthetic_grid_is_classified_as_constructed():
    ph = classify(synthetic_table())
    assert phase_map(ph) == KNOWN
    assert phases.counts(ph) == {"I": 5, "II": 3, "III": 2, "IV-A": 3, "IV-B": 3}
    assert (ph["note"] == "").all()
    row = ph[(ph.width == 16) & (ph.batch_size == 64)].iloc[0]
    assert row.train_loss == pytest.approx(0.001) and row.mc == pytest.approx(0.1) and row.cka == pytest.approx(0.8)
    assert (row.connectivity, row.sharpness) == ("well", "flat")


# (train loss, mc, CKA) -> phase, with the default thresholds: each branch and each boundary.
CASES = [
    ((1.0, -10.0, 0.5), "I"),        # poorly connected, sharp
    ((0.01, -10.0, 0.5), "III"),     # poorly connected, flat
    ((0.01, 5.0, 0.9), "II"),        # mc above the endpoints: II whatever else
    ((1.0, 5.0, 0.9), "II"),
    ((0.3, 0.0, 0.9), "II"),         # well connected but sharp
    ((0.01, 0.0, 0.5), "IV-A"),
    ((0.01, 0.0, 0.9), "IV-B"),
    ((0.01, -1.0, 0.5), "IV-A"),     # mc = -1 is not a barrier (mc < -1 is)
    ((0.01, 1.0, 0.5), "IV-A"),      # mc = 1 is not above (mc > 1 is)
    ((0.05, 0.0, 0.5), "IV-A"),      # loss = 0.05 is flat (loss > 0.05 is sharp)
    ((0.0500001, 0.0, 0.5), "II"),
    ((0.01, 0.0, 0.7), "IV-B"),      # CKA = 0.7 is similar
    ((0.05, -1.0000001, 0.9), "III"),
]


@pytest.mark.parametrize("inputs,expected", CASES)
def test_rule_branches_and_boundaries(inputs, expected):
    loss, mc, cka = inputs
    assert decide(loss, mc, math.nan, cka, PhaseRule())[0] == expected


def test_thresholds_are_parameters():
    base = synthetic_table()
    loose = classify(base, PhaseRule(loss_threshold=0.5))  # phase II's loss 0.3 counts as flat now
    assert phase_map(loose)[16] == ("I", "II", "II", "II")  # still II: mc > 1
    assert phase_map(classify(base, PhaseRule(mc_above=10.0)))[16] == ("I", "II", "II", "II")  # sharp & well: II
    assert phase_map(classify(base, PhaseRule(mc_above=10.0, loss_threshold=0.5)))[16][1:] == ("IV-A",) * 3
    assert phase_map(classify(base, PhaseRule(cka_threshold=0.9)))[64] == ("I", "I", "IV-A", "IV-A")
    assert phase_map(classify(base, PhaseRule(cka_threshold=0.55)))[1024] == ("I", "III", "IV-B", "IV-B")
    assert phase_map(classify(base, PhaseRule(mc_barrier=6.0)))[256][1] == "IV-A"  # mc -5 no longer a barrier
    strict = classify(base, PhaseRule(hessian_threshold=10.0))  # III (eig 20) becomes sharp: I
    assert phase_map(strict)[256] == ("I", "I", "IV-B", "IV-A")


@pytest.mark.parametrize("bad", [dict(mc_barrier=-1), dict(loss_threshold=math.nan), dict(cka_threshold=1.5),
                                 dict(hessian_threshold=0.0), dict(cka_quantity="cka")])
def test_invalid_rule_is_refused(bad):
    with pytest.raises(ValueError, match="PhaseRule"):
        PhaseRule(**bad)


def test_means_over_seeds_decide_not_single_seeds():
    cell = Cell(width=8, batch_size=64, lr=0.1, weight_decay=5e-4)
    v = dict(TYPICAL["IV-B"], loss=0.04)
    df = normalise(pd.DataFrame(rows_for(cell, (0, 1), v, spread=0.5), columns=COLUMNS))  # seeds: 0.02 and 0.06
    assert set(df[(df.metric == "loss") & (df.split == "train")].value.round(3)) == {0.02, 0.06}
    assert classify(df)["phase"].tolist() == ["IV-B"]


def test_fallbacks_for_missing_inputs():
    no_cka = classify(synthetic_table(drop=("cka",)))
    assert phase_map(no_cka)[64] == ("I", "I", "IV", "IV")
    assert no_cka.loc[no_cka.phase == "IV", "note"].str.contains("no CKA").all()

    logits_only = synthetic_table(drop=("cka",))
    logits_only = pd.concat([logits_only, synthetic_table()[lambda d: d.metric == "cka_softmax"].assign(
        metric="cka_logits")], ignore_index=True)
    ph = classify(normalise(logits_only))
    assert phase_map(ph) == KNOWN
    assert ph.loc[ph.phase.str.startswith("IV-"), "note"].str.contains("cka_logits").all()

    no_loss = synthetic_table(drop=("loss",))
    unknown = classify(no_loss)
    assert phase_map(unknown)[256] == ("I/III", "I/III", "II/IV", "II/IV")
    assert phase_map(unknown)[16] == ("I/III", "II", "II", "II")  # mc > 1 needs no sharpness
    by_hessian = classify(no_loss, PhaseRule(hessian_threshold=30.0))
    assert phase_map(by_hessian) == KNOWN
    assert by_hessian["note"].str.contains("from the Hessian").all()

    no_mc = classify(synthetic_table(drop=("mc",)))
    assert (no_mc.phase == "").all() and no_mc.note.str.contains("no mode connectivity").all()
    assert phases.counts(no_mc) == {"I": 0, "II": 0, "III": 0, "IV-A": 0, "IV-B": 0, "unclassified": 16}
    assert phases.phase_rows(no_mc).empty


def test_cells_whose_runs_all_diverged_are_not_classified():
    df = synthetic_table()
    sel = (df.width == 16) & (df.batch_size == 1024)
    df.loc[sel & (df.source == "train"), "status"] = "diverged"
    ph = classify(df)
    row = ph[(ph.width == 16) & (ph.batch_size == 1024)].iloc[0]
    assert row.phase == "" and "diverged" in row.note
    df.loc[sel & (df.source == "train") & (df.seed == 0), "status"] = "ok"  # one seed survives: classified
    assert classify(df).set_index(["batch_size", "width"]).loc[(1024, 16), "phase"] == "IV-A"


def test_phases_are_written_into_the_table_as_tidy_rows():
    df = synthetic_table()
    out = phases.with_phases(df)
    rows = out[out.source == "phase"]
    assert len(rows) == 16 and (rows.metric == "phase").all() and (rows.split == "-").all()
    assert rows.seed.isna().all() and (rows.status == "ok").all()
    assert set(rows.value) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(out.columns) == set(COLUMNS) and len(out) == len(df) + 16
    back = phases.read_phases(out)
    assert phase_map(back) == KNOWN
    again = phases.with_phases(out)  # idempotent: old phase rows are replaced, not duplicated
    pd.testing.assert_frame_equal(again.reset_index(drop=True), out.reset_index(drop=True))
    other = phases.with_phases(out, PhaseRule(cka_threshold=0.9))
    assert phases.counts(phases.read_phases(other))["IV-B"] == 0


def test_empty_table():
    from phasediagram.analysis import table

    empty = table.empty()
    assert classify(empty).empty and phases.with_phases(empty).empty
    assert decide(math.nan, math.nan, math.nan, math.nan, PhaseRule())[0] == ""
