"""Import the Model-Diagnosis collections (Zhou et al., ICML 2024, "MD tree") into the tidy results table.

The collections (repository YefanZhou/ModelDiagnosis, MIT licence; both ship with this package,
see ``phasediagram/data/model_diagnosis/``) measure ResNet18 on CIFAR-10 with the taxonomy code of
Yang et al. at 13 widths (2-128) x 13 batch sizes (16-1024) x 10 training-set fractions (10 %-100 %):
``clean`` (``dataframe_normal_public.csv``) with clean labels and ``noisy``
(``dataframe_noise_public.csv``) with 10 % label noise. One CSV row is one configuration; every
quantity is the mean over 5 seeds (pair quantities over the seeds' pairs).

Rows produced for each configuration (cell: width, batch_size, train_fraction = data / 10,
label_noise 0.0 or 0.1, lr and weight_decay the reference's :data:`.reference.REFERENCE_LR` and
:data:`.reference.REFERENCE_WEIGHT_DECAY`; experiment ``model_diagnosis_clean`` or
``model_diagnosis_noisy``). Every row has seed and seed_b empty (NaN): it is already the cell mean,
so the cell means of :func:`.table.cell_means` and :func:`.phases.classify` return it unchanged.

=============================  ========  ==========  ==================  ======================================
CSV column                     source    split       metric              value
=============================  ========  ==========  ==================  ======================================
``train_acc``, ``test_acc``    loss_acc  train/test  acc                 accuracy in %
``train_loss``, ``test_loss``  loss_acc  train/test  loss                cross-entropy
``hessian_e``                  hessian   train       top_abs_eigenvalue  exp(hessian_e): the column is the
                                                                         natural log of the seeds' mean of
                                                                         PyHessian's power-iteration eigenvalue
                                                                         (the largest in magnitude)
``hessian_t``                  hessian   train       trace               exp(hessian_t): natural log of the
                                                                         seeds' mean trace
``CKA``                        CKA       train       cka_softmax         linear CKA of the softmax outputs on
                                                                         mixup inputs, mean over seed pairs
``mode_connectivity``          curve     train       mc                  mc in training error %, as
                                                                         :mod:`.reference` defines it
``mode_connectivity_peak``     curve     train       err_peak            -mode_connectivity_peak: the largest
                                                                         training error (%) at the curve's
                                                                         interior points t = 0.25, 0.5, 0.75
=============================  ========  ==========  ==================  ======================================

These rows are of kind ``value`` (measurements). The published annotations are rows of kind
``label`` (source ``model_diagnosis``, split ``-``), which figures, phases and correlations never
read (they use :func:`.table.measurements`, kind ``value`` only). Their definitions are those of
:mod:`.improvement`, which derives the same rows from any table's test accuracy (on both
collections it reproduces the published values exactly):

- ``rfi_width``, ``rfi_data``, ``rfi_inc_temp``, ``rfi_dec_temp``: room for improvement, in test
  accuracy percentage points: max over the configurations reached by moving one knob in one
  direction (the cell itself included) of their test accuracy, minus the cell's. ``inc_temp``
  lowers the batch size, ``dec_temp`` raises it, ``width`` raises the width, ``data`` the
  training fraction. Each is >= 0 and 0 at the edge of its knob.
- ``bs_failure``, ``width_vs_batch``, ``data_vs_batch``: the failure-source labels, coded as
  ``value`` = :data:`LABEL_CODES` (``optimal`` 0, ``large`` 1, ``small`` 2, ``width`` 3,
  ``batch`` 4, ``data`` 5). With t = max(rfi_inc_temp, rfi_dec_temp):

  - ``bs_failure`` is the *temperature*: ``large`` if rfi_dec_temp > rfi_inc_temp (the
    temperature is too high, the batch size too small: raise it), ``small`` if
    rfi_inc_temp > rfi_dec_temp (batch size too large: lower it), ``optimal`` if equal;
  - ``width_vs_batch``: ``width`` if rfi_width > t, ``batch`` if rfi_width < t, else ``optimal``;
  - ``data_vs_batch``: ``data`` if rfi_data > t, ``batch`` if rfi_data < t, else ``optimal``.
- ``parameters`` (the model's parameter count, ``para_amount``) and ``train_images`` (the
  training-set size, ``data_amount``).

Left out, as they follow from the rows above: ``test_error`` and ``train_error`` (100 - acc),
``generalization_gap`` (train acc - test acc), and ``log_data_amount``, ``log_para_amount``,
``log_bs`` (natural logs of the counts and of the batch size).

Getting the labels back: :func:`labels` returns one row per cell indexed by (width, batch_size,
train_fraction) with the text labels and the numbers above as columns; :func:`label_rows` selects
the raw rows.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from phasediagram.analysis import table
from phasediagram.analysis.improvement import LABEL_CODES, LABEL_SOURCE
from phasediagram.analysis.reference import REFERENCE_LR, REFERENCE_WEIGHT_DECAY
from phasediagram.errors import SpecError
from phasediagram.metrics.base import LABEL, VALUE
from phasediagram.spec.experiment import Cell

FIELD = "model_diagnosis"
COLLECTIONS = {"clean": ("dataframe_normal_public.csv", 0.0), "noisy": ("dataframe_noise_public.csv", 0.1)}
ARCH, DATASET = "resnet18", "cifar10"  # the family and data every configuration was trained with
CELL_COLUMNS = {"width": "width", "bs": "batch_size", "data": "train_fraction"}
# CSV column -> (source, split, metric, transform of the published value)
MEASUREMENTS = {
    "train_acc": ("loss_acc", "train", "acc", None),
    "test_acc": ("loss_acc", "test", "acc", None),
    "train_loss": ("loss_acc", "train", "loss", None),
    "test_loss": ("loss_acc", "test", "loss", None),
    "hessian_e": ("hessian", "train", "top_abs_eigenvalue", np.exp),
    "hessian_t": ("hessian", "train", "trace", np.exp),
    "CKA": ("CKA", "train", "cka_softmax", None),
    "mode_connectivity": ("curve", "train", "mc", None),
    "mode_connectivity_peak": ("curve", "train", "err_peak", np.negative),
}
RFI = ("rfi_width", "rfi_data", "rfi_inc_temp", "rfi_dec_temp")
COUNTS = {"para_amount": "parameters", "data_amount": "train_images"}
QUESTIONS = {"bs_failure": ("large", "small", "optimal"), "width_vs_batch": ("width", "batch", "optimal"),
             "data_vs_batch": ("data", "batch", "optimal")}
LABEL_COLUMNS = (*QUESTIONS, *RFI, *COUNTS.values())
NUMERIC = (*CELL_COLUMNS, *MEASUREMENTS, *RFI, *COUNTS)
INDEX = ["width", "batch_size", "train_fraction"]


def shipped(collection: str) -> Path:
    """The path of a collection shipped with the package: ``clean`` or ``noisy``."""
    if collection not in COLLECTIONS:
        raise SpecError(FIELD, f"unknown collection {collection!r}; choose one of {', '.join(COLLECTIONS)}")
    return Path(str(resources.files("phasediagram") / "data" / "model_diagnosis" / COLLECTIONS[collection][0]))


def _read(path: Path) -> pd.DataFrame:
    """The CSV as text, refused unless it holds every column this importer reads."""
    try:
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SpecError(FIELD, f"cannot read {path} as a Model-Diagnosis table: {exc}") from None
    missing = [c for c in (*NUMERIC, *QUESTIONS) if c not in text.columns]
    if missing:
        raise SpecError(FIELD, f"{path} is not a Model-Diagnosis table (missing columns {missing})")
    if text.empty:
        raise SpecError(FIELD, f"{path} holds no configuration")
    return text


def _numbers(text: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The numeric columns as floats; a cell that is empty, not a number or not finite is refused
    naming its row (counted from 1 after the header) and column."""
    out = pd.DataFrame(index=text.index)
    for column in NUMERIC:
        values = pd.to_numeric(text[column].str.strip(), errors="coerce").astype(float)
        bad = text.index[~np.isfinite(values)]
        if len(bad):
            raise SpecError(FIELD, f"{path} row {int(bad[0]) + 1}: {column} {text[column][bad[0]]!r} is not a "
                            "finite number")
        out[column] = values
    for column in CELL_COLUMNS:
        bad = out.index[(out[column] % 1 != 0) | (out[column] < 1)]
        if len(bad):
            raise SpecError(FIELD, f"{path} row {int(bad[0]) + 1}: {column} {text[column][bad[0]]!r} is not a "
                            "positive integer")
    bad = out.index[out["data"] > 10]
    if len(bad):
        raise SpecError(FIELD, f"{path} row {int(bad[0]) + 1}: data {text['data'][bad[0]]!r} is not a number of "
                        "tenths of the training set (1-10)")
    for question, allowed in QUESTIONS.items():
        bad = text.index[~text[question].isin(allowed)]
        if len(bad):
            raise SpecError(FIELD, f"{path} row {int(bad[0]) + 1}: {question} {text[question][bad[0]]!r} is not "
                            f"one of {', '.join(allowed)}")
    twice = out.duplicated(list(CELL_COLUMNS))
    if twice.any():
        i = int(out.index[twice][0])
        raise SpecError(FIELD, f"{path} row {i + 1}: a second row for width {out['width'][i]:g}, bs "
                        f"{out['bs'][i]:g}, data {out['data'][i]:g}")
    return out


