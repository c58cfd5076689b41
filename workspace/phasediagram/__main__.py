"""The command line as a process: `python -m phasediagram`, the `phasediagram` script and
example_experiment.py run `console`, which imports the command line (`cli`, with torch, pandas and
matplotlib: seconds) and runs it. Ctrl-C at any moment ends it as Ctrl-C during a run does
(`cli.main`): the line "interrupted: rerun the same command to resume" and exit status 130. Ctrl-C
while `cli` is imported is held until the imports are done: libraries that catch what their own
imports raise would otherwise be left half imported, failing later with another traceback."""

from __future__ import annotations

import signal
import sys

from phasediagram.errors import INTERRUPTED


def console(argv=None) -> int:
    """`cli.console(argv)`: the command's exit status; 130 after Ctrl-C while `cli` was imported."""
    came = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        from phasediagram import cli
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return cli.console(argv)


if __name__ == "__main__":
    sys.exit(console())
