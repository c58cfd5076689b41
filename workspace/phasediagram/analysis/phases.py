"""Classify every cell of a study into the phases I, II, III, IV-A, IV-B of Yang et al. (2021).

The phases cross a global property (mode connectivity mc, in error percent) with a local one
(sharp: a high training loss, optionally a large top Hessian eigenvalue), and split the well
connected, flat phase by the similarity of the trained models (CKA):

    I     poorly connected, sharp     under-parameterised and cold
    II    mc above the endpoints, or  hot (small batch): the endpoints are not minima
          well connected and sharp
    III   poorly connected, flat
    IV-A  well connected, flat, dissimilar (CKA < cka_threshold)
    IV-B  well connected, flat, similar (CKA >= cka_threshold): the best test accuracy

The rule, applied to the cell means over seeds (and seed pairs), with every threshold a field
of :class:`PhaseRule`::

    connectivity = "above" if mc > mc_above                    (default 1  %)
                   "poor"  if mc < -mc_barrier                  (default 1  %)
                   "well"  otherwise
    sharp        = train loss > loss_threshold                  (default 0.05)
                   or top Hessian eigenvalue > hessian_threshold (default None: not used)
    phase        = II    if connectivity == "above"
                   I     if poor and sharp;   III if poor and flat
                   II    if well and sharp
                   IV-B  if well and flat and CKA >= cka_threshold (default 0.7), else IV-A

Defaults reproduce the reference study's hand-drawn partition of ResNet18 / CIFAR-10
(../DESIGN.md); CKA is the softmax-output CKA (``cka_softmax``), the quantity the reference
notebook plots (its colour range 0.3-0.8 straddles 0.7; the logits' CKA exceeds 0.7 almost
everywhere). On the published archive (:mod:`.reference`) the defaults give, of 210 cells,
I 63, II 46, III 34, IV-A 41, IV-B 26: I at widths 1-4, II at batch sizes <= 32, III at widths
4-16 with large batches, IV-B around batch 44-256 at widths >= 23 (holding the best test
accuracy) and IV-A below and beside it.

Fallbacks when an input is missing for a cell (each recorded in the ``note`` column):

- no training loss: sharpness comes from the top Hessian eigenvalue if `hessian_threshold` is
  set, otherwise it is unknown;
- no ``cka_softmax``: ``cka_logits`` is used; no CKA at all: the phase is ``IV`` (not split);
- no ``top_eigenvalue`` (e.g. a published table holding power iteration's largest-magnitude
  eigenvalue): ``top_abs_eigenvalue`` serves for `hessian_threshold`;
- unknown sharpness: a poorly connected cell is ``I/III``, a well connected one ``II/IV``;
- no mc: the cell is not classified (phase ``""``); so is a cell whose runs all diverged.

Storage: :func:`classify` returns one row per cell (the cell columns, the inputs, the derived
flags, ``phase`` and ``note``); :func:`phase_rows` turns that into tidy table rows with
``source == metric == "phase"``, split ``-``, no seed, status ``ok`` and ``value`` the phase's
index in :data:`PHASES` + :data:`PARTIAL` (1 = I ... 5 = IV-B, 6 = IV, 7 = I/III, 8 = II/IV); a
cell that could not be classified gets no phase row (so a table without mc is left unchanged).
:func:`with_phases` replaces a table's phase rows by fresh ones and :func:`read_phases` reads
them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from phasediagram.analysis.table import COLUMNS, measurements, normalise

PHASES = ("I", "II", "III", "IV-A", "IV-B")
PARTIAL = ("IV", "I/III", "II/IV")
PHASE_CODES = {p: i + 1 for i, p in enumerate(PHASES + PARTIAL)}
PHASE_COLORS = {"I": "#d62728", "II": "#ff7f0e", "III": "#9467bd", "IV-A": "#17becf", "IV-B": "#2ca02c",
                "IV": "#98df8a", "I/III": "#c5b0d5", "II/IV": "#ffbb78"}
CELL_COLUMNS = ["experiment", "cell", "width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise"]
PHASE_SOURCE = "phase"


@dataclass(frozen=True)
class PhaseRule:
    """The thresholds of the phase rule (see the module docstring); units are the table's.

    Attributes:
        mc_barrier: a cell is poorly connected if mc < -mc_barrier (error percent).
        mc_above: a cell is hot (phase II) if mc > mc_above (error percent).
        loss_threshold: a cell is sharp if its mean training loss exceeds this.
        hessian_threshold: if set, a cell is also sharp if its mean top Hessian eigenvalue
            exceeds this; it alone decides where the training loss is missing.
        cka_threshold: a well connected, flat cell is IV-B if its CKA is at least this.
        cka_quantity: the CKA quantity to split on; the other CKA quantity is the fallback.
    """

    mc_barrier: float = 1.0
    mc_above: float = 1.0
    loss_threshold: float = 0.05
    hessian_threshold: float | None = None
    cka_threshold: float = 0.7
    cka_quantity: str = "cka_softmax"

    def __post_init__(self):
        for name in ("mc_barrier", "mc_above", "loss_threshold"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"PhaseRule.{name} must be a finite number >= 0, got {v!r}")
        if self.hessian_threshold is not None and not self.hessian_threshold > 0:
            raise ValueError(f"PhaseRule.hessian_threshold must be None or > 0, got {self.hessian_threshold!r}")
        if not 0 <= self.cka_threshold <= 1:
            raise ValueError(f"PhaseRule.cka_threshold must lie in [0, 1], got {self.cka_threshold!r}")
        if self.cka_quantity not in ("cka_softmax", "cka_logits"):
            raise ValueError(f"PhaseRule.cka_quantity must be 'cka_softmax' or 'cka_logits', got {self.cka_quantity!r}")


KEY = ["experiment", "cell"]


def _means(df: pd.DataFrame, cell_rows: pd.DataFrame, metric: str, split: str) -> np.ndarray:
    """Mean over seeds (and pairs) of one scalar quantity for each row of `cell_rows` (NaN if none)."""
    sel = measurements(df)
    sel = sel[(sel["metric"] == metric) & (sel["split"] == split) & (sel["status"] == "ok") & sel["coord"].isna()]
    means = sel.groupby(KEY)["value"].mean().rename("mean").reset_index()
    return cell_rows[KEY].merge(means, on=KEY, how="left")["mean"].to_numpy(float)


def cells(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with its axis values, in the table's sort order."""
    return df[CELL_COLUMNS].drop_duplicates(KEY).reset_index(drop=True)


