"""Metric work done together vs one after another: the per-seed evaluations of a cell (`loss_acc`)
and the Monte Carlo samples of `local_energy`.

Side by side in one process, one torch thread (as the pool's workers), on resnet1d models of
MNIST-1D's shape (random weights and data: timing does not depend on the values; BatchNorm in
eval mode with its initial statistics):

1. `loss_acc` of the S seeds of a cell on 4000 + 1000 examples: S calls of `loss_acc` (what
   the job does) vs `ensemble_models.evaluate_members` on both splits (one ensemble forward per
   batch of 1000 for all seeds).
2. `local_energy` (M samples, sigmas 0.025..0.1, both splits of 1000 examples): batching "loop"
   (sample after sample, the default), "vmap" (torch.func.vmap over `sample_chunk` samples) and
   "ensemble" (`sample_chunk` perturbed copies as one ensemble model).

Printed: median seconds over `--repeats` alternating repeats after a warm-up, and the ratios
to the sequential form, with the largest difference between the values each form returns.

    python bench/bench_metrics_batched.py
    python bench/bench_metrics_batched.py --widths 8 32 --seeds 5 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from phasediagram import ensemble_models, models
from phasediagram.data import Split
from phasediagram.metrics import MetricData, key
from phasediagram.metrics.local_energy import LocalEnergyOptions, local_energy
from phasediagram.metrics.loss_acc import LossAccOptions, loss_acc


def data(n_train: int, n_test: int) -> MetricData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 40, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return MetricData(Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), 10)


def timed(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds per function (interleaved repeats after one warm-up call each) and each one's result."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def together(nets, d: MetricData) -> list[dict]:
    """loss_acc's values of every model, from one ensemble forward per batch (`evaluate_members`)."""
    out = [{} for _ in nets]
    for split in ("train", "test"):
        part = d.split(split)
        for row, (loss, acc) in zip(out, ensemble_models.evaluate_members(nets, part.x, part.y)):
            row[key(split, "loss")], row[key(split, "acc")] = loss, acc
    return out


def max_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=20, help="local-energy Monte Carlo samples M")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cell_data = data(4000, 1000)
    le_data = data(1000, 1000)
    print(f"one thread; {args.seeds} seeds; loss_acc on 4000 + 1000 examples; local energy M = {args.samples}, "
          f"sigmas 0.025-0.1, 1000 + 1000 examples; medians of {args.repeats}")
    print(f"{'width':>5} | {'loss_acc: seq':>13} {'cell':>7} {'ratio':>6} {'diff':>8} | {'local energy: loop':>18} "
          f"{'vmap':>7} {'ensemble':>8} {'loop/vmap':>9} {'loop/ens':>8} {'diff':>8}")
    for width in args.widths:
        nets = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            nets.append(models.create("resnet1d", width, (40,), 10).eval())
        opts = LossAccOptions()
        la_t, la_r = timed({"seq": lambda: [loss_acc(m, cell_data, opts, None) for m in nets],
                            "cell": lambda: together(nets, cell_data)},
                           args.repeats)
        base = LocalEnergyOptions(n_samples=args.samples)
        le = {b: (lambda b=b: [local_energy(nets[0], le_data, dataclasses.replace(base, batching=b),
                                            torch.Generator().manual_seed(1))]) for b in ("loop", "vmap", "ensemble")}
        le_t, le_r = timed(le, args.repeats)
        print(f"{width:5d} | {la_t['seq']:12.3f}s {la_t['cell']:6.3f}s {la_t['seq'] / la_t['cell']:5.2f}x "
              f"{max_diff(la_r['seq'], la_r['cell']):8.1e} | {le_t['loop']:17.3f}s {le_t['vmap']:6.3f}s "
              f"{le_t['ensemble']:7.3f}s {le_t['loop'] / le_t['vmap']:8.2f}x {le_t['loop'] / le_t['ensemble']:7.2f}x "
              f"{max_diff(le_r['loop'], le_r['ensemble']):8.1e}", flush=True)


if __name__ == "__main__":
    main()
