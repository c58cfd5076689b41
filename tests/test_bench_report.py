"""bench/report.py writes one marked block of docs/performance.md; every benchmark has its block and flag."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
BENCHES = sorted((ROOT / "bench").glob("bench_*.py"))


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = load_report()

PAGE_TEXT = """# Title

intro, with a marker-like line inside prose: <!-- bench:a --> is not alone on its line

<!-- bench:a -->
old a
table a
<!-- /bench:a -->

between\r
<!-- bench:b -->
old b
<!-- /bench:b -->
tail without newline"""


def test_write_section_replaces_exactly_one_block(tmp_path):
    page = tmp_path / "performance.md"
    page.write_bytes(PAGE_TEXT.encode())
    report.write_section("a", "python bench/bench_a.py --repeats 3", "| x |\n|---|\n| 1 |\n", path=page)
    new = page.read_bytes().decode()
    block = "<!-- bench:a -->\n`python bench/bench_a.py --repeats 3`\n\n| x |\n|---|\n| 1 |\n<!-- /bench:a -->\n"
    before, after = PAGE_TEXT.split("<!-- bench:a -->\nold a\ntable a\n<!-- /bench:a -->\n")
    assert new == before + block + after  # everything outside the block byte for byte as it was
    assert [p.name for p in tmp_path.iterdir()] == ["performance.md"]  # no temporary file left
    report.write_section("a", "python bench/bench_a.py", "again", path=page)
    assert page.read_text().count("<!-- bench:a -->") == 2  # the prose's mention and the marker line
    assert "again" in page.read_text() and "| 1 |" not in page.read_text()


def test_an_unknown_or_broken_marker_is_refused_by_name(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(PAGE_TEXT)
    with pytest.raises(KeyError, match="nosuch"):
        report.write_section("nosuch", "python bench/bench_nosuch.py", "x", path=page)
    page.write_text("<!-- /bench:c -->\n<!-- bench:c -->\n")
    with pytest.raises(ValueError, match="'c'"):
        report.write_section("c", "python bench/bench_c.py", "x", path=page)
    assert page.read_text() == "<!-- /bench:c -->\n<!-- bench:c -->\n"


def test_the_command_is_the_one_run_without_the_flag():
    assert (report.command("/x/bench/bench_hessian.py", ["--repeats", "3", "--write-docs"])
            == "python bench/bench_hessian.py --repeats 3")
    assert report.command("bench_demo.py", ["--", "--epochs", "5"]) == "python bench/bench_demo.py -- --epochs 5"


def test_every_benchmark_writes_its_own_block_of_the_page():
    assert BENCHES
    lines = [line.strip() for line in PAGE.read_text().splitlines()]
    for bench in BENCHES:
        name = bench.stem.removeprefix("bench_")
        source = bench.read_text()
        assert '"--write-docs"' in source, f"{bench.name} has no --write-docs"
        assert f'write_section("{name}"' in source, f"{bench.name} does not write section {name!r}"
        start, end = report.markers(name)
        assert lines.count(start) == 1 and lines.count(end) == 1, f"docs/performance.md lacks the markers of {name}"
        assert lines.index(start) < lines.index(end)
