"""Name what limits trained models (their failure source) and the change to make, from a labelled reference.

    f = diagnose_failure(["a/seed0/final.pt", "a/seed1/final.pt"], "model-diagnosis")   # or a finished Study
    f.answers       # {"temperature": "small", "width_vs_temperature": "batch", "data_vs_temperature": "data"}
    f.change, f.room  # "more data", {"more data": 3.2, "batch size down": 1.1, ...} (test-accuracy points)
    print(f.summary())

A reference is a table of measured cells with failure-source labels (rows of kind ``label``):

- ``model-diagnosis``: the published collections of Zhou et al. (2024, :mod:`.analysis.model_diagnosis`),
  ResNet18 on CIFAR-10 over width x batch size x training fraction; the clean collection for
  models trained on clean labels, the noisy one (10 % label noise) for models with label noise.
  The models are measured with the metrics of those collections (``loss_acc``, ``hessian``, ``CKA``,
  ``curve``) and the reference study's options (``PRESET_SPECS["reference"]``), on CIFAR-10 unless
  another dataset is named;
- a finished study of the user's (width x batch size, optionally x training fraction): its labels
  are derived from its test accuracy (:mod:`.analysis.improvement`), and the models are measured
  with every metric the study ran, with its options.

For each question the reference can answer, a diagnoser learns the label from the cells'
measurements (``analysis.diagnoser.fit_diagnoser(reference, question)``) and predicts it at the
models' cell:

    question                label            meaning
    temperature             large / small    the temperature is too high (raise the batch size) / too low (lower it)
    width_vs_temperature    width / batch    more width gains more than the best batch-size change / less
    data_vs_temperature     data / batch     more training data gains more than it / less

The change named is "width up" or "more data" where its question says it beats the batch size (both:
the one with the larger expected gain), else the batch change of the first question (not asked: the
direction of the larger expected gain). The expected room for improvement of each change is the
reference's rfi_* (in test-accuracy points) at its configuration nearest the models' (the nearest
grid value on each axis: width and batch size on a log scale, training fraction on a linear one).
A question is left out, with a note, where the reference does not vary its knob or lacks one of its
two labels; naming it explicitly (`questions`) makes that an error. The models' phase (the default
phase rule on their rows) is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from phasediagram.analysis import improvement, table
from phasediagram.analysis import model_diagnosis as md
from phasediagram.analysis import phases as phases_mod
from phasediagram.analysis.table import normalise
from phasediagram.data.datasets import DATASETS
from phasediagram.diagnosis import ADVICE, as_study, load_checkpoints, measure_models, study_table
from phasediagram.errors import SpecError
from phasediagram.execution.jobs import TRAIN
from phasediagram.execution.runtime import torch_threads
from phasediagram.spec.experiment import Cell
from phasediagram.spec.presets import PRESET_SPECS
from phasediagram.study import Study

REFERENCES = ("model-diagnosis",)
REFERENCE_METRICS = ("loss_acc", "hessian", "CKA", "curve")  # what the published collections measured
QUESTIONS = {"temperature": ("bs_failure", "batch_size", ("large", "small")),
             "width_vs_temperature": ("width_vs_batch", "width", ("width", "batch")),
             "data_vs_temperature": ("data_vs_batch", "train_fraction", ("data", "batch"))}
CHANGES = {"batch size up": "rfi_dec_temp", "batch size down": "rfi_inc_temp", "width up": "rfi_width",
           "more data": "rfi_data"}
BATCH_CHANGE = {"large": "batch size up", "small": "batch size down"}


@dataclass
class Reference:
    """A labelled reference: its name, its table (with label rows), its family and dataset, and the
    study whose spec measures the models (its metrics and options) and whose folder holds the data."""

    name: str
    table: pd.DataFrame
    arch: str
    dataset: str
    study: Study


def model_diagnosis_reference(cell: Cell, seeds, dataset: str | None, root, data_root: str | None = None) -> Reference:
    """The Model-Diagnosis collection for models of `cell` (the clean collection without label noise,
    else the noisy one), with the spec that measures them as the collections were measured."""
    collection = "noisy" if cell.label_noise > 0 else "clean"
    preset = PRESET_SPECS["reference"]
    grid = {"widths": [cell.width], "batch_sizes": [cell.batch_size], "lrs": [cell.lr],
            "weight_decays": [cell.weight_decay], "train_fractions": [cell.train_fraction],
            "label_noises": [cell.label_noise], "seeds": list(seeds)}
    spec = {**preset, **grid, "name": "model_diagnosis", "dataset": dataset or preset["dataset"], "data_root": data_root,
            "metrics": list(REFERENCE_METRICS),
            "metric_options": {m: o for m, o in preset["metric_options"].items() if m in REFERENCE_METRICS}}
    return Reference(f"model-diagnosis ({collection} collection)", md.load_model_diagnosis(collection),
                     preset["arch"], preset["dataset"], Study(spec, root))


def study_reference(study: Study) -> Reference:
    """The user's finished study as a reference, its labels derived from its test accuracy."""
    if study.spec.temperature_axis != "batch_size":
        raise SpecError("reference", f"the study {study.spec.name!r} varies {study.spec.temperature_axis}; the "
                        "failure-source questions need a study over batch sizes")
    table = study_table(study)
    return Reference(f"study {study.spec.name!r}", improvement.with_labels(table[table["source"] != "phase"]),
                     study.spec.arch, study.spec.dataset, study)


