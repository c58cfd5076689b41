"""What an option value read from JSON, YAML or the command line may be, checked in one place.

Each field of an option dataclass (metrics, methods) declares its rule with one of the field
constructors below, which keep it in the field's metadata:

    top_k: int = integer(1, low=1)                     # an integer >= 1
    batch_size: int | None = integer(200, low=1, optional=True)   # ... or null
    tol: float = real(1e-3, low=0, high=1, open_low=True)         # a number in (0, 1]
    linear: bool = flag(True)                          # true or false
    pairs: str = choice("all", ("all", "adjacent", "first"))
    splits: tuple[str, ...] = subset(("train",), ("train", "test"))
    layers: tuple[str, ...] = rule((), predicate, "a list of module names")   # anything else

and its `__post_init__` calls `validate(self, group)`, which raises a `SpecError` naming
`<group>.<field>` and the allowed values for the first field its rule rejects. Checks that compare
one option with another stay in `__post_init__`, after `validate`, and raise `out_of_range(...)`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from phasediagram.errors import SpecError

RULE = "phasediagram.rule"  # the metadata key of a field's Rule


def is_int(value: Any, low: int | None = None, high: int | None = None) -> bool:
    """An int (not a bool) with low <= value <= high (a bound of None is open)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and (low is None or value >= low) and (high is None or value <= high))


def is_real(value: Any, low: float | None = None, high: float | None = None, open_low: bool = False,
            open_high: bool = False) -> bool:
    """A finite int or float (not a bool) with low <= value <= high (low < value if `open_low`, value < high
    if `open_high`; a bound of None is open)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return False
    if low is not None and (value <= low if open_low else value < low):
        return False
    return high is None or (value < high if open_high else value <= high)


@dataclass(frozen=True)
class Rule:
    """What one option accepts: `accepts(value)` says whether, `allowed` says what in words.

    `kind` is "integer", "real", "flag", "choice", "subset" or "other" (a predicate of its own). Numeric
    rules keep their bounds (`low`, `high`, strict where `open_low`/`open_high`), choices and subsets
    their `choices`, and `optional` says that None is accepted too.
    """

    kind: str
    allowed: str
    accepts: Callable[[Any], bool]
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False
    choices: tuple = ()


def _bounded(noun: str, low, high, open_low: bool, open_high: bool) -> str:
    if low is None and high is None:
        return noun
    if high is None:
        return f"{noun} {'>' if open_low else '>='} {low:g}"
    if low is None:
        return f"{noun} {'<' if open_high else '<='} {high:g}"
    return f"{noun} in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"


def _text(text: str, optional: bool = False, note: str = "") -> str:
    return text + (" or null" if optional else "") + (f" ({note})" if note else "")


def _field(default: Any, rule: Rule):
    return dataclasses.field(default=default, metadata={RULE: rule})


def integer(default: int | None, low: int | None = None, high: int | None = None, optional: bool = False,
            note: str = ""):
    """A field holding an int (not a bool) with low <= value <= high, or None if `optional`.

    Allowed text e.g. "an integer >= 1", "an integer in [1, 64]", "an integer >= 1 or null"; `note`
    is added in parentheses ("an integer >= 0 (0: all)")."""
    return _field(default, Rule("integer", _text(_bounded("an integer", low, high, False, False), optional, note),
                                lambda v: (optional and v is None) or is_int(v, low, high),
                                low, high, False, False, optional))


def real(default: float | None, low: float | None = None, high: float | None = None, open_low: bool = False,
         open_high: bool = False, optional: bool = False, note: str = ""):
    """A field holding a finite int or float (not a bool) with low <= value <= high (strict where
    `open_low`/`open_high`), or None if `optional`.

    Allowed text e.g. "a number >= 0", "a number > 0", "a number in (0, 1]", "a number > 0 or null"."""
    return _field(default, Rule("real", _text(_bounded("a number", low, high, open_low, open_high), optional, note),
                                lambda v: (optional and v is None) or is_real(v, low, high, open_low, open_high),
                                low, high, open_low, open_high, optional))


def flag(default: bool):
    """A field holding a bool: "true or false" (not 0, 1 or a string)."""
    return _field(default, Rule("flag", "true or false", lambda v: isinstance(v, bool)))


def choice(default: str | None, choices: tuple[str, ...], optional: bool = False):
    """A field holding one of `choices` (a tuple of strings), or None if `optional`:
    "one of 'gap', 'residual', 'change'"."""
    choices = tuple(choices)
    return _field(default, Rule("choice", _text("one of " + ", ".join(map(repr, choices)), optional),
                                lambda v: (optional and v is None) or v in choices,
                                optional=optional, choices=choices))


def subset(default: tuple[str, ...], choices: tuple[str, ...]):
    """A field holding a non-empty list or tuple of distinct values from `choices` (a tuple of strings):
    "a non-empty list of distinct values from 'train', 'test'". The option class makes it a tuple."""
    choices = tuple(choices)

    def accepts(v) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) >= 1 and all(s in choices for s in v)
                and len(set(v)) == len(v))

    return _field(default, Rule("subset", "a non-empty list of distinct values from " + ", ".join(map(repr, choices)),
                                accepts, choices=choices))


def rule(default: Any, accepts: Callable[[Any], bool], allowed: str):
    """A field whose values `accepts(value)` decides, `allowed` describing them in words."""
    return _field(default, Rule("other", allowed, accepts))


def rules(options) -> dict[str, Rule | None]:
    """The rule of every field of an option dataclass (or instance), None where a field declares none."""
    return {f.name: f.metadata.get(RULE) for f in dataclasses.fields(options)}


def out_of_range(name: str, value: Any, allowed: str) -> SpecError:
    """The error for an option `name` ("<group>.<field>") whose `value` is not `allowed`."""
    return SpecError(name, f"{value!r} is out of range (allowed: {allowed})")


def validate(options, group: str) -> None:
    """Check every field of the option dataclass instance `options` against its rule, in declaration
    order; raise `out_of_range(f"{group}.{field}", ...)` for the first value its rule rejects."""
    for name, r in rules(options).items():
        value = getattr(options, name)
        if r is not None and not r.accepts(value):
            raise out_of_range(f"{group}.{name}", value, r.allowed)
