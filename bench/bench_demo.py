"""The demo's whole run as `make demo` runs it, with sequential training against the default ensemble policy.

Each run is the one command `make demo` runs, `example_experiment.py --preset demo --run --plot`
(one worker pool for training and metrics, a cell's metrics starting when its training ends, then
the table and the figures), plus `--ensemble MODE` and `--root TMP`, started through `subprocess`
with an argument list in a fresh temporary folder (its own MNIST-1D generation included) and
timed as a whole with time.perf_counter. Modes (`--modes`): "off" trains and measures every seed
on its own (`--ensemble off`), "auto" uses the default ensemble policy (`--ensemble auto`, the
speed flag). The modes alternate, `--repeats` times; printed per mode the wall times and their
median, and the ratio of the medians auto / off. Extra spec flags after `--` are passed to every
run (after `--preset demo`).

With `--compare` (and both modes), the two results tables of the last repeat are compared row by
row (same cell, seed, split, metric): the largest |off - auto| per metric. In float64 each member
equals its sequential run up to rounding (tested); in float32 small models trained at the demo's
learning rates are chaotic, so rounding differences give statistically equivalent but different
runs, and per-seed values differ. Then, per cell, the largest |off - auto| test accuracy of a seed
against the spread of the cell's seeds in the off run.

    python bench/bench_demo.py                                  # off and auto, once each
    python bench/bench_demo.py --repeats 3 --modes auto         # the default policy alone
    python bench/bench_demo.py --repeats 1 --compare -- --epochs 5   # extra spec flags after --
    python bench/bench_demo.py --write-docs                     # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report  # bench/report.py: bench/ is the script's folder, so on sys.path

from phasediagram import cli

REPO = Path(__file__).resolve().parent.parent
MODES = ("off", "auto")


def run_demo(mode: str, root: Path, extra: list[str], workers: int | None) -> float:
    """Seconds of `example_experiment.py --preset demo EXTRA --ensemble MODE --root ROOT --run --plot` in `root`."""
    cmd = [sys.executable, str(REPO / "example_experiment.py"), "--preset", "demo", *extra, "--ensemble", mode,
           "--root", str(root), "--run", "--plot"]
    if workers:
        cmd += ["--workers", str(workers)]
    root.mkdir(parents=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


SAME_SGD = ("The two policies run the same SGD with float32 sums in another order (equal to 1e-6 in float64, "
            "tests/test_ensemble.py); over the epochs the float32 runs separate as two seeds' runs do, so values and "
            "even a cell's phase differ as between two seed draws.")


def compare_tables(paths: dict[str, Path]) -> str:
    """Print and return max |value(off) - value(auto)| per metric over matching rows of the two results tables."""
    import pandas as pd

    tables = {mode: pd.read_csv(p) for mode, p in paths.items()}
    keys = [c for c in tables["off"].columns if c not in ("value", "status") and c in tables["auto"].columns]
    merged = tables["off"].merge(tables["auto"], on=keys, suffixes=("_off", "_auto"))
    diff = (merged["value_off"] - merged["value_auto"]).abs()
    by = [c for c in ("split", "metric") if c in merged.columns]
    parts = [f"{'/'.join(map(str, name if isinstance(name, tuple) else (name,)))} {d.max():.3g}"
             for name, d in diff.groupby([merged[c] for c in by])]
    line = (f"Results tables: {len(tables['off'])} rows (off), {len(tables['auto'])} rows (auto), {len(merged)} "
            "matched; max \\|off - auto\\| per metric: " + ", ".join(parts) + ". " + SAME_SGD + " "
            + policy_against_seeds(tables))
    print(line.replace("\\|", "|"))
    return line


def policy_against_seeds(tables) -> str:
    """Per cell, the largest |off - auto| test accuracy of one seed against the spread (max - min) of the
    cell's seeds in the off run: the policy's effect next to the seed draw's."""
    import pandas as pd

    def accuracies(df):
        rows = df[(df["source"] == "loss_acc") & (df["metric"] == "acc") & (df["split"] == "test")]
        return rows.set_index(["cell", "seed"])["value"]

    both = pd.DataFrame({"off": accuracies(tables["off"]), "auto": accuracies(tables["auto"])}).dropna()
    if both.empty:
        return ""
    cells = pd.DataFrame({"policy": (both["off"] - both["auto"]).abs().groupby(level="cell").max(),
                          "seeds": both["off"].groupby(level="cell").agg(lambda s: s.max() - s.min())})
    within = int((cells["policy"] <= cells["seeds"]).sum())
    return (f"Test accuracy per cell: the largest \\|off - auto\\| of a seed is {cells['policy'].median():.1f} points "
            f"at the median cell (at most {cells['policy'].max():.3g}), the spread of the cell's seeds in the off run "
            f"{cells['seeds'].median():.1f} (at most {cells['seeds'].max():.3g}); in {within} of {len(cells)} cells "
            "the policy moved the accuracy by at most the seeds' spread.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="passed to the CLI (default: its own, one per core)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="--ensemble modes to time")
    p.add_argument("--compare", action="store_true", help="compare the off and auto results tables row by row")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    p.add_argument("extra", nargs="*", help="extra spec flags of example_experiment.py (after --)")
    args = p.parse_args(argv)
    modes = [m for m in MODES if m in args.modes]
    spec = cli.spec_from_args(cli.build_parser().parse_args(["--preset", "demo", *args.extra]))
    about = (f"{spec.arch} widths {' '.join(map(str, spec.widths))} x batch sizes "
             f"{' '.join(map(str, spec.batch_sizes))} x learning rates {' '.join(f'{lr:g}' for lr in spec.lrs)} x "
             f"{len(spec.seeds)} seeds, {spec.epochs} epochs, metrics {', '.join(spec.metrics)}")
    print(f"demo spec: {about}", flush=True)
    times: dict[str, list[float]] = {m: [] for m in modes}
    tables: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        for r in range(args.repeats):
            for mode in modes:
                root = Path(tmp) / f"{mode}{r}"
                times[mode].append(run_demo(mode, root, args.extra, args.workers))
                print(f"{mode:4s} run {r + 1}: {times[mode][-1]:7.1f} s", flush=True)
                tables[mode] = next(root.glob("checkpoint/*/results.csv"), None)
        med = {m: statistics.median(ts) for m, ts in times.items()}
        for m, ts in times.items():
            print(f"{m:4s} {' / '.join(f'{t:.1f}' for t in ts)} s, median {med[m]:.1f} s")
        lines = []
        if len(modes) == 2:
            ratio = med["auto"] / med["off"]
            print(f"auto / off: {ratio:.2f} (auto {1 / ratio:.2f}x as fast)")
            lines.append(f"auto / off: **{ratio:.2f}** (the default policy {1 / ratio:.2f}x as fast as sequential "
                         "runs).")
        if args.compare and tables.get("off") and tables.get("auto"):
            lines.append(compare_tables(tables))
    if args.write_docs:
        rows = [[m, " / ".join(f"{t:.1f}" for t in ts), f"{med[m]:.1f} s ({med[m] / 60:.1f} min)"]
                for m, ts in times.items()]
        report.write_section("demo", report.command(__file__, argv), "\n\n".join(
            [f"Demo: {about}; {args.repeats} run(s) per mode, alternating.",
             report.table(["--ensemble", "whole run (s)", "median"], rows), *lines]))


if __name__ == "__main__":
    main()