def _all_diverged(df: pd.DataFrame) -> set[tuple]:
    """(experiment, cell) of every cell whose every training run (source 'train') diverged."""
    train = df[df["source"] == "train"]
    if train.empty:
        return set()
    per_seed = train.groupby([*KEY, "seed"])["status"].agg(lambda s: (s == "diverged").any())
    return set(per_seed.groupby(level=KEY).all().loc[lambda s: s].index)


def decide(loss: float, mc: float, top_eig: float, cka: float, rule: PhaseRule) -> tuple[str, str, str, str]:
    """(phase, connectivity, sharpness, note) of one cell from its mean inputs (NaN = missing)."""
    notes = []
    if np.isnan(mc):
        return "", "", "", "no mode connectivity (mc)"
    connectivity = "above" if mc > rule.mc_above else "poor" if mc < -rule.mc_barrier else "well"
    use_hessian = rule.hessian_threshold is not None and not np.isnan(top_eig)
    if not np.isnan(loss):
        sharp = loss > rule.loss_threshold or (use_hessian and top_eig > rule.hessian_threshold)
        sharpness = "sharp" if sharp else "flat"
    elif use_hessian:
        sharpness = "sharp" if top_eig > rule.hessian_threshold else "flat"
        notes.append("sharpness from the Hessian (no training loss)")
    else:
        sharpness = ""
        notes.append("sharpness unknown (no training loss)")
    if connectivity == "above":
        return "II", connectivity, sharpness, "; ".join(notes)
    if connectivity == "poor":
        phase = {"sharp": "I", "flat": "III"}.get(sharpness, "I/III")
    elif sharpness == "sharp":
        phase = "II"
    elif sharpness == "":
        phase = "II/IV"
    elif np.isnan(cka):
        phase = "IV"
        notes.append("IV not split (no CKA)")
    else:
        phase = "IV-B" if cka >= rule.cka_threshold else "IV-A"
    return phase, connectivity, sharpness, "; ".join(notes)


