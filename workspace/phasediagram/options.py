"""What an option value read from JSON, YAML or the command line may be, checked in one place.

Option dataclasses (metrics, methods) check their fields with these predicates in
`__post_init__` and raise a `SpecError` naming the option and the allowed range.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An int (not a bool) with low <= value <= high (a bound of None is open)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


def is_real(value: Any, low: float | None = None, high: float | None = None, open_low: bool = False) -> bool:
    """A finite int or float (not a bool) with low <= value (low < value if `open_low`) <= high."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return False
    if low is not None and (value <= low if open_low else value < low):
        return False
    return high is None or value <= high
