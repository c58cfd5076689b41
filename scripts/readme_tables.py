"""Rewrite README.md's registry tables and its list of outputs from the code (`phasediagram.catalog`).

    python scripts/readme_tables.py          # rewrite them in place
    python scripts/readme_tables.py --check  # exit 1 if README's copies differ

Each table sits between `<!-- NAME table -->` and `<!-- end NAME table -->`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from phasediagram.catalog import method_table, metric_table, outputs_table

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = {"metrics": metric_table, "methods": method_table, "outputs": outputs_table}


def rendered(text: str) -> str:
    for name, table in TABLES.items():
        pattern = re.compile(rf"(<!-- {name} table -->\n).*?(<!-- end {name} table -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no '<!-- {name} table -->' block")
        text = pattern.sub(lambda m: m.group(1) + table() + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    new = rendered(text)
    if args.check:
        return int(new != text)
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
