"""The registries as tables: what `--list-metrics` and `--list-methods` print and README shows.

Each table is Markdown, one row per registry entry, in registry order; the text is the entry's
own `description`, so a new entry appears in all three places with nothing else to edit
(`scripts/readme_tables.py` rewrites README's copies). `outputs_table` lists a study's files
(`storage.layout.OUTPUTS`).
"""

from __future__ import annotations

from phasediagram.methods import OPTIMIZERS, REGULARIZERS
from phasediagram.metrics import METRICS
from phasediagram.storage.layout import OUTPUTS


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def metric_table() -> str:
    """| metric | of | what it measures |, one row per registered metric."""
    rows = ["| metric | of | what it measures |", "|---|---|---|"]
    for name, entry in METRICS.items():
        of = "one model" if entry.kind == "single" else "a seed pair"
        rows.append(f"| `{name}` | {of} | {_cell(entry.description)} |")
    return "\n".join(rows) + "\n"


def method_table() -> str:
    """| flag | method |, one row per registered optimizer and regularizer."""
    rows = ["| flag | method |", "|---|---|"]
    for flag, registry in (("--optimizer", OPTIMIZERS), ("--regularizer", REGULARIZERS)):
        for name, entry in registry.items():
            rows.append(f"| `{flag} {name}` | {_cell(entry.description)} |")
    return "\n".join(rows) + "\n"


def outputs_table() -> str:
    """| path under the root | what it holds |, one row per entry of `storage.layout.OUTPUTS`."""
    rows = ["| path under the root | what it holds |", "|---|---|"]
    rows += [f"| `{_cell(path)}` | {_cell(what)} |" for path, what in OUTPUTS]
    return "\n".join(rows) + "\n"
