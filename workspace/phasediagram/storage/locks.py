"""An exclusive lock between processes, for read-modify-write of a shared file (the study's spec.json).

`exclusive(path)` holds an advisory `flock` on the lock file `path` (created if absent, never
removed, so every process locks the same inode) until the block ends; a second process asking for
it waits. The lock is the open file's: it is released when the block ends or the process dies, so a
killed holder never leaves it taken. Linux emulates `flock` on NFS with byte-range locks, so the
processes of a cluster sharing a study folder exclude each other too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of `path` for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
