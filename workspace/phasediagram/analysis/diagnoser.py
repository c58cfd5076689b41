"""Learn which knob to turn from a table of measured cells: ``fit_diagnoser(table, question)``.

Three questions, each with the label rows (kind ``label``) it learns from, their two answers and
the knob they name (the labels of :mod:`.improvement`: the change with the most room for
improvement in test accuracy):

=========================  ================  ============================================================
question                   labels            answers
=========================  ================  ============================================================
``temperature``            ``bs_failure``    ``large`` (too hot: raise the batch size), ``small`` (lower it)
``width_vs_temperature``   ``width_vs_batch`` ``width`` (widen the model), ``batch`` (change the batch size)
``data_vs_temperature``    ``data_vs_batch``  ``data`` (train on more data), ``batch`` (change the batch size)
=========================  ================  ============================================================

A cell is described by a few features computed from its measurements only (kind ``value``;
label rows are never read for them):

- its phase, from :func:`.phases.classify` with the default :class:`.phases.PhaseRule` (mc above
  +1 % is phase II: the runs' endpoints are not minima, the temperature is high), as one 0/1
  feature per phase I, II, III, IV-A, IV-B;
- ranks within the table, which carry over between collections whose raw values differ (label
  noise raises every loss): the centred rank r(c) = (rank - 1/2) / n in (0, 1) (ties share their
  mean rank) of a cell's mean quantity among the n cells of the table that differ from it in one
  axis only (same experiment and every other cell coordinate). "among widths" compares a cell
  with the wider and narrower models trained alike; "among training fractions" with the same
  model trained on more or less data. A cell alone in its group gets 1/2.

Each question reads the features the science ties to it (:data:`FEATURES`): the temperature is
read off the phase (hot cells are phase II); whether width is the failure also reads how the
training loss ranks among the widths (an under-parameterised model fits worse than wider ones);
whether data is, how the test error ranks among the training fractions. On these, a decision
tree grown by the Gini rule (:mod:`.decision_tree`, depth :data:`DEPTHS`: one question of the
phase for the temperature, two for the others) on the table's cells whose label is one of the
question's two answers is the diagnoser; :meth:`Diagnoser.explain` prints it. A rank feature is
fitted on the cells that have another cell to be ranked against (a rank among one says nothing);
if those hold one answer only, the feature is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from phasediagram.analysis import decision_tree, phases, table
from phasediagram.analysis.improvement import LABEL_CODES
from phasediagram.errors import SpecError
from phasediagram.metrics.base import LABEL

FIELD = "diagnoser"
INDEX = ["width", "batch_size", "train_fraction"]
DEPTHS = {"temperature": 1, "width_vs_temperature": 2, "data_vs_temperature": 2}
QUESTIONS = {
    "temperature": ("bs_failure", ("large", "small"), {"large": "the temperature is too high: raise the batch size",
                                                        "small": "the temperature is too low: lower the batch size"}),
    "width_vs_temperature": ("width_vs_batch", ("width", "batch"), {"width": "widen the model",
                                                                     "batch": "change the batch size"}),
    "data_vs_temperature": ("data_vs_batch", ("data", "batch"), {"data": "train on more data",
                                                                  "batch": "change the batch size"}),
}
PHASE_FEATURES = tuple(f"phase {p}" for p in ("II", "I", "III", "IV-A", "IV-B"))  # II first: it wins ties
AXES = {"widths": "width", "training fractions": "train_fraction"}
# rank feature -> (column of cell_quantities, axis it ranks along)
RANKS = {"rank of train loss among widths": ("train loss", "widths"),
         "rank of test error among training fractions": ("test err", "training fractions")}
FEATURES = {
    "temperature": PHASE_FEATURES,
    "width_vs_temperature": (*PHASE_FEATURES, "rank of train loss among widths"),
    "data_vs_temperature": (*PHASE_FEATURES, "rank of test error among training fractions"),
}
KEY = ["experiment", "cell"]


def _question(question: str) -> tuple[str, tuple[str, str], dict]:
    if question not in QUESTIONS:
        raise SpecError(FIELD, f"unknown question {question!r}; choose one of {', '.join(QUESTIONS)}")
    return QUESTIONS[question]


def cell_quantities(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (the cell columns of :func:`.phases.classify`, its phase and note) with the
    cell means of train loss and test error (%) as columns ``train loss`` and ``test err``."""
    measured = table.measurements(df)
    out = phases.classify(measured)
    sel = measured[(measured["status"] == "ok") & measured["coord"].isna()]
    for name, split, metric, transform in (("train loss", "train", "loss", None), ("test err", "test", "acc", "err")):
        rows = sel[(sel["split"] == split) & (sel["metric"] == metric)]
        means = rows.groupby(KEY)["value"].mean().rename(name).reset_index()
        out = out.merge(means, on=KEY, how="left")
        if transform == "err":
            out[name] = 100.0 - out[name]
    return out


def _group(axis: str) -> list[str]:
    return [c for c in phases.CELL_COLUMNS if c not in (AXES[axis], "cell")]


def centred_rank(cells: pd.DataFrame, column: str, axis: str) -> pd.Series:
    """(rank - 1/2) / n of each cell's `column` among the cells differing from it only along `axis`."""
    grouped = cells.groupby(_group(axis), dropna=False)[column]
    return (grouped.rank(method="average") - 0.5) / grouped.transform("size")


def compared(cells: pd.DataFrame, name: str) -> np.ndarray:
    """Whether each cell has another cell to be ranked against for the rank feature `name`."""
    return cells.groupby(_group(RANKS[name][1]), dropna=False)["cell"].transform("size").to_numpy() > 1


