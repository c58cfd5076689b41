"""Reading a spec file (JSON or YAML) as plain data, within limits a spec never comes near.

A spec is a small mapping: at most `MAX_BYTES` of text, nested at most `MAX_DEPTH` levels. A
file beyond either is refused before it is parsed into objects, so no input can exhaust the
recursion limit or the memory. YAML anchors and aliases are refused (one alias can stand for a
tree that doubles at every level), and so are duplicate keys in a mapping (YAML and JSON parsers
otherwise keep the last one silently).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from phasediagram.errors import SpecError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32


def read_spec_file(path: str | Path) -> Any:
    """The data of a .json, .yaml or .yml spec file, within the limits above; `SpecError` otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SpecError("spec file", f"{path} is {size} bytes; a spec file has at most {MAX_BYTES}")
        text = path.read_text()
    except OSError as exc:
        raise SpecError("spec file", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError("spec file", f"{path} is not a text file (expected JSON or YAML)") from None
    if path.suffix == ".json":
        return _json(path, text)
    return _yaml(path, text)


def _json(path: Path, text: str) -> Any:
    depth = _bracket_depth(text)
    if depth > MAX_DEPTH:
        raise SpecError("spec file", f"{path} nests {depth} levels deep; a spec has at most {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _unique(path, pairs))
    except json.JSONDecodeError as exc:
        raise SpecError("spec file", f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _unique(path: Path, pairs: list[tuple[Any, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:
        raise SpecError("spec file", f"{path} repeats the key(s) {repeated[:5]} in one mapping")
    return dict(pairs)


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the spec's limits: no aliases, no duplicate keys, bounded depth."""

    depth = 0
    path: Path = Path("spec")

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError("spec file", f"{self.path} uses the alias *{event.anchor} (line {event.start_mark.line + 1})"
                                         "; anchors and aliases are not allowed in a spec")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise SpecError("spec file", f"{self.path} nests more than {MAX_DEPTH} levels deep (line "
                                             f"{mark.line + 1}); a spec has at most {MAX_DEPTH}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise SpecError("spec file", f"{self.path} repeats the key {key!r} (line "
                                                 f"{key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml(path: Path, text: str) -> Any:
    loader = None
    try:
        loader = _SpecLoader(text)
        loader.path = path
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError("spec file", f"{path} is not valid YAML: {first}") from None
    finally:
        if loader is not None:
            loader.dispose()
