"""Flat-minima training methods against plain SGD on the embedded default data (MNIST-1D).

For every method (SGD, SAM, Entropy-SGD, Replicated-SGD, SGD + InfoMCR, SGD + NRS) this trains
the same small grid (widths x batch sizes x seeds, through `phasediagram.train.train_seed`),
then measures every trained model with the registered metrics:

- `loss_acc`: test accuracy (%), the quantity the flatness measures are compared with;
- `hessian`: the top eigenvalue of the training-loss Hessian;
- `fisher`: the InfoMCR observed-Fisher metric;
- `local_energy`: Pittorino et al.'s local energy;
- `nrs`: the NRS divergence (mean KL to neighbours at relative radius 0.05);

each with small options for speed (printed). A metric not (yet) in `phasediagram.metrics.METRICS`
is skipped with a note. Its headline value is the key of the metric's first plot panel.

Printed: one row per run; per method the mean of each quantity, the training time relative to
SGD, and the Spearman rank correlation rho (scipy.stats.spearmanr) of each measure with test
accuracy across that method's runs; finally the same correlations pooled over all runs. These
are measurements on a few small models trained for a few epochs, not tests of a paper's claim.

    python bench/bench_methods.py                      # the default grid
    python bench/bench_methods.py --epochs 20 --arch resnet1d --widths 4 8 16 --out bench_out
    python bench/bench_methods.py --write-docs         # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from scipy.stats import spearmanr

from phasediagram.data import datasets as data
from phasediagram.metrics import METRICS, MetricData, key
from phasediagram.seeding import stable_seed
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout
from phasediagram.training import train

# name -> (optimizer, optimizer options, regularizer, regularizer options); defaults otherwise
METHODS = {
    "sgd": ("sgd", {}, "none", {}),
    "sam": ("sam", {}, "none", {}),
    "entropy_sgd": ("entropy_sgd", {}, "none", {}),
    "replicated_sgd": ("replicated_sgd", {}, "none", {}),
    "infomcr": ("sgd", {}, "infomcr", {}),
    "nrs": ("sgd", {}, "nrs", {}),
}

# small settings for speed; only the fields a metric's options class has are passed
FAST_OPTIONS = {
    "loss_acc": {},
    "hessian": {"batch_size": 200, "top_k": 1, "lanczos_iters": 30, "trace_probes": 1, "hutchpp_sketch": 0,
                "density_probes": 0},
    "fisher": {"n_batches": 10, "batch_size": 50},
    "local_energy": {"sigmas": (0.0, 0.05), "sigma_value": 0.05, "n_samples": 20, "splits": ("train",),
                     "n_examples": 1000},
    "nrs": {"rho": 0.05, "n_neighbours": 5, "splits": ("train",), "n_examples": 1000},
}
MEASURES = ("hessian", "fisher", "local_energy", "nrs")


def metric_options(name: str):
    cls = METRICS[name].options
    allowed = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in FAST_OPTIONS.get(name, {}).items() if k in allowed})


def headline(name: str) -> str:
    """The key of the metric's first plot panel (e.g. 'train/top_eigenvalue')."""
    panel = METRICS[name].panels[0]
    return key(panel.split, panel.quantity)


def run_method(method: str, args, dataset, root: Path, measures: list[str], log) -> list[dict]:
    optimizer, opt_options, regularizer, reg_options = METHODS[method]
    spec = ExperimentSpec(name=f"bench-{method.replace('_', '-')}", arch=args.arch, widths=tuple(args.widths),
                          batch_sizes=tuple(args.batch_sizes), seeds=tuple(args.seeds), epochs=args.epochs,
                          lrs=(args.lr,), optimizer=optimizer, optimizer_options=opt_options,
                          regularizer=regularizer, regularizer_options=reg_options, metrics=("loss_acc",))
    layout = Layout(root, spec.name)
    device = torch.device(args.device)
    mdata = MetricData(dataset.train.to(device), dataset.test.to(device), dataset.n_classes)
    rows = []
    for cell in spec.cells():
        for seed in spec.seeds:
            start = time.perf_counter()
            status = train.train_seed(spec, cell, seed, layout, dataset, device=device, log=log)
            seconds = time.perf_counter() - start
            row = {"method": method, "width": cell.width, "batch_size": cell.batch_size, "seed": seed,
                   "status": status, "train_s": seconds}
            model, _ = train.load_model(layout.checkpoint(cell, seed, "final"), device)
            for name in ("loss_acc", *measures):
                generator = torch.Generator().manual_seed(stable_seed("bench", name, cell.id, seed))
                label = "test_acc" if name == "loss_acc" else name
                column = key("test", "acc") if name == "loss_acc" else headline(name)
                if status != "ok":
                    row[label] = math.nan
                    continue
                row[label] = float(METRICS[name].compute(model, mdata, metric_options(name), generator)[column])
            rows.append(row)
            log(f"  {method:15s} w={cell.width:<4d} bs={cell.batch_size:<4d} seed={seed} {status:8s} "
                + " ".join(f"{k}={row[k]:.4g}" for k in ("test_acc", *measures)) + f"  ({seconds:.1f}s)")
    return rows


