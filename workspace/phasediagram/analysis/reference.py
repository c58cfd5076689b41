"""Import the reference study's published result folders into the tidy results table.

The reference repository (Yang et al. 2021, `loss_landscape_taxonomy`) stores one folder per
cell, for example ``different_knobs_subset_10/bs_{B}/lr_decay/ResNet18_w{W}/metrics/`` with

===========================  ===============================================================
file                         content
===========================  ===============================================================
``loss_acc.pkl``             ``{seed: {"nll", "loss", "accuracy"}}`` on the training set
``loss_acc_test.pkl``        the same on the test set
``hessian.pkl``              ``{seed: {"top_eigenvalue": [x], "trace": t}}``
``model_dist.pkl``           ``{"model_distance": {i: {j: {"dist": d}}}}``
``CKA_mixup_alpha_16.0.pkl`` ``{"representation_similarity": {i: {j: [cka_logits, cka_softmax]}}}``
``curve_test.npz``           ``ts``, ``tr_err``, ``tr_loss``, ``te_err``, ``te_loss`` along the curve
===========================  ===============================================================

:func:`import_tree` turns such a tree into rows of the table of :mod:`.table` (accuracy and
errors are percentages there too, so values are copied unchanged):

- ``loss_acc``: rows (split train/test, metric ``loss`` and ``acc``) per seed;
- ``hessian``: ``top_abs_eigenvalue`` (the first entry of the list) and ``trace`` per seed, split
  train. The reference computed both with PyHessian: power iteration converges to the eigenvalue
  of largest magnitude, which is this toolkit's ``top_abs_eigenvalue`` (``top_eigenvalue`` here
  means the largest algebraic one, and the two differ where negative curvature dominates); its
  ``trace`` is Hutchinson's estimate under the relative-change rule, our ``trace`` with
  ``trace_rule="change"``;
- ``dist``: one row per seed pair i < j (the file holds both orders; they are equal);
- ``CKA``: one row per seed pair i < j for ``cka_logits`` and ``cka_softmax``. The file holds both
  orders (i, j) and (j, i), measured on different mixup batches, so they differ slightly; the
  row holds their mean, which makes the cell mean over pairs i < j equal to the reference
  notebook's mean over all ordered pairs i != j;
- ``curve``: ``mc`` (split train) from the training error along the curve, exactly as the
  reference notebook and ../DESIGN.md define it::

      e_mid = (e(0) + e(1)) / 2,   t* = argmax_t |e(t) - e_mid|,   mc = e_mid - e(t*)

  plus the curves themselves as rows ``err`` and ``loss`` with ``coord`` t (splits train/test).
  The file does not say which two seeds the curve joins; the rows carry seeds 0 and 1.

A file that is absent gives rows with status ``missing`` (value NaN), so it stays blank in plots.

Security: the ``.pkl`` files are foreign. They are read by :func:`load_pickle` through the
allow-list unpickler of :mod:`.safepickle`, which resolves only the globals needed to rebuild
numpy scalars (``numpy.core.multiarray.scalar``, ``numpy._core.multiarray.scalar``,
``numpy.dtype``, and ``_codecs.encode`` for bytes); plain values (dict, list, str, numbers, ...)
need no global. A pickle that asks for anything else (``os.system``, ``builtins.eval``, any
class) is refused with :class:`UnsafePickleError` before anything is called, and the loaded
value is checked to be made of plain values only. ``.npz`` files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import io
import math
import pickle
import re
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from phasediagram.analysis import table
from phasediagram.spec.experiment import Cell
from phasediagram.storage import safepickle

EXPERIMENT = "reference"
# The reference training settings (`example_experiment.py` and `arguments.py` of the reference repository).
REFERENCE_LR = 0.1
REFERENCE_WEIGHT_DECAY = 5e-4
# numpy scalar reconstruction (numpy 1 and 2 names) and what protocol 2 needs for bytes; nothing else.
ALLOWED_GLOBALS = safepickle.NUMPY_SCALAR_GLOBALS

_FOLDER = re.compile(r"^bs_(?P<bs>\d+)$")
_MODEL = re.compile(r"^(?P<arch>.+)_w(?P<width>\d+)$")
CKA_FILE = "CKA_mixup_alpha_16.0.pkl"


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list; nothing of it was executed."""


