"""Self-describing, checksummed checkpoints and atomic file writes.

File format: the 8-byte magic `PDCKPT1\\n`, the 32-byte SHA-256 of the payload, then the payload,
which is `torch.save` of a dict of tensors and plain values (loaded with `weights_only=True`, so
no pickle code ever runs). A truncated, corrupted or foreign file raises `CorruptFile` naming its
path; `quarantine` moves such a file aside so the job that makes it is redone.

A checkpoint dict holds: model (state_dict), model_args, cell, seed, epoch, history, status
("running" | "ok" | "diverged"), and for resumable training also `trainer` (optimizer state).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from phasediagram.errors import CorruptFile

MAGIC = b"PDCKPT1\n"
STATUSES = ("running", "ok", "diverged")



TEMP_SUFFIX = ".tmp"  # of the temporary files `atomic_write_bytes` writes: .<name>~<host>~<pid>~<random>.tmp
HOST = socket.gethostname().replace("~", "_")


def temp_writer(path: str | os.PathLike) -> tuple[str, int] | None:
    """(host, pid) of the process that wrote temporary file `path` (`atomic_write_bytes`), or None
    for a file of another name."""
    name = Path(path).name
    parts = name[:-len(TEMP_SUFFIX)].split("~") if name.startswith(".") and name.endswith(TEMP_SUFFIX) else []
    if len(parts) < 4 or not parts[-2].isdigit():
        return None
    return parts[-3], int(parts[-2])


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, fsync it, then `os.replace` it onto `path`.

    Readers see either the old file or the whole new one, never a partial write. On any error
    (e.g. a full disk) the temporary file is removed and the old file is left intact. The file gets
    the permissions of an ordinary new file under the process's umask (0o666 & ~umask), not the
    private 0o600 of a temporary file, so a lab sharing a study folder can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}~{HOST}~{os.getpid()}~", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode())


def save(path: str | os.PathLike, checkpoint: dict) -> None:
    """Write `checkpoint` atomically with its checksum."""
    status = checkpoint.get("status")
    if status not in STATUSES:
        raise ValueError(f"checkpoint status must be one of {STATUSES}, got {status!r}")
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint; raise `CorruptFile` if it is truncated, altered or foreign."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise CorruptFile(path, "not a phasediagram checkpoint (bad header or truncated)")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptFile(path, "checksum mismatch (truncated or corrupted)")
    try:
        ckpt = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a payload whose checksum matches but torch cannot read
        raise CorruptFile(path, f"unreadable payload ({type(exc).__name__})") from None
    for key in ("model", "model_args", "cell", "seed", "epoch", "status"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise CorruptFile(path, f"missing key {key!r}")
    return ckpt


def digest(path: str | os.PathLike) -> str | None:
    """The SHA-256 of the payload of checkpoint `path` as its header records it (hex), or None if
    there is no such file or it has no checkpoint header; reads only the header."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 32)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    if len(head) < len(MAGIC) + 32 or not head.startswith(MAGIC):
        return None
    return head[len(MAGIC):].hex()


def quarantine(path: str | os.PathLike) -> Path:
    """Move a bad file aside to `<name>.corrupt[.N]` (kept for inspection) and return the new path."""
    path = Path(path)
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt.{n}")
        n += 1
    os.replace(path, target)
    return target