def classify(df: pd.DataFrame, rule: PhaseRule | None = None) -> pd.DataFrame:
    """One row per cell: cell columns, the mean inputs, connectivity, sharpness, phase and note."""
    rule = rule or PhaseRule()
    out = cells(df)
    if out.empty:
        return out.assign(train_loss=[], mc=[], top_eigenvalue=[], cka=[], connectivity=[], sharpness=[], phase=[],
                          note=[])
    loss = _means(df, out, "loss", "train")
    mc = _means(df, out, "mc", "train")
    eig = _means(df, out, "top_eigenvalue", "train")
    eig = np.where(np.isnan(eig), _means(df, out, "top_abs_eigenvalue", "train"), eig)
    fallback = "cka_logits" if rule.cka_quantity == "cka_softmax" else "cka_softmax"
    cka_main = _means(df, out, rule.cka_quantity, "train")
    cka = np.where(np.isnan(cka_main), _means(df, out, fallback, "train"), cka_main)
    diverged = _all_diverged(df)
    decided = []
    for i, key in enumerate(zip(out["experiment"], out["cell"])):
        if key in diverged:
            decided.append(("", "", "", "all runs diverged"))
            continue
        phase, conn, sharp, note = decide(loss[i], mc[i], eig[i], cka[i], rule)
        if phase.startswith("IV-") and np.isnan(cka_main[i]):
            note = "; ".join(filter(None, [note, f"CKA from {fallback}"]))
        decided.append((phase, conn, sharp, note))
    phase, conn, sharp, note = zip(*decided)
    return out.assign(train_loss=loss, mc=mc, top_eigenvalue=eig, cka=cka, connectivity=list(conn),
                      sharpness=list(sharp), phase=list(phase), note=list(note))


def phase_rows(phases: pd.DataFrame) -> pd.DataFrame:
    """Tidy table rows (source = metric = 'phase', split '-') holding each cell's phase code."""
    rows = []
    for rec in phases.to_dict("records"):
        if rec["phase"] in PHASE_CODES:
            rows.append({**{c: rec[c] for c in CELL_COLUMNS}, "seed": None, "seed_b": None, "split": "-",
                         "metric": PHASE_SOURCE, "coord": None, "value": float(PHASE_CODES[rec["phase"]]),
                         "status": "ok", "source": PHASE_SOURCE, "kind": "value"})
    return pd.DataFrame(rows, columns=COLUMNS)


def with_phases(df: pd.DataFrame, rule: PhaseRule | None = None) -> pd.DataFrame:
    """The table with its phase rows replaced by freshly classified ones."""
    base = df[df["source"] != PHASE_SOURCE]
    new = phase_rows(classify(base, rule))
    frames = [f for f in (base, new) if not f.empty]
    return normalise(pd.concat(frames, ignore_index=True)) if frames else df


def read_phases(df: pd.DataFrame) -> pd.DataFrame:
    """The cell columns and `phase` (a label) of the phase rows written by :func:`with_phases`."""
    sel = df[(df["source"] == PHASE_SOURCE) & (df["status"] == "ok")]
    names = {v: k for k, v in PHASE_CODES.items()}
    labels = [names.get(int(v), "") if np.isfinite(v) else "" for v in sel["value"].astype(float)]
    return sel[CELL_COLUMNS].assign(phase=labels).reset_index(drop=True)


def counts(phases: pd.DataFrame) -> dict[str, int]:
    """Number of cells per phase label: all five phases, then partial labels and "unclassified" when present."""
    got = phases["phase"].value_counts().to_dict()
    return {p: int(got.get(p, 0)) for p in PHASES} | {(p or "unclassified"): int(n) for p, n in got.items()
                                                       if p not in PHASES}