def _plain(value: Any, source: str) -> Any:
    """Check that `value` is made of plain values; numpy scalars become Python numbers."""
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise UnsafePickleError(f"{source}: unexpected numpy scalar of dtype {value.dtype}")
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return value
    if isinstance(value, dict):
        return {_plain(k, source): _plain(v, source) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_plain(v, source) for v in value)
    raise UnsafePickleError(f"{source}: unexpected object of type {type(value).__name__}")


def load_pickle(path: str | Path) -> Any:
    """Unpickle `path` through the allow-list (numpy scalars and plain values) and return plain Python values."""
    data = Path(path).read_bytes()
    try:
        value = safepickle.load_allowed(io.BytesIO(data), ALLOWED_GLOBALS)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"refusing to unpickle {path}: {exc}") from None
    return _plain(value, str(path))


def mode_connectivity(err) -> float:
    """mc = e_mid - e(t*), e_mid = (e(0) + e(1)) / 2, t* = argmax_t |e(t) - e_mid| (first on ties).

    `err` is the error along the curve at increasing t, endpoints first and last. mc < 0 means
    a barrier, mc > 0 that the path goes below the endpoints (they are not minima).
    """
    e = np.asarray(err, dtype=float)
    mid = (e[0] + e[-1]) / 2
    return float(mid - e[int(np.argmax(np.abs(e - mid)))])


def find_cells(root: str | Path) -> Iterator[tuple[int, int, Path]]:
    """(batch size, width, metrics folder) of every ``bs_{B}/*/<arch>_w{W}/metrics`` folder under `root`."""
    root = Path(root)
    for metrics in sorted(root.glob("**/bs_*/*/*_w*/metrics")):
        bs = _FOLDER.match(metrics.parent.parent.parent.name)
        model = _MODEL.match(metrics.parent.name)
        if bs and model and metrics.is_dir():
            yield int(bs["bs"]), int(model["width"]), metrics


def _pairs(nested: dict, value: Callable[[Any], float]) -> dict[tuple[int, int], float]:
    """{(i, j): mean of value(nested[i][j]) and value(nested[j][i])} for i < j (whichever orders exist)."""
    out: dict[tuple[int, int], list[float]] = {}
    for i, row in nested.items():
        for j, v in row.items():
            if i != j:
                out.setdefault((min(i, j), max(i, j)), []).append(float(value(v)))
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def cell_rows(metrics: Path, cell: Cell, experiment: str = EXPERIMENT) -> list[dict]:
    """All rows of one reference cell folder (see the module docstring for the mapping)."""
    rows: list[dict] = []

    def row(seed, seed_b, split, metric, value, source, coord=None, status="ok"):
        rows.append({"experiment": experiment, "cell": cell.id, **cell.as_dict(), "seed": seed, "seed_b": seed_b,
                     "split": split, "metric": metric, "coord": coord, "value": float(value), "status": status,
                     "source": source, "kind": "value"})

    seeds: list[int] = []
    for split, name in (("train", "loss_acc.pkl"), ("test", "loss_acc_test.pkl")):
        path = metrics / name
        if path.exists():
            per_seed = load_pickle(path)
            seeds = seeds or sorted(per_seed)
            for seed, vals in sorted(per_seed.items()):
                row(seed, None, split, "loss", vals["loss"], "loss_acc")
                row(seed, None, split, "acc", vals["accuracy"], "loss_acc")
        else:
            for seed in seeds or [0]:
                for q in ("loss", "acc"):
                    row(seed, None, split, q, math.nan, "loss_acc", status="missing")
    path = metrics / "hessian.pkl"
    if path.exists():
        for seed, vals in sorted(load_pickle(path).items()):
            top = vals["top_eigenvalue"]
            row(seed, None, "train", "top_abs_eigenvalue", top[0] if isinstance(top, (list, tuple)) else top,
                "hessian")
            row(seed, None, "train", "trace", vals["trace"], "hessian")
    path = metrics / "model_dist.pkl"
    if path.exists():
        for (i, j), d in _pairs(load_pickle(path)["model_distance"], lambda v: v["dist"]).items():
            row(i, j, "-", "dist", d, "dist")
    path = metrics / CKA_FILE
    if path.exists():
        sims = load_pickle(path)["representation_similarity"]
        for k, quantity in enumerate(("cka_logits", "cka_softmax")):
            for (i, j), c in _pairs(sims, lambda v, k=k: v[k]).items():
                row(i, j, "train", quantity, c, "CKA")
    path = metrics / "curve_test.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            ts = z["ts"]
            row(0, 1, "train", "mc", mode_connectivity(z["tr_err"]), "curve")
            for split, prefix in (("train", "tr"), ("test", "te")):
                for q in ("err", "loss"):
                    if f"{prefix}_{q}" in z.files:
                        for t, v in zip(ts, z[f"{prefix}_{q}"]):
                            row(0, 1, split, q, v, "curve", coord=float(t))
    return rows