def nearest(values, value: float, log: bool) -> float:
    """The grid value nearest `value` (on a log scale if `log`)."""
    values = np.asarray(sorted(values), float)
    distance = np.abs(np.log(values) - math.log(value)) if log else np.abs(values - value)
    return float(values[int(np.argmin(distance))])


def peak_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """``curve`` ``err_peak`` rows (the largest training error at the curve's interior points, as in
    the published collections) from a pair's curve rows ``err`` (split train, coord t)."""
    err = rows[(rows["source"] == "curve") & (rows["metric"] == "err") & (rows["split"] == "train")
               & (rows["coord"] > 0) & (rows["coord"] < 1) & (rows["status"] == "ok")]
    if err.empty:
        return rows.iloc[:0]
    key = ["experiment", "cell", "width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise", "seed",
           "seed_b", "source", "split"]
    peak = err.groupby(key, dropna=False)["value"].max().reset_index()
    return peak.assign(metric="err_peak", coord=np.nan, status="ok", kind="value")[rows.columns]


def questions_of(reference: Reference, asked) -> tuple[list[str], list[str]]:
    """(questions to answer, notes on those left out); `asked` (None: every answerable one) names them."""
    labels = md.labels(reference.table)
    out, notes = [], []
    for question in asked or QUESTIONS:
        if question not in QUESTIONS:
            raise SpecError("question", f"unknown question {question!r}; choose one of {', '.join(QUESTIONS)}")
        column, knob, wanted = QUESTIONS[question]
        held = set(labels[column]) if column in labels else set()
        lacking = [w for w in wanted if w not in held]
        varies = labels.index.get_level_values(knob).nunique() > 1
        if not lacking and varies:
            out.append(question)
            continue
        why = (f"{reference.name} varies no {knob.replace('_', ' ')}" if not varies
               else f"{reference.name} holds no cell labelled {' or '.join(map(repr, lacking))}")
        if asked:
            raise SpecError("question", f"{question}: {why}")
        notes.append(f"{question} not asked: {why}")
    return out, notes


