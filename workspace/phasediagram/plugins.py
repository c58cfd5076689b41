"""A model family or dataset named by import path: `"package.module:function"`.

A spec's `arch` or `dataset` may be a registered name (`mlp`, `mnist1d`, ...) or an import path,
`module:attribute` with dotted Python identifiers on both sides. `load_object` imports the module
(running its code, as `python -m` would: a spec that names a module is as trusted as that module)
and returns the attribute, which must be callable; `call` runs it. Every failure is a `SpecError`
naming the field, the import path and the reason, a user's `sys.exit()` included: the command
ends with that one line and exit status 2 rather than with the status the plug-in chose.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from phasediagram.errors import SpecError

_IDENTIFIERS = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
IMPORT_PATH = re.compile(rf"^{_IDENTIFIERS}:{_IDENTIFIERS}$")
MAX_LENGTH = 200


def is_import_path(text: Any) -> bool:
    """Whether `text` is spelled `module:attribute` (dotted identifiers, at most 200 characters)."""
    return isinstance(text, str) and len(text) <= MAX_LENGTH and IMPORT_PATH.match(text) is not None


def load_object(field_name: str, path: str) -> Callable:
    """The callable `path` ("module:attribute") names; `SpecError(field_name, ...)` saying which
    module or attribute failed and why otherwise."""
    if not is_import_path(path):
        raise SpecError(field_name, f"{path!r} is not an import path (module:function)")
    module_name, attribute = path.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # the module's own code may raise anything while it is imported
        raise SpecError(field_name, f"{path}: cannot import module {module_name!r} ({_reason(exc)})") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise SpecError(field_name, f"{path}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(field_name, f"{path}: {attribute!r} is a {type(obj).__name__}, not a function")
    return obj


def call(field_name: str, what: str, fn: Callable, *args, **kwargs) -> Any:
    """fn(*args, **kwargs) for a plug-in's function (user code): what it raises, or a `sys.exit()` it
    calls, becomes `SpecError(field_name, "<what> raised <reason>")`; a `SpecError` passes unchanged, and
    KeyboardInterrupt is the user's Ctrl-C, left to the caller."""
    try:
        return fn(*args, **kwargs)
    except SpecError:
        raise
    except (Exception, SystemExit) as exc:
        raise SpecError(field_name, f"{what} raised {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r}), which a plug-in must not"
    return f"{type(exc).__name__}: {exc}"