def _label_noise(path: Path, label_noise: float | None) -> float:
    if label_noise is not None:
        return float(label_noise)
    for name, noise in COLLECTIONS.values():
        if path.name == name:
            return noise
    raise SpecError(FIELD, f"cannot tell the label noise of {path.name} from its name; pass label_noise "
                    "(0.0 for the clean collection, 0.1 for the noisy one)")


def load_model_diagnosis(csv_path: str | Path = "clean", label_noise: float | None = None,
                         experiment: str | None = None) -> pd.DataFrame:
    """One Model-Diagnosis collection as a normalised table (the module docstring lists its rows).

    Args:
        csv_path: ``"clean"`` or ``"noisy"`` (the collections shipped with the package) or the path
            of a ``dataframe_{normal,noise}_public.csv`` file.
        label_noise: the cells' label-noise fraction; by default 0.0 for ``dataframe_normal_public.csv``
            and 0.1 for ``dataframe_noise_public.csv``; required for a file of another name.
        experiment: the rows' experiment name; by default ``model_diagnosis_clean`` (no label noise)
            or ``model_diagnosis_noisy``.

    Raises:
        SpecError: a file that cannot be read, lacks a column, holds a non-numeric, empty or
            non-finite value in a numeric column, an unknown label, or two rows of one configuration.
    """
    path = shipped(csv_path) if str(csv_path) in COLLECTIONS else Path(csv_path)
    noise = _label_noise(path, label_noise)
    text = _read(path)
    numbers = _numbers(text, path)
    experiment = experiment or f"model_diagnosis_{'noisy' if noise > 0 else 'clean'}"
    n = len(text)
    cells = [Cell(width=int(w), batch_size=int(b), lr=REFERENCE_LR, weight_decay=REFERENCE_WEIGHT_DECAY,
                  train_fraction=d / 10, label_noise=noise)
             for w, b, d in zip(numbers["width"], numbers["bs"], numbers["data"])]
    base = pd.DataFrame({"experiment": experiment, "cell": [c.id for c in cells],
                         "width": numbers["width"].astype(int), "batch_size": numbers["bs"].astype(int),
                         "lr": REFERENCE_LR, "weight_decay": REFERENCE_WEIGHT_DECAY,
                         "train_fraction": numbers["data"] / 10, "label_noise": noise, "seed": None, "seed_b": None,
                         "coord": np.nan, "status": "ok"}, index=range(n))

    def rows(source: str, split: str, metric: str, value, kind: str) -> pd.DataFrame:
        return base.assign(source=source, split=split, metric=metric, value=np.asarray(value, float), kind=kind)

    frames = [rows(source, split, metric, (transform or np.asarray)(numbers[column].to_numpy()), VALUE)
              for column, (source, split, metric, transform) in MEASUREMENTS.items()]
    frames += [rows(LABEL_SOURCE, "-", column, numbers[column], LABEL) for column in RFI]
    frames += [rows(LABEL_SOURCE, "-", name, numbers[column], LABEL) for column, name in COUNTS.items()]
    frames += [rows(LABEL_SOURCE, "-", question, text[question].map(LABEL_CODES), LABEL) for question in QUESTIONS]
    return table.normalise(pd.concat(frames, ignore_index=True)[table.COLUMNS])


