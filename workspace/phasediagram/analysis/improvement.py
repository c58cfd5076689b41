"""Room for improvement and failure-source labels of any width x batch size x training-fraction grid.

The definitions of the Model-Diagnosis collections (Zhou et al. 2024, :mod:`.model_diagnosis`),
applied to a table's cell means of test accuracy a(w, b, f) (in %, ``loss_acc`` test ``acc``):

    rfi_width    = max_{w' >= w} a(w', b, f) - a(w, b, f)     more width
    rfi_data     = max_{f' >= f} a(w, b, f') - a(w, b, f)     more training data
    rfi_inc_temp = max_{b' <= b} a(w, b', f) - a(w, b, f)     a hotter run: a smaller batch
    rfi_dec_temp = max_{b' >= b} a(w, b', f) - a(w, b, f)     a cooler run: a larger batch

each over the grid's values (the cell itself included, so each is >= 0, and 0 at the knob's edge).
With t = max(rfi_inc_temp, rfi_dec_temp) the labels are

    bs_failure     = "large" (temperature too high: raise the batch size) if rfi_dec_temp > rfi_inc_temp,
                     "small" (too low: lower it) if rfi_inc_temp > rfi_dec_temp, else "optimal"
    width_vs_batch = "width" if rfi_width > t, "batch" if rfi_width < t, else "optimal"
    data_vs_batch  = "data" if rfi_data > t, "batch" if rfi_data < t, else "optimal"

On the published collections these reproduce their rfi_* and labels exactly (tests/test_model_diagnosis.py).
:func:`with_labels` adds them to a study's table as rows of kind ``label``, as the importer does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from phasediagram.analysis import table
from phasediagram.errors import SpecError
from phasediagram.metrics.base import LABEL

INDEX = ["width", "batch_size", "train_fraction"]
KNOBS = {"rfi_width": ("width", "up"), "rfi_data": ("train_fraction", "up"), "rfi_inc_temp": ("batch_size", "down"),
         "rfi_dec_temp": ("batch_size", "up")}
LABEL_SOURCE = "model_diagnosis"
LABEL_CODES = {"optimal": 0, "large": 1, "small": 2, "width": 3, "batch": 4, "data": 5}


def test_accuracy(df: pd.DataFrame) -> pd.Series:
    """Cell means of the test accuracy (%), indexed by (width, batch_size, train_fraction).

    Raises:
        SpecError: no test accuracy, or two cells of one index (a grid over another axis too).
    """
    sel = table.measurements(df)
    sel = sel[(sel["metric"] == "acc") & (sel["split"] == "test") & (sel["status"] == "ok") & sel["coord"].isna()]
    if sel.empty:
        raise SpecError("labels", "the table holds no test accuracy (loss_acc test acc rows) to derive labels from")
    cells = sel.drop_duplicates(["experiment", "cell"])
    if cells.duplicated(INDEX).any():
        raise SpecError("labels", "the table holds several cells per (width, batch size, training fraction) (another "
                        "axis varies, or several experiments): the labels need a grid over these three only")
    return sel.groupby(INDEX)["value"].mean()


def room_for_improvement(acc: pd.Series) -> pd.DataFrame:
    """rfi_width, rfi_data, rfi_inc_temp, rfi_dec_temp (module docstring) of every cell of `acc`."""
    frame = acc.rename("acc").reset_index()
    out = pd.DataFrame(index=acc.index)
    for name, (knob, direction) in KNOBS.items():
        others = [c for c in INDEX if c != knob]
        ordered = frame.sort_values(knob, ascending=direction == "down")
        best = ordered.groupby(others)["acc"].cummax()  # max over the knob's values beyond this one, itself included
        out[name] = pd.Series(best.to_numpy(), index=pd.MultiIndex.from_frame(ordered[INDEX])) - acc
    return out


def failure_labels(rfi: pd.DataFrame) -> pd.DataFrame:
    """bs_failure, width_vs_batch and data_vs_batch (module docstring) from the four rfi columns."""
    inc, dec, width, data = (rfi[c].to_numpy() for c in ("rfi_inc_temp", "rfi_dec_temp", "rfi_width", "rfi_data"))
    temp = np.maximum(inc, dec)

    def pick(more, less, a, b):
        return np.where(a > b, more, np.where(a < b, less, "optimal"))

    return pd.DataFrame({"bs_failure": pick("large", "small", dec, inc), "width_vs_batch": pick("width", "batch", width,
                                                                                               temp),
                         "data_vs_batch": pick("data", "batch", data, temp)}, index=rfi.index)


def label_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of kind ``label`` (source ``model_diagnosis``, split ``-``) holding every cell's rfi_* and
    labels (coded as :data:`LABEL_CODES`), derived from the table's test accuracy."""
    rfi = room_for_improvement(test_accuracy(df))
    wide = pd.concat([rfi, failure_labels(rfi).apply(lambda c: c.map(LABEL_CODES))], axis=1)
    cells = table.measurements(df).drop_duplicates(INDEX).set_index(INDEX)
    long = wide.stack().rename("value").reset_index().rename(columns={"level_3": "metric"})
    long = long.join(cells[["experiment", "cell", "lr", "weight_decay", "label_noise"]], on=INDEX)
    return long.assign(seed=None, seed_b=None, split="-", coord=np.nan, status="ok", source=LABEL_SOURCE,
                       kind=LABEL)[table.COLUMNS]


def with_labels(df: pd.DataFrame) -> pd.DataFrame:
    """The table with its label rows replaced by ones derived from its test accuracy."""
    base = df[df["kind"] != LABEL]
    return table.normalise(pd.concat([base, label_rows(base)], ignore_index=True))
