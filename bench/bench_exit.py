"""How long a process takes to exit, with and without its live objects frozen (`runtime.freeze_alive`).

Python's exit ends with a garbage collection over every object still alive. Two processes of a
`make demo` run wait for each other's exits: the pool's workers (torch and this package imported;
the pool is shut down before the figures) and the CLI's own process (torch, pandas, matplotlib and
scipy.stats imported, a figure drawn; its exit ends the command). Each is started as a fresh
interpreter `--repeats` times per arm, alternating; it prints a line when its work is done and the
time is perf_counter from reading that line to the process's end. Medians, and their ratio.

    python bench/bench_exit.py
    python bench/bench_exit.py --write-docs   # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import report  # bench/report.py: bench/ is the script's folder, so on sys.path

WORK = {
    "pool worker": "import phasediagram.execution.jobs; from phasediagram.execution.runtime import configure_worker; configure_worker(1)",
    "CLI after its figures": (
        "import phasediagram.cli, pandas, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; "
        "from scipy import stats; fig, ax = plt.subplots(); ax.plot([1, 2, 3]); "
        "import io; fig.savefig(io.BytesIO(), format='png')"),
}
FREEZE = "from phasediagram.execution.runtime import freeze_alive; freeze_alive()"


def exit_time(code: str) -> float:
    """Seconds from the process's last line to its end."""
    proc = subprocess.Popen([sys.executable, "-c", code + "; print('done', flush=True)"], stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    start = time.perf_counter()
    if proc.wait() != 0 or line.strip() != "done":
        raise SystemExit(f"{code!r} failed")
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)
    rows = []
    for name, work in WORK.items():
        plain, frozen = [], []
        for _ in range(args.repeats):
            plain.append(exit_time(work))
            frozen.append(exit_time(f"{work}; {FREEZE}"))
        a, b = statistics.median(plain), statistics.median(frozen)
        print(f"{name:22s} exit: {a:.3f} s, frozen {b:.3f} s: {a / b:.1f}x faster ({a - b:.2f} s saved)", flush=True)
        rows.append([name, " / ".join(f"{t:.2f}" for t in plain), f"{a:.2f} s", " / ".join(f"{t:.2f}" for t in frozen),
                     f"{b:.2f} s", f"**{a / b:.1f}x** ({a - b:.2f} s saved)"])
    if args.write_docs:
        report.write_section("exit", report.command(__file__, argv), report.table(
            ["process", "exit (s)", "median", "frozen (s)", "median", "plain / frozen"], rows)
            + f"\n\nPer process {args.repeats} fresh interpreters per arm, alternating.")


if __name__ == "__main__":
    main()
