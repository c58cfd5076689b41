"""The default demo's whole run before and after the speed work: wall times and ratios.

The demo spec is the CLI's `--preset demo` (plus any extra spec flags given after `--`),
resolved once through the CLI's own parser (`cli.spec_from_args`) and written to a spec file,
so every run uses the identical spec even if the preset is edited while this runs. Runs:
"before" (with `--before REV`: the package and CLI of git revision REV, checked out with
`git worktree` into the temporary folder and imported from there through PYTHONPATH, ensemble
training off), "off" (this checkout, `--ensemble off`) and "auto" (this checkout, the default),
alternating, `--repeats` times, each in a fresh temporary root, through `subprocess` with an
argument list:

    example_experiment.py --spec SPEC --ensemble MODE --root TMP --metrics train --run   (training)
    example_experiment.py --spec SPEC --ensemble MODE --root TMP --run                   (the rest)

the second skipping the finished training jobs and running every metric, the table and the
figures; times are time.perf_counter around each command (so the training time includes the
MNIST-1D generation and the first table and figure). With `--whole`, each run is instead the one
command `make demo` runs (`--run`: one worker pool for training and metrics, a cell's metrics
starting when its training ends), timed as a whole. Then the two results tables are compared
row by row (same cell, seed, split, metric). In float64 each member equals its sequential run
to ~1e-13; in float32 small models trained with lr 0.1 are chaotic, so rounding differences
(the same as between torch's two float32 convolution backends) give statistically equivalent
but different runs, and per-seed values differ.

    python bench/bench_demo.py --before d1a1a74               # before: the code of stop 9
    python bench/bench_demo.py --before d1a1a74 --whole --modes auto   # as make demo runs it, before vs now
    python bench/bench_demo.py --repeats 3 -- --epochs 5      # extra spec flags after --
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phasediagram import cli

REPO = Path(__file__).resolve().parent.parent
MODES = ("off", "auto")


def run_cli(args: list[str], repo: Path = REPO) -> float:
    cmd = [sys.executable, str(repo / "example_experiment.py"), *args]
    env = dict(os.environ)
    if repo != REPO:  # an older revision's package, imported ahead of the installed one
        env["PYTHONPATH"] = os.pathsep.join([str(repo / "workspace"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def run_demo(mode: str, spec_file: Path, root: Path, workers: int | None, repo: Path = REPO) -> tuple[float, float]:
    """(training seconds, seconds of the rest) of the demo with `--ensemble mode` in `root`, by the CLI of `repo`."""
    common = ["--spec", str(spec_file), "--ensemble", mode, "--root", str(root)]
    if workers:
        common += ["--workers", str(workers)]
    return run_cli([*common, "--metrics", "train", "--run"], repo), run_cli([*common, "--run"], repo)


def run_whole(mode: str, spec_file: Path, root: Path, workers: int | None, repo: Path = REPO) -> float:
    """Seconds of the demo's whole run as one command (`--run`), with `--ensemble mode`, by the CLI of `repo`."""
    args = ["--spec", str(spec_file), "--ensemble", mode, "--root", str(root), "--run"]
    return run_cli(args + (["--workers", str(workers)] if workers else []), repo)


def checkout(rev: str, dest: Path) -> Path:
    """A detached `git worktree` of `rev` at `dest` (removed again by `remove_checkout`)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(dest), rev], check=True,
                   capture_output=True, text=True)
    return dest


def remove_checkout(dest: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(dest)], capture_output=True)


def compare_tables(paths: dict[str, Path]) -> None:
    """Print max |value(off) - value(auto)| per metric over matching rows of the two results tables."""
    import pandas as pd

    tables = {mode: pd.read_csv(p) for mode, p in paths.items()}
    keys = [c for c in tables["off"].columns if c not in ("value", "status") and c in tables["auto"].columns]
    merged = tables["off"].merge(tables["auto"], on=keys, suffixes=("_off", "_auto"))
    print(f"results tables: {len(tables['off'])} rows (off), {len(tables['auto'])} rows (auto), {len(merged)} matched")
    diff = (merged["value_off"] - merged["value_auto"]).abs()
    by = [c for c in ("split", "metric") if c in merged.columns]
    parts = [f"{'/'.join(map(str, name if isinstance(name, tuple) else (name,)))} {d.max():.3g}"
             for name, d in diff.groupby([merged[c] for c in by])]
    print("  max |off - auto| per metric: " + ", ".join(parts))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="passed to the CLI (default: its own, one per core)")
    p.add_argument("--before", metavar="REV", help="also run the demo with the code of git revision REV, ensemble off")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="this checkout's runs (auto is kept)")
    p.add_argument("--whole", action="store_true", help="time each run as one command (as `make demo`)")
    p.add_argument("extra", nargs="*", help="extra spec flags of example_experiment.py (after --)")
    args = p.parse_args(argv)
    spec = cli.spec_from_args(cli.build_parser().parse_args(["--preset", "demo", *args.extra]))
    print(f"demo spec: {spec.arch} widths {list(spec.widths)} x batch sizes {list(spec.batch_sizes)} x "
          f"{len(spec.seeds)} seeds, {spec.epochs} epochs, metrics {', '.join(spec.metrics)}")
    modes = (("before",) if args.before else ()) + tuple(m for m in MODES if m in args.modes or m == "auto")
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    tables: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        spec_file = Path(tmp) / "demo_spec.json"
        spec_file.write_text(spec.to_json())
        old = checkout(args.before, Path(tmp) / "before_code") if args.before else None
        try:
            for r in range(args.repeats):
                for mode in modes:
                    root = Path(tmp) / f"{mode}{r}"
                    if args.whole:
                        total = run_whole("off" if mode == "before" else mode, spec_file, root, args.workers,
                                          old if mode == "before" else REPO)
                        times[mode].append((total, 0.0))
                        print(f"{mode:6s} run {r + 1}: whole run {total:7.1f} s", flush=True)
                        tables[mode] = next(root.glob("checkpoint/*/results.csv"), None)
                        continue
                    if mode == "before":
                        t_train, t_rest = run_demo("off", spec_file, root, args.workers, old)
                    else:
                        t_train, t_rest = run_demo(mode, spec_file, root, args.workers)
                    times[mode].append((t_train, t_rest))
                    print(f"{mode:6s} run {r + 1}: training {t_train:7.1f} s, the rest {t_rest:7.1f} s, "
                          f"total {t_train + t_rest:7.1f} s", flush=True)
                    tables[mode] = next(root.glob("checkpoint/*/results.csv"), None)
        finally:
            if old is not None:
                remove_checkout(old)
        med = {m: [statistics.median(t[i] for t in ts) for i in (0, 1)] for m, ts in times.items()}
        auto = med["auto"]
        for base in [m for m in modes if m != "auto"]:
            b = med[base]
            if args.whole:
                print(f"medians of {args.repeats}: {base} -> auto: whole run {b[0]:.1f} s -> {auto[0]:.1f} s = "
                      f"{b[0] / auto[0]:.2f}x (target >= 2)")
                continue
            print(f"medians of {args.repeats}: {base} -> auto: training {b[0]:.1f} s -> {auto[0]:.1f} s = "
                  f"{b[0] / auto[0]:.2f}x; metrics and the rest {b[1]:.1f} s -> {auto[1]:.1f} s = {b[1] / auto[1]:.2f}x; "
                  f"whole run {sum(b):.1f} s -> {sum(auto):.1f} s = {sum(b) / sum(auto):.2f}x (target >= 2)")
        if tables.get("off") and tables.get("auto"):
            compare_tables(tables)


if __name__ == "__main__":
    main()
