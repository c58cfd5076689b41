"""Seeds derived from names, the same in every process and Python version."""

from __future__ import annotations

import hashlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed: the first 8 bytes (little-endian) of SHA-256(repr(parts)), top bit cleared."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