def features(df: pd.DataFrame, names: tuple[str, ...]) -> pd.DataFrame:
    """The named features (module docstring) of every cell of `df`, one row per cell (cell columns
    first), from its measurements only.

    Raises:
        SpecError: a cell the phase rule cannot classify (a missing or NaN mc, train loss or CKA), or
            a missing or NaN quantity a rank needs, naming the first such cell.
    """
    cells = cell_quantities(df)
    if cells.empty:
        raise SpecError(FIELD, "the table holds no measured cell")
    unclassified = cells[~cells["phase"].isin(phases.PHASES)]
    if len(unclassified):
        c = unclassified.iloc[0]
        raise SpecError(FIELD, f"cell width {c['width']}, batch size {c['batch_size']}, training fraction "
                        f"{c['train_fraction']:g} has no full phase ({c['phase'] or 'none'}: "
                        f"{c['note'] or 'NaN in its phase inputs'}); the diagnoser needs mc, train loss and CKA")
    out = cells[phases.CELL_COLUMNS].copy()
    for name in names:
        if name in PHASE_FEATURES:
            out[name] = (cells["phase"] == name.removeprefix("phase ")).astype(float)
            continue
        column, axis = RANKS[name]
        missing = cells[~np.isfinite(cells[column])]
        if len(missing):
            c = missing.iloc[0]
            raise SpecError(FIELD, f"cell width {c['width']}, batch size {c['batch_size']}, training fraction "
                            f"{c['train_fraction']:g} has no {column} (NaN or missing), which {name!r} needs")
        out[name] = centred_rank(cells, column, axis).to_numpy()
    return out


def answers(df: pd.DataFrame, question: str) -> pd.Series:
    """The table's label of `question` for each cell, indexed by (experiment, cell): text answers."""
    metric, _, _ = _question(question)
    rows = df[(df["kind"] == LABEL) & (df["metric"] == metric)] if "kind" in df else df.iloc[:0]
    if rows.empty:
        raise SpecError(FIELD, f"the table holds no {metric!r} labels (rows of kind 'label') for question "
                        f"{question!r}: import a published collection or add labels with improvement.with_labels")
    names = {code: name for name, code in LABEL_CODES.items()}
    codes = rows.groupby(KEY)["value"].first()
    return codes.map(lambda v: names.get(int(v), "") if np.isfinite(v) else "")


@dataclass(frozen=True)
class Diagnoser:
    """A fitted diagnoser: the question, its feature names, the tree and what it was fitted on."""

    question: str
    feature_names: tuple[str, ...]
    classes: tuple[str, str]
    tree: decision_tree.Node

    def predict(self, df: pd.DataFrame) -> pd.Series:
        """One answer per measured cell of `df` (its label rows are not read), indexed by
        (width, batch_size, train_fraction).

        Raises:
            SpecError: a cell without the features' inputs (see :func:`features`), or two cells with
                the same index (several experiments, or a grid over lr too: predict them apart).
        """
        cells = features(df, self.feature_names)
        if cells.duplicated(INDEX).any():
            raise SpecError(FIELD, f"the table holds several cells with the same {', '.join(INDEX)} (experiments "
                            f"{sorted(cells['experiment'].unique())}); predict each experiment apart")
        labels = decision_tree.predict_tree(self.tree, cells[list(self.feature_names)].to_numpy())
        index = pd.MultiIndex.from_frame(cells[INDEX])
        return pd.Series(np.asarray(self.classes, dtype=object)[labels], index=index, name=self.question)

    def explain(self) -> str:
        """The learned rule as text: the question, what each answer means, and the tree."""
        metric, _, meaning = QUESTIONS[self.question]
        lines = [f"question {self.question!r} (labels {metric}), fitted on {sum(self.tree.counts)} cells:"]
        lines += [f"  {c}: {meaning[c]}" for c in self.classes]
        return "\n".join(lines + decision_tree.render(self.tree, list(self.feature_names), list(self.classes),
                                                      condition=_condition))


def _condition(name: str, threshold: float) -> str:
    """The words of a split's test: "the phase is not II" for a phase, "<rank> <= t" for a rank."""
    if name in PHASE_FEATURES:
        return f"the phase is not {name.removeprefix('phase ')}"
    return f"{name} <= {threshold:.3g}"


def fit_diagnoser(df: pd.DataFrame, question: str) -> Diagnoser:
    """Fit the diagnoser of `question` on the cells of `df` labelled with one of its two answers
    (cells labelled ``optimal`` are left out of the fit, but their measurements count in the ranks).

    Raises:
        SpecError: an unknown question, no labels for it, labels of one answer only, or a cell
            without the features' inputs.
    """
    _, classes, _ = _question(question)
    truth = answers(df, question)
    names = FEATURES[question]
    cells = features(df, names)
    label = cells.set_index(KEY).index.map(truth).to_numpy(dtype=object)
    use = np.isin(label, classes)
    for name in [n for n in names if n in RANKS]:
        ranked = use & compared(cells, name)
        if len(set(label[ranked])) == 2:
            use = ranked
        else:
            names = tuple(n for n in names if n != name)
    present = sorted(set(label[use]))
    if len(present) < 2:
        raise SpecError(FIELD, f"the table's {QUESTIONS[question][0]!r} labels hold "
                        f"{'no answer' if not present else 'only ' + repr(present[0])} of {', '.join(classes)}: "
                        "nothing to learn the difference from")
    y = np.array([classes.index(v) for v in label[use]])
    tree = decision_tree.fit_tree(cells.loc[use, list(names)].to_numpy(), y, DEPTHS[question], n_classes=2)
    return Diagnoser(question=question, feature_names=names, classes=classes, tree=tree)
