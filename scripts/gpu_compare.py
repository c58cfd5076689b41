"""The GPU check's study and its comparison: the study's CUDA table against its CPU table, both float64.

    python scripts/gpu_compare.py spec OUT.json            # write the study's spec (every registered metric)
    python scripts/gpu_compare.py compare CUDA.csv CPU.csv  # exit 1 when a value is outside its tolerance

The study: residual 1D conv nets (convolutions, BatchNorm, the ensemble forms) on a quarter of
MNIST-1D, 2 widths x 2 batch sizes x 2 seeds, 2 epochs, every metric of the registry at its
`test_options` (the cheap settings of the registry-wide tests). In float64 on both devices the two
runs compute the same numbers up to the order of summation inside the kernels (and the last bit of
a few functions), which training and the metrics amplify only a little: every metric's random
draws come from CPU generators, so they are the same numbers on both devices, and the small
eigenproblems are solved on the CPU on either. A wrong device path (data, model or batch left
behind, a lost buffer, an operation that differs on CUDA) moves values far beyond that.

Only value rows are compared (kind "value", not the phase rows derived from them), matched on
(cell, seed, seed_b, split, metric, coord, source). Row a of the CUDA table agrees with row b of
the CPU table when their statuses are equal and |a - b| <= atol + rtol * |b| with (rtol, atol) =
TOLERANCE for every metric (error rates and accuracies, in percent, must then be equal); both NaN
agree. A row present in one table only is a mismatch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import pandas as pd

from phasediagram.metrics import METRICS

# (rtol, atol), the same for every metric and quantity. Measured on the CPU between two float64 runs of the study that
# sum in other orders (ensemble forms on against off), the largest relative difference of any value
# was 2e-13 and every error rate (percent) and accuracy was equal: the bounds leave a factor of
# about 1e6 for the amplification of CUDA's rounding (docs/gpu.md).
TOLERANCE = (1e-6, 1e-9)  # every metric's
KEY = ["cell", "seed", "seed_b", "split", "metric", "coord", "source"]


def study_spec() -> dict:
    """The spec of the check's study (see the module docstring)."""
    return {"name": "gpucheck", "arch": "resnet1d", "dataset": "mnist1d", "widths": [4, 8], "batch_sizes": [64, 128],
            "seeds": [0, 1], "epochs": 2, "train_fractions": [0.25], "metrics": list(METRICS),
            "metric_options": {name: dict(m.test_options) for name, m in METRICS.items() if m.test_options}}


def value_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The measurements of a table: kind "value", phase rows left out, indexed by KEY."""
    rows = df[(df["kind"] == "value") & (df["source"] != "phase")].copy()
    rows["coord"] = rows["coord"].fillna(-math.inf)
    rows["seed_b"] = rows["seed_b"].fillna(-1)
    return rows.set_index(KEY)[["value", "status"]]


def compare(cuda: pd.DataFrame, cpu: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """(mismatches, per (source, metric): rows, largest |difference|, largest |difference| / its bound)."""
    a, b = value_rows(cuda), value_rows(cpu)
    problems = [f"only in the CUDA table: {k}" for k in a.index.difference(b.index)]
    problems += [f"only in the CPU table: {k}" for k in b.index.difference(a.index)]
    both = a.merge(b, left_index=True, right_index=True, suffixes=("_cuda", "_cpu"))
    summary = []
    for (source, metric), group in both.groupby(level=["source", "metric"]):
        rtol, atol = TOLERANCE
        worst, worst_share = 0.0, 0.0
        for key, row in group.iterrows():
            x, y = row["value_cuda"], row["value_cpu"]
            if row["status_cuda"] != row["status_cpu"]:
                problems.append(f"{key}: status {row['status_cuda']} on CUDA, {row['status_cpu']} on the CPU")
                continue
            if math.isnan(x) and math.isnan(y):
                continue
            bound = atol + rtol * abs(y)
            difference = abs(x - y)
            if not difference <= bound:
                problems.append(f"{key}: {x!r} on CUDA, {y!r} on the CPU: |difference| {difference:.3g} > "
                                f"{bound:.3g} (rtol {rtol:g}, atol {atol:g})")
            worst = max(worst, difference) if math.isfinite(difference) else math.inf
            worst_share = max(worst_share, difference / bound if bound > 0 else math.inf * (difference > 0))
        summary.append({"source": source, "metric": metric, "rows": len(group), "max_abs_diff": worst,
                        "max_share_of_bound": worst_share})
    return problems, pd.DataFrame(summary)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("spec", help="write the study's spec").add_argument("out")
    c = sub.add_parser("compare", help="compare the value rows of two results tables")
    c.add_argument("cuda_table")
    c.add_argument("cpu_table")
    args = p.parse_args(argv)
    if args.command == "spec":
        with open(args.out, "w") as f:
            json.dump(study_spec(), f, indent=2)
        return 0
    problems, summary = compare(pd.read_csv(args.cuda_table), pd.read_csv(args.cpu_table))
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(summary.to_string(index=False))
    for line in problems:
        print(f"MISMATCH {line}", file=sys.stderr)
    print(f"{'FAIL' if problems else 'ok'}: {len(problems)} mismatch(es) over {int(summary['rows'].sum())} value rows")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