def spearman(x: pd.Series, y: pd.Series) -> tuple[float, int]:
    ok = np.isfinite(x.to_numpy(float)) & np.isfinite(y.to_numpy(float))
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, int(ok.sum())
    return float(spearmanr(x[ok], y[ok]).statistic), int(ok.sum())


def summarise(df: pd.DataFrame, measures: list[str]) -> str:
    lines = []
    sgd_time = df[df.method == "sgd"].train_s.mean() if (df.method == "sgd").any() else math.nan
    head = f"{'method':15s} {'runs':>4s} {'time/SGD':>8s} {'test acc %':>10s} " + " ".join(
        f"{m:>14s}" for m in measures) + "   " + " ".join(f"{'rho(' + m + ',acc)':>22s}" for m in measures)
    lines += [head, "-" * len(head)]
    for method, part in df.groupby("method", sort=False):
        cells = [f"{method:15s} {len(part):4d} {part.train_s.mean() / sgd_time:8.2f} {part.test_acc.mean():10.2f}"]
        cells += [f"{part[m].mean():14.4g}" for m in measures]
        rhos = [spearman(part[m], part.test_acc)[0] for m in measures]
        lines.append(" ".join(cells) + "   " + " ".join(f"{r:22.3f}" for r in rhos))
    pooled = [spearman(df[m], df.test_acc) for m in measures]
    lines.append(f"{'all (pooled)':15s} {len(df):4d} {'':8s} {df.test_acc.mean():10.2f} "
                 + " ".join(f"{df[m].mean():14.4g}" for m in measures) + "   "
                 + " ".join(f"{r:22.3f}" for r, _ in pooled))
    return "\n".join(lines)


def markdown(df: pd.DataFrame, measures: list[str], args) -> str:
    """The summary as a markdown table: per method the means, time / SGD and each measure's rho with test accuracy."""
    sgd_time = df[df.method == "sgd"].train_s.mean() if (df.method == "sgd").any() else math.nan
    rows = []
    for method, part in df.groupby("method", sort=False):
        rows.append([method, f"{part.train_s.mean() / sgd_time:.2f}", f"{part.test_acc.mean():.2f}",
                     *(f"{part[m].mean():.4g}" for m in measures),
                     *(f"{spearman(part[m], part.test_acc)[0]:.3f}" for m in measures)])
    rows.append(["all (pooled)", "", f"{df.test_acc.mean():.2f}", *(f"{df[m].mean():.4g}" for m in measures),
                 *(f"{spearman(df[m], df.test_acc)[0]:.3f}" for m in measures)])
    runs = len(args.widths) * len(args.batch_sizes) * len(args.seeds)
    return (f"{args.arch} widths {' '.join(map(str, args.widths))} x batch sizes "
            f"{' '.join(map(str, args.batch_sizes))} x seeds {' '.join(map(str, args.seeds))} ({runs} runs per "
            f"method), {args.epochs} epochs, lr {args.lr}; means over the runs, rho: Spearman correlation with test "
            "accuracy:\n\n"
            + report.table(["method", "time / SGD", "test acc %", *measures, *(f"rho({m}, acc)" for m in measures)],
                           rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mlp")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small models gain nothing from more)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for checkpoints and results.csv (default: a temporary folder); reruns reuse it")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if args.quiet else print

    measures = []
    for name in MEASURES:
        if name in METRICS:
            measures.append(name)
            print(f"{name}: {headline(name)} with {metric_options(name)}")
        else:
            print(f"note: metric {name!r} is not registered in phasediagram.metrics.METRICS; skipped")
    print(f"grid: {args.arch} widths {args.widths} x batch sizes {args.batch_sizes} x seeds {args.seeds}, "
          f"{args.epochs} epochs, lr {args.lr} (step decay x0.1 at 75%), momentum 0.9, weight decay 5e-4, "
          f"torch threads {torch.get_num_threads()}, device {args.device}")
    for method in args.methods:
        optimizer, opt_options, regularizer, reg_options = METHODS[method]
        print(f"  {method}: optimizer {optimizer} {opt_options or '(defaults)'}, regularizer {regularizer} "
              f"{reg_options or ('(defaults)' if regularizer != 'none' else '')}")

    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        root = args.out or Path(tmp)
        dataset = data.load("mnist1d", cache_dir=root / "data")
        rows = []
        for method in args.methods:
            rows += run_method(method, args, dataset, root, measures, log)
        df = pd.DataFrame(rows)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            df.to_csv(args.out / "results.csv", index=False)
    print()
    print(summarise(df, measures))
    print(f"\nrho: Spearman rank correlation with test accuracy over a method's runs "
          f"({len(args.widths) * len(args.batch_sizes) * len(args.seeds)} each); time/SGD: mean training time "
          "per run relative to plain SGD.")
    if args.write_docs:
        report.write_section("methods", report.command(__file__, argv), markdown(df, measures, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
