"""How long a short local run takes with its pool's workers forked from the fork server or spawned.

`local_pool.start_pool` starts one fork server, which imports torch, this package and torch._dynamo
(`pool_preload`) while the CLI checks the dataset, and forks each worker from it; where nothing
forks, each worker is spawned and imports torch and this package itself, and torch._dynamo when
it builds its first optimizer. On a small machine those imports share the cores with the CLI's own
start, so they delay the first jobs. This times the whole command of a short study (2 cells of 3
seeds, one epoch, training and loss_acc, table and figures) in a fresh folder, `--repeats` times
per arm, alternating, in fresh interpreters: "spawn" is this code with the fork server hidden
(`multiprocessing.get_all_start_methods` returning only "spawn"), "fork server" this code as it
runs. Medians, and their ratio.

    python bench/bench_start.py
    python bench/bench_start.py --write-docs   # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

import report  # bench/report.py: bench/ is the script's folder, so on sys.path

STUDY = ["--preset", "demo", "--widths", "2", "4", "--batch-sizes", "256", "--epochs", "1", "--metrics", "train",
         "loss_acc", "--run"]
RUN = "import sys; from phasediagram.cli import console; sys.exit(console(sys.argv[1:]))"
ARMS = {
    "spawn": "import multiprocessing; multiprocessing.get_all_start_methods = lambda: ['spawn']; " + RUN,
    "fork server": RUN,
}


def run_time(code: str) -> float:
    """Seconds of the study's command, in a fresh folder."""
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *STUDY, "--root", root], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the study failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm, code in ARMS.items():
            times[arm].append(run_time(code))
    for arm, ts in times.items():
        print(f"{arm:12s} {' / '.join(f'{t:.2f}' for t in ts)} s, median {statistics.median(ts):.2f} s", flush=True)
    a, b = (statistics.median(times[arm]) for arm in ARMS)
    print(f"fork server: {a / b:.2f}x faster ({a - b:.2f} s saved)")
    if args.write_docs:
        rows = [[arm, " / ".join(f"{t:.2f}" for t in ts), f"{statistics.median(ts):.2f} s"]
                for arm, ts in times.items()]
        report.write_section("start", report.command(__file__, argv), report.table(
            ["workers", "whole command (s)", "median"], rows)
            + f"\n\nFork server **{a / b:.2f}x** faster: {a - b:.2f} s saved per run ({args.repeats} runs per arm, "
            "alternating).")


if __name__ == "__main__":
    main()