@dataclass
class FailureDiagnosis:
    """The answers of the reference's diagnosers at the models' cell and the change they suggest.

    `rows`: the models' measured rows; `answers`: {question: label}; `rules`: {question: the
    diagnoser's explain()}; `change`: the change to make; `room`: {change: the reference's rfi at
    `nearest`, the reference configuration nearest the models'}; `phase`: the models' phase by the
    default phase rule ('' if unclassified); `notes`: where the models differ from the reference.
    """

    reference: str
    cell: Cell
    seeds: tuple[int, ...]
    rows: pd.DataFrame
    answers: dict[str, str]
    rules: dict[str, str]
    change: str
    room: dict[str, float]
    nearest: tuple[int, int, float]
    phase: str
    notes: list[str] = field(default_factory=list)

    def summary(self, with_phase: bool = True) -> str:
        """Lines for a terminal: the phase (if `with_phase`), the answers, the change and the expected gains, the
        notes."""
        lines = [f"failure source (reference: {self.reference}); models: {len(self.seeds)} seed(s) at {self.cell.id}"]
        if with_phase and self.phase:
            lines.append(f"  phase: {self.phase} ({ADVICE[self.phase]})")
        lines += [f"  {q}: {a}" for q, a in self.answers.items()]
        w, b, f = self.nearest
        gains = ", ".join(f"{c} {g:+.2f}" for c, g in sorted(self.room.items(), key=lambda kv: -kv[1]))
        if self.change:
            lines.append(f"change: {self.change}, expected room for improvement {self.room[self.change]:+.2f} points "
                         "of test accuracy")
        else:
            lines.append("change: none named (no question answered)")
        lines.append(f"  the reference's room for improvement at its configuration nearest the models' (width {w}, "
                     f"batch size {b}, training fraction {f:g}): {gains}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def choose_change(answers: dict[str, str], room: dict[str, float]) -> str:
    """The change the answers name (module docstring); '' without answers. Where the batch size is the
    failure source but the temperature question was not asked, its direction is the one of larger `room`."""
    beats = [c for q, c in (("width_vs_temperature", "width up"), ("data_vs_temperature", "more data"))
             if answers.get(q) in ("width", "data")]
    if beats:
        return max(beats, key=lambda c: room[c])
    if "temperature" in answers:
        return BATCH_CHANGE[answers["temperature"]]
    if answers:
        return max(BATCH_CHANGE.values(), key=lambda c: room[c])
    return ""


def place(reference: pd.DataFrame, rows: pd.DataFrame, at: tuple) -> pd.DataFrame:
    """The reference's measurements with its cell at `at` (width, batch_size, train_fraction) replaced
    by the models' `rows`, which take that cell's coordinates and experiment."""
    measured = table.measurements(reference)
    here = (measured["width"] == at[0]) & (measured["batch_size"] == at[1]) & np.isclose(measured["train_fraction"],
                                                                                       at[2])
    coordinates = measured.loc[here, phases_mod.CELL_COLUMNS].iloc[0]
    return normalise(pd.concat([measured[~here], rows.assign(**coordinates.to_dict())], ignore_index=True))


def answer(reference: Reference, rows: pd.DataFrame, cell: Cell, seeds, asked=None, notes=()) -> FailureDiagnosis:
    """The reference's diagnosers applied to the models' measured `rows` (one cell).

    The models take the place of the reference's configuration nearest theirs, so that the
    diagnosers' ranks compare them with the reference's cells around it. Without an explicit
    `asked`, a question whose diagnoser cannot be fitted on the reference is left out with a note.
    """
    from phasediagram.analysis.diagnoser import fit_diagnoser

    questions, left_out = questions_of(reference, asked)
    notes = [*notes, *left_out]
    rows = normalise(pd.concat([rows, peak_rows(rows)], ignore_index=True))
    classified = phases_mod.classify(rows)
    phase = str(classified["phase"].iloc[0]) if len(classified) else ""
    labels = md.labels(reference.table)
    at = (nearest(labels.index.get_level_values("width").unique(), cell.width, True),
          nearest(labels.index.get_level_values("batch_size").unique(), cell.batch_size, True),
          nearest(labels.index.get_level_values("train_fraction").unique(), cell.train_fraction, False))
    if questions and phase not in phases_mod.PHASES:
        notes.append("no question asked: the diagnosers read the models' full phase (mc, training loss and CKA, "
                     "which need two seeds or more)")
        questions = []
    placed = place(reference.table, rows, at) if questions else None
    answers, rules = {}, {}
    for question in questions:
        try:
            diagnoser = fit_diagnoser(reference.table, question)
        except SpecError as exc:
            if asked:
                raise
            notes.append(f"{question} not asked: {exc}")
            continue
        answers[question] = str(diagnoser.predict(placed).loc[at])
        rules[question] = diagnoser.explain()
    room = {change: float(labels.loc[at][column]) for change, column in CHANGES.items()}
    return FailureDiagnosis(reference.name, cell, tuple(seeds), rows, answers, rules, choose_change(answers, room),
                            room, (int(at[0]), int(at[1]), float(at[2])), phase, notes)


def differences(reference: Reference, cell: Cell, dataset: str, labels: pd.DataFrame) -> list[str]:
    """Where the models' data or setting differ from the reference's (their family cannot: it is refused)."""
    notes = []
    if dataset != reference.dataset:
        notes.append(f"the models' data ({dataset}) differs from the reference's ({reference.dataset}): its rules "
                     "are applied as they are")
    for name in ("lr", "weight_decay", "label_noise"):
        values = sorted(set(reference.table[name].dropna()))
        if not any(math.isclose(cell.axis(name), v, rel_tol=1e-9, abs_tol=1e-12) for v in values):
            notes.append(f"{name} {cell.axis(name):g} differs from the reference's ({', '.join(f'{v:g}' for v in values)})")
    for name in ("width", "batch_size", "train_fraction"):
        values = labels.index.get_level_values(name)
        if not values.min() <= cell.axis(name) <= values.max():
            notes.append(f"{name} {cell.axis(name):g} lies outside the reference's range {values.min():g}-"
                         f"{values.max():g}")
    return notes


def diagnose_failure(checkpoints, reference: str | Study | Path, root: str | Path = ".", device="cpu",
                     threads: int | None = 1, questions=None, dataset: str | None = None,
                     measured: pd.DataFrame | None = None, data_root: str | None = None) -> FailureDiagnosis:
    """Measure `checkpoints` (seeds of one setting) as the reference was measured and answer its questions.

    `reference`: ``"model-diagnosis"`` or a finished study (a `Study` or its folder); `root`: the folder
    whose ``data/`` holds the dataset (model-diagnosis only; a study uses its own); `dataset`: the
    data to measure on (model-diagnosis only; default CIFAR-10) and `data_root` the folder of its files
    (as the spec's ``data_root``); `questions`: the questions to ask
    (default: every one the reference answers); `measured`: rows already measured on these models
    (e.g. `diagnose`'s), whose metrics are not measured again. Everything is checked before any
    metric runs; nothing is written.

    Raises:
        SpecError: an unknown reference or question, a question whose labels the reference lacks,
            checkpoints of another family than the reference's, or models that do not fit the data.
    """
    paths = tuple(Path(p) for p in ([checkpoints] if isinstance(checkpoints, (str, Path)) else checkpoints))
    if isinstance(reference, str) and reference not in REFERENCES and not Path(reference).is_dir():
        raise SpecError("reference", f"unknown reference {reference!r}; choose {', '.join(REFERENCES)} or give a "
                        "finished study's folder")
    if dataset is not None and dataset not in DATASETS:
        raise SpecError("dataset", f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    with torch_threads(threads):
        if reference in REFERENCES:
            family = Study({**PRESET_SPECS["reference"], "name": "model_diagnosis"}, root)
            cell, loaded, ckpts = load_checkpoints(paths, family, device)
            ref = model_diagnosis_reference(cell, loaded, dataset, root, data_root)
        else:
            ref = study_reference(as_study(reference))
            cell, loaded, ckpts = load_checkpoints(paths, ref.study, device)
        questions_of(ref, questions)  # an unanswerable question is refused before anything is measured
        spec = ref.study.spec
        done = set() if measured is None else set(measured["source"])
        stages = [m for m in spec.metrics if m not in done]
        rows = measure_models(spec, ref.study.layout, cell, loaded, ckpts, stages, device)
        if measured is not None:
            rows = normalise(pd.concat([measured, rows[rows["source"] != TRAIN]], ignore_index=True))
    notes = differences(ref, cell, spec.dataset, md.labels(ref.table))
    return answer(ref, rows, cell, loaded, questions, notes)
