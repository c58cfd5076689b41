"""Rows -> one tidy table: `collect` concatenates every job's result file into a DataFrame.

Columns: experiment, cell, width, batch_size, lr, weight_decay, train_fraction, label_noise,
seed, seed_b, split, metric, coord, value, status, source, kind. One row per (cell, seed[, seed_b],
split, metric[, coord]). `kind` says what the value is: "value" (a measurement), "stderr" (the
standard error of a measurement) or "diagnostic" (of the run: product counts, convergence flags,
the coordinate of an extremum, epochs trained), as each metric's registry entry declares
(`metrics.row_kind`); a table read without the column gets it from there. Figures, phases and
correlations use the measurements only; every row stays in the table.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from phasediagram.errors import CorruptFile, SpecError
from phasediagram.metrics import ROW_KINDS, VALUE, row_kind
from phasediagram.storage import results
from phasediagram.storage.checkpoints import atomic_write_bytes, quarantine
from phasediagram.storage.layout import Layout

COLUMNS = [*results.ROW_KEYS, "kind"]
SORT = ["width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise", "source", "metric", "split",
        "coord", "seed", "seed_b"]


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("value", "coord") else "object") for c in COLUMNS})


def collect(layout: Layout, experiment: str | None = None, log=print, training_hash: str | None = None) -> pd.DataFrame:
    """Read every valid result file of the experiment; corrupt ones are reported and moved aside, and
    ones computed from checkpoints that have changed since, or (given `training_hash`) made under
    other training settings, are reported and left out."""
    frames = []
    for path in sorted(layout.results_dir.glob("*/*.json")):
        try:
            doc = results.read(path)
        except FileNotFoundError:  # replaced or moved while we listed
            continue
        except CorruptFile as exc:
            log(f"warning: {exc}; moved aside to {quarantine(path).name}; rerun its stage to redo it")
            continue
        if experiment is not None and doc["experiment"] != experiment:
            continue
        if training_hash is not None and doc["training_hash"] != training_hash:
            log(f"warning: {path} was made under other training settings than the recorded spec's; left out of "
                "the table: rerun its stage to redo it")
            continue
        changed = results.changed_checkpoints(doc, layout.exp_dir)
        if changed:
            log(f"warning: {path} was computed from checkpoints that have changed since ({', '.join(changed[:3])}"
                f"{', ...' if len(changed) > 3 else ''}); left out of the table: rerun its stage to redo it")
            continue
        frames.append(pd.DataFrame(doc["rows"], columns=COLUMNS))
    if not frames:
        return empty()
    df = pd.concat(frames, ignore_index=True)
    return normalise(df)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The table with typed columns, `kind` filled in where missing, sorted."""
    df = df.copy()
    given = df["kind"].astype(object) if "kind" in df else pd.Series(None, index=df.index, dtype=object)
    df["kind"] = [k if isinstance(k, str) else row_kind(str(s), str(m))
                  for k, s, m in zip(given, df["source"], df["metric"])]
    for c in ("value", "coord", "lr", "weight_decay", "train_fraction", "label_noise"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in ("width", "batch_size", "seed", "seed_b"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    return df.sort_values(SORT, kind="stable", na_position="first").reset_index(drop=True)


def write(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue().encode())


def read(path: str | Path, experiment: str | None = None) -> pd.DataFrame:
    """Read a results table; refuse one that is not a table of ours or belongs to another experiment."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SpecError("table", f"cannot read {path} as a results table: {exc}") from None
    missing = [c for c in results.ROW_KEYS if c not in df.columns]
    if missing:
        raise SpecError("table", f"{path} is not a phasediagram results table (missing columns {missing})")
    if experiment is not None:
        others = sorted(set(text["experiment"]) - {experiment})
        if others:
            raise SpecError("table", f"{path} holds results of experiment(s) {others}, not {experiment!r}")
    check_values(text, path)
    return normalise(df)


TEXT_COLUMNS = ("experiment", "cell", "split", "metric", "status", "source", "kind")
NUMBER_COLUMNS = {"width": True, "batch_size": True, "lr": False, "weight_decay": False,
                  "train_fraction": False, "label_noise": False}  # column: an integer (else a number); never empty
OPTIONAL_NUMBER_COLUMNS = {"seed": True, "seed_b": True, "coord": False, "value": False}  # may be empty (NaN)


def check_values(text: pd.DataFrame, path: Path) -> None:
    """Refuse a table (`text`: its cells as read, strings) whose cells are not of their column's type,
    naming the first bad row (counted from 1 after the header): grid coordinates are numbers (width
    and batch size integers), seed, seed_b, coord and value numbers or empty (seeds integers),
    status one of the row statuses, kind one of the kinds or empty."""
    def bad(column: str, i, allowed: str):
        raise SpecError("table", f"{path} row {int(i) + 1}: {column} {text[column][i]!r} is not {allowed}")

    for column, integer in {**NUMBER_COLUMNS, **OPTIONAL_NUMBER_COLUMNS}.items():
        cells = text[column].str.strip()
        numbers = pd.to_numeric(cells, errors="coerce")
        empty = cells.str.lower().isin(["", "nan"]) if column in OPTIONAL_NUMBER_COLUMNS else False
        for i in text.index[numbers.isna() & ~empty]:
            bad(column, i, "an integer" if integer else "a number")
        if integer:
            for i in text.index[numbers.notna() & (numbers % 1 != 0)]:
                bad(column, i, "an integer")
    for i in text.index[~text["status"].isin(results.ROW_STATUSES)]:
        bad("status", i, f"one of {', '.join(results.ROW_STATUSES)}")
    if "kind" in text:
        for i in text.index[(text["kind"] != "") & ~text["kind"].isin(ROW_KINDS)]:
            bad("kind", i, f"one of {', '.join(ROW_KINDS)}")


def count_rows(layout: Layout, experiment: str) -> int:
    """How many rows the valid result files of `experiment` hold (what `collect` would gather)."""
    total = 0
    for path in layout.results_dir.glob("*/*.json"):
        try:
            doc = results.read(path)
        except (CorruptFile, FileNotFoundError):
            continue
        total += len(doc["rows"]) if doc["experiment"] == experiment else 0
    return total


def measurements(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are measurements (kind "value"): no standard errors, no run diagnostics."""
    return df[df["kind"] == VALUE] if "kind" in df else df


def cell_means(df: pd.DataFrame, metric: str, split: str, load: str = "width", temperature: str = "batch_size",
               source: str | None = None) -> pd.DataFrame:
    """Mean over seeds (and seed pairs) of one scalar quantity: a (temperature x load) grid."""
    sel = measurements(df)
    sel = sel[(sel["metric"] == metric) & (sel["split"] == split) & (sel["status"] == "ok") & sel["coord"].isna()]
    if source is not None:
        sel = sel[sel["source"] == source]
    if sel.empty:
        return pd.DataFrame()
    return sel.groupby([temperature, load])["value"].mean().unstack(load).sort_index().sort_index(axis=1)


def diverged_cells(df: pd.DataFrame, load: str = "width", temperature: str = "batch_size") -> set[tuple]:
    """(temperature, load) of every cell where at least one training run diverged."""
    sel = df[(df["source"] == "train") & (df["status"] == "diverged")]
    return {(t, l) for t, l in zip(sel[temperature], sel[load])}