def label_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of kind ``label`` of a table."""
    return df[df["kind"] == LABEL] if "kind" in df else df.iloc[:0]


def labels(df: pd.DataFrame) -> pd.DataFrame:
    """The published labels of every cell: indexed by (width, batch_size, train_fraction), columns
    bs_failure, width_vs_batch, data_vs_batch (text), rfi_width, rfi_data, rfi_inc_temp,
    rfi_dec_temp (percentage points), parameters and train_images (counts).

    Raises:
        SpecError: the table holds no label rows, or label rows of two cells with the same index
            (e.g. both collections: select one experiment first).
    """
    sel = label_rows(df)
    if sel.empty:
        raise SpecError("labels", "the table holds no rows of kind 'label' (import a published collection with "
                        "load_model_diagnosis)")
    if sel.duplicated([*INDEX, "metric"]).any():
        raise SpecError("labels", f"the table holds labels of several cells with the same {', '.join(INDEX)} "
                        f"(experiments {sorted(sel['experiment'].unique())}); select one first")
    wide = sel.pivot(index=INDEX, columns="metric", values="value")
    names = {code: name for name, code in LABEL_CODES.items()}
    for question in QUESTIONS:
        if question in wide:
            wide[question] = wide[question].map(lambda v: names.get(int(v), "") if np.isfinite(v) else "")
    wide.columns.name = None
    return wide[[c for c in LABEL_COLUMNS if c in wide]]


def main(argv=None) -> int:
    """``python -m phasediagram.analysis.model_diagnosis [COLLECTION|CSV ...] --out DIR``: write each
    collection's table (``<experiment>.csv``) and its phase figure (``<experiment>.png``)."""
    from phasediagram.analysis.plots import save_figure
    from phasediagram.analysis.small_multiples import phase_small_multiples

    parser = argparse.ArgumentParser(prog="python -m phasediagram.analysis.model_diagnosis",
                                     description="Import the Model-Diagnosis collections; draw their phase maps.")
    parser.add_argument("collections", nargs="*", default=list(COLLECTIONS),
                        help=f"{' or '.join(COLLECTIONS)} (shipped) or a CSV path (default: both shipped)")
    parser.add_argument("--out", default=".", help="folder to write the tables and figures in")
    parser.add_argument("--no-table", action="store_true", help="write the figures only")
    args = parser.parse_args(argv)
    try:
        tables = [load_model_diagnosis(c) for c in args.collections]
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for df in tables:
        name = str(df["experiment"].iloc[0])
        if not args.no_table:
            table.write(df, out / f"{name}.csv")
        fig = phase_small_multiples(df, title=f"{name}: ResNet18 / CIFAR-10 (Zhou et al. 2024), phases per "
                                    "training fraction")
        print("figure: " + ", ".join(map(str, save_figure(fig, out / f"{name}.png", formats=("png",), dpi=110))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
