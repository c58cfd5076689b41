"""The package's layers: every module imports only from its own layer or the ones below, with no circle.

`LAYERS` lists the layers bottom to top (the data flow of README's architecture section). Two
checks: the imports written in every module (top-level and deferred, read from its source) point
down or sideways and form no circle; and every module imported alone in a fresh interpreter loads
no module above its layer (third-party libraries are imported first, then the interpreter forks
once per module, so each import starts with no phasediagram module loaded).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import phasediagram

PACKAGE = Path(phasediagram.__file__).parent
LAYERS = (
    ("errors", "seeding", "options", "plugins"),
    ("spec",),
    ("storage",),
    ("data", "models"),
    ("numerics",),
    ("accel",),
    ("metrics", "methods"),
    ("resolve", "catalog", "measure"),
    ("training",),
    ("execution",),
    ("analysis",),
    ("study", "diagnosis", "failure"),
    ("cli", "__main__"),
)
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names.append(".".join(("phasediagram", *parts)))
    return names


def source_of(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def layer(module: str) -> int:
    return LAYER_OF[module.split(".")[1]]


def imported(module: str, known: set[str]) -> set[str]:
    """The phasediagram modules `module`'s source imports, wherever the import statement stands."""
    tree = ast.parse(source_of(module).read_text())
    package = module if source_of(module).name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("phasediagram.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base != "phasediagram" and not base.startswith("phasediagram."):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m != "phasediagram" and m != module}


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in module_names() if m.split(".")[1] not in LAYER_OF]
    assert not unplaced, f"modules outside LAYERS: {unplaced}"


def test_written_imports_point_down_and_form_no_circle():
    known = set(module_names())
    graph = {m: imported(m, known) for m in known}
    upward = [(m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m)]
    assert not upward, f"imports from a higher layer: {upward}"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail(f"import circle: {' -> '.join([*path[path.index(t):], t])}")
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(known):
        if m not in state:
            visit(m, [m])


FORK_IMPORTS = textwrap.dedent("""
    import importlib, json, os, sys
    import matplotlib, matplotlib.figure, numpy, pandas, scipy, scipy.stats, submitit, torch, tqdm, yaml
    import torch._dynamo, torch.func, torch.optim  # third-party first: each fork starts from here
    out = {}
    for name in json.loads(sys.argv[1]):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                report = {"loaded": sorted(m for m in sys.modules if m.startswith("phasediagram"))}
            except BaseException as exc:
                report = {"error": repr(exc)}
            os.write(write, json.dumps(report).encode())
            os._exit(0)
        os.close(write)
        data = b""
        while chunk := os.read(read, 1 << 16):
            data += chunk
        os.close(read)
        os.waitpid(pid, 0)
        out[name] = json.loads(data)
    print(json.dumps(out))
""")


def test_each_module_imports_alone_and_loads_nothing_above_its_layer():
    names = ["phasediagram", *module_names()]
    proc = subprocess.run([sys.executable, "-c", FORK_IMPORTS, json.dumps(names)], capture_output=True, text=True,
                          timeout=300, check=True)
    reports = json.loads(proc.stdout)
    failed = {m: r["error"] for m, r in reports.items() if "error" in r}
    assert not failed, failed
    assert reports["phasediagram"]["loaded"] == ["phasediagram"], "importing the package loads a submodule"
    above = {m: [x for x in r["loaded"] if x != "phasediagram" and layer(x) > layer(m)]
             for m, r in reports.items() if m != "phasediagram"}
    assert not {m: x for m, x in above.items() if x}, above
