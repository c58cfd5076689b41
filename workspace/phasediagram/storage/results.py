"""Per-job result files: small JSON documents, written atomically, validated on read.

    {"format": "phasediagram-result/1", "experiment": name, "training_hash": h, "stage": s,
     "cell": id, "options": {...}, "checkpoints": {path: digest}, "rows": [...],
     "sha256": sha256(canonical rows)}

`checkpoints` names the checkpoint files the rows were computed from (paths relative to the
experiment folder) with the digest each file's header held then (`checkpoints.digest`). A result
counts as done only if it parses, its checksum matches, and it was made for this experiment, these
training settings (training hash), these metric options and the checkpoint files now on disk; a
corrupt file is moved aside and its job redone.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from phasediagram.errors import CorruptFile
from phasediagram.spec.experiment import Cell
from phasediagram.storage.checkpoints import atomic_write_json, digest, quarantine

FORMAT = "phasediagram-result/1"
ROW_KEYS = ("experiment", "cell", "width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise",
            "seed", "seed_b", "split", "metric", "coord", "value", "status", "source")
ROW_STATUSES = ("ok", "diverged", "missing")


def make_row(experiment: str, cell: Cell, seed: int, seed_b: int | None, split: str, metric: str,
             coord: float | None, value: float, status: str, source: str) -> dict[str, Any]:
    return {"experiment": experiment, "cell": cell.id, **cell.as_dict(), "seed": seed, "seed_b": seed_b,
            "split": split, "metric": metric, "coord": coord, "value": value, "status": status, "source": source}


def _canonical(rows: list[dict]) -> bytes:
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    return json.dumps(clean, sort_keys=True, allow_nan=True).encode()


def write(path: Path, *, experiment: str, training_hash: str, stage: str, cell: Cell, options: dict,
          checkpoints: dict[str, str | None], rows: list[dict]) -> None:
    for r in rows:
        if set(r) != set(ROW_KEYS):
            raise ValueError(f"row keys {sorted(r)} differ from {sorted(ROW_KEYS)}")
        if r["status"] not in ROW_STATUSES:
            raise ValueError(f"row status {r['status']!r} not in {ROW_STATUSES}")
    doc = {"format": FORMAT, "experiment": experiment, "training_hash": training_hash, "stage": stage,
           "cell": cell.id, "options": options, "checkpoints": checkpoints, "rows": rows,
           "sha256": hashlib.sha256(_canonical(rows)).hexdigest()}
    atomic_write_json(path, doc)


def read(path: Path) -> dict:
    """Parse and checksum-verify a result file; raise CorruptFile if it is damaged or foreign."""
    try:
        doc = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(path, f"not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("rows"), list):
        raise CorruptFile(path, f"not a {FORMAT} document")
    rows = doc["rows"]
    if not all(isinstance(r, dict) and set(r) == set(ROW_KEYS) for r in rows):
        raise CorruptFile(path, "rows do not have the expected columns")
    if hashlib.sha256(_canonical(rows)).hexdigest() != doc.get("sha256"):
        raise CorruptFile(path, "checksum mismatch (truncated or corrupted)")
    return doc


def is_current(path: Path, *, experiment: str, training_hash: str, stage: str, cell: Cell, options: dict,
               checkpoints: dict[str, str | None], log=print) -> bool:
    """True if `path` holds a valid result of this job; a corrupt file is reported and moved aside."""
    if not path.exists():
        return False
    try:
        doc = read(path)
    except CorruptFile as exc:
        moved = quarantine(path)
        log(f"warning: {exc}; moved aside to {moved.name}, the job will be redone")
        return False
    return (doc["experiment"] == experiment and doc["training_hash"] == training_hash and doc["stage"] == stage
            and doc["cell"] == cell.id and doc["options"] == json.loads(json.dumps(options))
            and doc.get("checkpoints") == checkpoints)


def changed_checkpoints(doc: dict, exp_dir: Path) -> list[str]:
    """The checkpoint files a result was computed from that are no longer the same on disk."""
    recorded = doc.get("checkpoints")
    if not isinstance(recorded, dict):
        return ["(none recorded)"]
    return [rel for rel, d in sorted(recorded.items()) if digest(Path(exp_dir) / rel) != d]
