"""The registry tables: `--list-metrics`, `--list-methods` and README's copies come from the registries; README's
list of outputs comes from `storage.layout.OUTPUTS`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phasediagram import cli
from phasediagram.catalog import method_table, metric_table, outputs_table
from phasediagram.methods import OPTIMIZERS, REGULARIZERS
from phasediagram.metrics import METRICS
from phasediagram.storage.layout import FIGURES, OUTPUTS, Layout

ROOT = Path(__file__).resolve().parents[1]


def test_tables_hold_one_row_per_entry():
    metric_rows = metric_table().splitlines()[2:]
    assert [row.split("`")[1] for row in metric_rows] == list(METRICS)
    method_rows = method_table().splitlines()[2:]
    assert len(method_rows) == len(OPTIMIZERS) + len(REGULARIZERS)
    assert all(row.count(" | ") == 1 for row in method_rows)  # pipes inside descriptions are escaped


def test_the_cli_lists_the_registries(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--list-metrics"]) == 0
    assert capsys.readouterr().out == metric_table()
    assert cli.main(["--list-methods"]) == 0
    assert capsys.readouterr().out == method_table()
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_readme_tables_are_the_registries_and_readme_is_short():
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), "--check"])
    assert check.returncode == 0, "README's tables are stale: run python scripts/readme_tables.py"
    text = (ROOT / "README.md").read_text()
    assert metric_table() in text and method_table() in text and outputs_table() in text
    assert len(text.encode()) <= 12_000


def test_the_outputs_list_declares_every_figure_the_study_writes(tmp_path):
    assert len(outputs_table().splitlines()) == 2 + len(OUTPUTS)
    assert all(any(path.startswith(f"checkpoint/<name>/{stem}.") for path, _ in OUTPUTS) for stem in FIGURES)
    layout = Layout(tmp_path, "s")
    assert layout.figure_path("phase_map", ".pdf") == layout.exp_dir / "phase_map.pdf"
    with pytest.raises(ValueError, match="not one of the declared figures"):
        layout.figure_path("undeclared", ".png")


def test_the_top_level_help_lists_every_command(capsys):
    """`phasediagram --help` (python example_experiment.py --help) names every command main dispatches to."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert cli.COMMANDS and all(f"  {name}: " in text for name in cli.COMMANDS)