def import_tree(root: str | Path, experiment: str = EXPERIMENT, lr: float = REFERENCE_LR,
                weight_decay: float = REFERENCE_WEIGHT_DECAY, train_fraction: float = 1.0,
                label_noise: float = 0.0) -> pd.DataFrame:
    """Read every reference cell folder under `root` into one normalised table (see the module docstring).

    Raises ValueError for a file of unexpected content or two folders of the same cell, and
    UnsafePickleError for a pickle that asks for more than plain values.

    `lr`, `weight_decay`, `train_fraction` and `label_noise` fill the axes the folder names do not
    state (defaults: the reference study's width x batch-size experiment).
    """
    rows, seen = [], {}
    for bs, width, metrics in find_cells(root):
        if (bs, width) in seen:
            raise ValueError(f"two result folders for batch size {bs} and width {width}: {seen[bs, width]} and "
                             f"{metrics}; import one experiment tree at a time")
        seen[bs, width] = metrics
        cell = Cell(width=width, batch_size=bs, lr=lr, weight_decay=weight_decay, train_fraction=train_fraction,
                    label_noise=label_noise)
        try:
            rows.extend(cell_rows(metrics, cell, experiment))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"{metrics}: unexpected content, not a reference result file ({exc!r})") from None
    if not rows:
        raise FileNotFoundError(f"no reference result folders (bs_*/*/*_w*/metrics) under {root}")
    return table.normalise(pd.DataFrame(rows, columns=table.COLUMNS))


def import_path(path: str | Path, **kwargs) -> pd.DataFrame:
    """:func:`import_tree` of a folder, or of a ``.tar``/``.tar.gz`` archive of one.

    An archive is extracted to a temporary folder with tarfile's ``data`` filter (no absolute
    paths, no links or files leading outside, no device files), then removed.
    """
    path = Path(path)
    if path.is_dir():
        return import_tree(path, **kwargs)
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{path} is neither a folder nor a tar archive of reference results")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
        tar.extractall(tmp, filter="data")
        return import_tree(tmp, **kwargs)


def main(argv=None) -> int:
    """``python -m phasediagram.analysis.reference RESULTS [--out results.csv] [--figure phase_plot.png]``."""
    from phasediagram.analysis import phases

    parser = argparse.ArgumentParser(prog="python -m phasediagram.analysis.reference",
                                     description="Import the reference study's published results into a results table.")
    parser.add_argument("results", help="folder (or .tar.gz) holding bs_*/*/*_w*/metrics folders")
    parser.add_argument("--out", default="reference_results.csv", help="the table to write (CSV)")
    parser.add_argument("--experiment", default=EXPERIMENT, help="experiment name for the rows")
    parser.add_argument("--figure", default=None, help="also draw the phase-diagram figure here (PNG and PDF)")
    args = parser.parse_args(argv)
    try:
        df = phases.with_phases(import_path(args.results, experiment=args.experiment))
    except (OSError, ValueError, pickle.UnpicklingError, tarfile.TarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table.write(df, Path(args.out))
    print(f"table: {args.out} ({len(df)} rows); phases: {phases.counts(phases.read_phases(df))}")
    if args.figure:
        from phasediagram.analysis.plots import phase_figure, save_figure

        print("figure: " + ", ".join(map(str, save_figure(phase_figure(df), args.figure))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
