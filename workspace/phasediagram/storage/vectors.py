"""Named parameter-space vectors with one number each, in a numpy .npz file (no pickle).

A file holds groups (a direction, an eigenvector), each a {parameter name: array} shaped like the
model's parameters, and one scalar per group (its eigenvalue; NaN where none applies). Arrays are
stored as "<group>/<parameter>" in float64 and scalars as "value/<group>" (0-d); reading uses
`allow_pickle=False`, so a file can hold nothing but arrays.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from phasediagram.storage.checkpoints import atomic_write_bytes

VALUE = "value"


def save_vectors(path: str | Path, groups: Mapping[str, Mapping[str, torch.Tensor]],
                 values: Mapping[str, float]) -> None:
    """Write {group: {parameter: tensor}} and {group: value} atomically (`atomic_write_bytes`)."""
    if VALUE in groups or any("/" in g for g in groups):
        raise ValueError(f"group names may not be {VALUE!r} or contain '/': {sorted(groups)}")
    arrays = {f"{group}/{name}": t.detach().to(torch.float64).cpu().numpy()
              for group, tensors in groups.items() for name, t in tensors.items()}
    arrays.update({f"{VALUE}/{group}": np.float64(v) for group, v in values.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_vectors(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """({group: {parameter: array}}, {group: value}) from a `save_vectors` file."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    values: dict[str, float] = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            group, _, rest = name.partition("/")
            if group == VALUE:
                values[rest] = float(npz[name])
            else:
                groups.setdefault(group, {})[rest] = npz[name]
    return groups, values
