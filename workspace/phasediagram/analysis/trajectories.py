"""The tracked trajectories of a study as one tidy table (`collect`).

Columns: experiment, cell, width, batch_size, lr, weight_decay, train_fraction, label_noise, seed,
status (the run's: "running", "ok" or "diverged"), step, epoch, quantity, value; one row per
(cell, seed, step, quantity), as `training.tracking` measured them. Only the runs of the spec's
grid and seeds whose trajectory file was written under the spec's training settings are read.
"""

from __future__ import annotations

import pandas as pd

from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout
from phasediagram.training.tracking import COLUMNS, load_trajectory

CELL_COLUMNS = ("width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise")
TABLE_COLUMNS = ("experiment", "cell", *CELL_COLUMNS, "seed", "status", *COLUMNS)
SORT = [*CELL_COLUMNS, "seed", "quantity", "step"]


def collect(spec: ExperimentSpec, layout: Layout) -> pd.DataFrame:
    """Every tracked row of the spec's runs (module docstring); an empty table with the columns when none."""
    frames = []
    for cell in spec.cells():
        for seed in spec.seeds:
            data = load_trajectory(layout.trajectory_path(cell, seed))
            if data is None or data.get("training_hash") != spec.training_hash() or not data["rows"]:
                continue
            frame = pd.DataFrame(data["rows"], columns=list(COLUMNS))
            about = {"experiment": spec.name, "cell": cell.id, **cell.as_dict(), "seed": seed,
                     "status": data["status"]}
            frames.append(frame.assign(**about))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in TABLE_COLUMNS})
    df = pd.concat(frames, ignore_index=True)[list(TABLE_COLUMNS)]
    df["value"] = pd.to_numeric(df["value"]).astype("float64")
    return df.sort_values(SORT, kind="stable").reset_index(drop=True)
