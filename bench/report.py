"""Writes a benchmark's figures into docs/performance.md, between the page's marker lines for it.

Each benchmark run with `--write-docs` builds its result tables as markdown from the values it
measured and calls `write_section`, which replaces everything between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` with the command that printed the figures and the tables; the rest of the
page is left byte for byte as it was. The page is written atomically (a temporary file in its
folder, then `os.replace`).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
FLAG = "--write-docs"


def markers(name: str) -> tuple[str, str]:
    """The opening and closing marker lines of section `name`."""
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def command(script: str, argv: list[str] | None = None) -> str:
    """The command line that ran `script` (a bench/ file) with `argv` (default: this process's arguments),
    as `python bench/<file>.py ...`, without `--write-docs` (which changes no figure)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"bench/{Path(script).name}", *(a for a in args if a != FLAG)])


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the lines between the markers of `name` replaced by `body`."""
    start, end = markers(name)
    lines = text.splitlines(keepends=True)
    opens = [i for i, line in enumerate(lines) if line.strip() == start]
    closes = [i for i, line in enumerate(lines) if line.strip() == end]
    if not opens or not closes:
        raise KeyError(f"no section {name!r} in the page: it needs the lines {start} and {end}")
    if len(opens) > 1 or len(closes) > 1 or closes[0] < opens[0]:
        raise ValueError(f"section {name!r}: expected one {start} followed by one {end}")
    i, j = opens[0], closes[0]
    return "".join(lines[:i + 1]) + body.rstrip("\n") + "\n" + "".join(lines[j:])


def write_section(name: str, command: str, markdown: str, path: Path | str = DOCS) -> None:
    """Replace section `name` of the page at `path` with "`command`" and `markdown` (atomically)."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:  # newline="": line endings kept as they are
        text = f.read()
    new = replace_section(text, name, f"`{command}`\n\n{markdown.strip()}\n")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(new)
        os.chmod(tmp, path.stat().st_mode & 0o7777)  # mkstemp's file is private; keep the page's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote section {name!r} of {path}", flush=True)
