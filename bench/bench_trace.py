"""Hessian trace estimators at equal products, ours against curvlinops side by side; then the metric at the demo's settings.

1. Equal products m (`--products`; by default 300 for the mlp, the `hessian` metric's most:
   density_iters 100 + trace_probes 200, and 102 for the resnet, whose products cost about 70
   times the mlp's). Models: mlp width 64 (7,434 parameters) and resnet1d width 6 (a BatchNorm
   conv net of 4,336 parameters), each trained 5 epochs with SGD on MNIST-1D (seeded), float32,
   eval mode, on 200 seeded training examples, one torch thread. Estimators, each with m products
   (on the resnet, for time, only ours: Krylov Hutch++, the metric's, ours: XTrace with Rademacher
   probes and curvlinops' XTrace):

   - ours, Krylov Hutch++: an SLQ probe's m/3 Lanczos steps (`linalg.slq`, the density's run in the
     metric) as the deflation basis (`linalg.Deflation.krylov`), then 2m/3 residual probes;
   - ours, Hutch++: a sketch of m/3 columns (2m/3 products), then m/3 probes (`linalg.hutchpp`);
   - ours, XTrace (`numerics.xtrace.xtrace`), normalized (sphere probes, the paper's recommended
     variant) and with Rademacher probes (curvlinops' variant);
   - curvlinops 3: `xtrace` and `hutchpp_trace` on its `HessianLinearOperator` of the same model,
     loss and batch (`check_deterministic=False`: a safeguard that evaluates the model twice and is
     not part of the estimate).

   Ours use `metrics.hessian`'s products (`numerics.hvp.HessianOperator`, cached double backward)
   with float32 vectors (`vector_dtype`); curvlinops multiplies by blocks of vectors with
   `torch.func` (vmap of forward-over-reverse). Printed: products, RMS and median relative error
   against the exact trace sum_i e_i^T H e_i (one float32 product per parameter; its rounding,
   about 1e-6 relative, is far below the errors measured), and the time of a whole call
   including the operator's set-up (median over the seeds, `--repeats`: by default 40 seeds for
   the mlp and, for time, 10 for the resnet; the estimators interleaved within every repeat, each
   repeat r with seed r, after a warm-up call each); the time ratio to curvlinops' XTrace is the
   median over the repeats of the two calls' ratio in that repeat. First it checks that both
   operators are the same matrix (one product).
2. The metric at the demo's settings (resnet1d width 16, trace_probes 10, hutchpp_sketch 3,
   density_iters 20): Hutch++ deflated by the SLQ run's Krylov basis (the default) against a
   sketch, errors against a long float64 Hutch++ reference, time of the whole metric call.

    python bench/bench_trace.py
    python bench/bench_trace.py --repeats 20 --products 102 300
    python bench/bench_trace.py --write-docs   # also writes its tables into docs/performance.md

curvlinops is a benchmark-only peer: `make bench` installs it from requirements-bench.txt.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from bench_hessian import paired_ratio, reference_trace, timed, trained_model
from torch import nn

from phasediagram.data import datasets as data
from phasediagram.metrics import METRICS
from phasediagram.metrics.base import MetricData
from phasediagram.metrics.hessian import vector_dtype
from phasediagram.models import families as models
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator
from phasediagram.numerics.xtrace import xtrace

KRYLOV, XTRACE_RADEMACHER, PEER = ("ours: Krylov Hutch++ (m/3 Lanczos + 2m/3 probes)", "ours: XTrace, Rademacher",
                                   "curvlinops: XTrace")
MODELS = (("mlp", 64, (300,), 40, None), ("resnet1d", 6, (102,), 10, (KRYLOV, XTRACE_RADEMACHER, PEER)))
# (arch, width, default products, default seeds, estimators (None: all))
DEMO = {"trace_probes": 10, "hutchpp_sketch": 3, "density_iters": 20}


# --------------------------------------------------------------------------- estimators: (value, products)
def ours_krylov(model, x, y, r: int, m: int):
    op = HessianOperator(model, x, y)
    g = torch.Generator().manual_seed(r)
    run = linalg.slq(op, op.dim, m // 3, 1, g, dtype=vector_dtype(op)).first_run
    plus = linalg.traces(op, op.dim, max_probes=m - run.n_products, tol=0.0, generator=g, dtype=vector_dtype(op),
                         plain=False, deflation=linalg.Deflation.krylov(run))[1]
    return plus.value, op.n_products


def ours_hutchpp(model, x, y, r: int, m: int):
    op = HessianOperator(model, x, y)
    res = linalg.hutchpp(op, op.dim, m // 3, m - 2 * (m // 3), 0.0, torch.Generator().manual_seed(r),
                         dtype=vector_dtype(op))
    return res.value, op.n_products


def ours_xtrace(model, x, y, r: int, m: int, normalize: bool = True):
    op = HessianOperator(model, x, y)
    res = xtrace(op, op.dim, m, torch.Generator().manual_seed(r), dtype=vector_dtype(op), normalize=normalize)
    return res.value, op.n_products


def curvlinops_operator(model, x, y):
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)


def curvlinops_xtrace(model, x, y, r: int, m: int):
    from curvlinops import xtrace as their_xtrace

    torch.manual_seed(r)
    return float(their_xtrace(curvlinops_operator(model, x, y), m - m % 2)), m - m % 2


def curvlinops_hutchpp(model, x, y, r: int, m: int):
    from curvlinops import hutchpp_trace

    torch.manual_seed(r)
    return float(hutchpp_trace(curvlinops_operator(model, x, y), m - m % 3)), m - m % 3


ESTIMATORS = ((KRYLOV, ours_krylov),
              ("ours: Hutch++ (sketch m/3 + m/3 probes)", ours_hutchpp),
              ("ours: XTrace, normalized", ours_xtrace),
              (XTRACE_RADEMACHER, lambda *a: ours_xtrace(*a, normalize=False)),
              (PEER, curvlinops_xtrace),
              ("curvlinops: Hutch++", curvlinops_hutchpp))


# --------------------------------------------------------------------------- references
def exact_trace(model, x, y) -> float:
    """sum_i e_i^T H e_i (one product per parameter, in batched blocks), summed in float64."""
    op = HessianOperator(model, x, y)
    total = 0.0
    for start in range(0, op.dim, 256):
        cols = torch.arange(start, min(start + 256, op.dim))
        e = torch.zeros(op.dim, len(cols))
        e[cols, torch.arange(len(cols))] = 1.0
        total += float(op.matmat(e)[cols, torch.arange(len(cols))].double().sum())
    return total


def same_operator(model, x, y) -> float:
    """||H_ours v - H_curvlinops v|| / ||H_ours v|| for one Gaussian v (float32)."""
    ours = HessianOperator(model, x, y)
    v = torch.randn(ours.dim, generator=torch.Generator().manual_seed(0))
    mine = ours(v)
    theirs = curvlinops_operator(model, x, y) @ v
    return float(torch.linalg.vector_norm(mine - theirs) / torch.linalg.vector_norm(mine))


# --------------------------------------------------------------------------- sections
def equal_products(ds, args) -> list[str]:
    """Section 1: one markdown table per model, printed as it goes."""
    tables = []
    for arch, width, default_products, default_repeats, names in MODELS:
        repeats = args.repeats or default_repeats
        model = trained_model(width, args.epochs, ds, arch=arch)
        batch = ds.train.batch(args.batch, torch.Generator().manual_seed(0))
        x, y = batch.x, batch.y
        exact = exact_trace(model, x, y)
        agree = same_operator(model, x, y)
        title = (f"{arch} width {width} ({models.n_params(model)} parameters, BatchNorm in eval mode)"
                 if arch == "resnet1d" else f"{arch} width {width} ({models.n_params(model)} parameters)")
        print(f"\n{title}, {repeats} seeds: exact trace {exact:.6g}; ours and curvlinops' H v differ by {agree:.1e} (relative)")
        print(f"  {'estimator':<50} {'products':>8} {'RMS err':>9} {'med err':>9} {'time (ms)':>10} "
              f"{'RMS / peer':>10} {'time / peer':>11}")
        rows, orders = [], []
        for m in args.products or default_products:
            fns = {name: (lambda r, fn=fn: fn(model, x, y, r, m)) for name, fn in ESTIMATORS
                   if names is None or name in names}
            times = {}
            res = timed(fns, repeats, times)
            stats = {}
            for name, (seconds, outs) in res.items():
                err = np.array([abs(v - exact) / abs(exact) for v, _ in outs])
                stats[name] = (int(np.median([n for _, n in outs])), math.sqrt(float(np.mean(err ** 2))),
                               float(np.median(err)), seconds)
            peer_rms = stats[PEER][1]
            for name, (products, rms, med, seconds) in stats.items():
                speed = paired_ratio(times[name], times[PEER])
                print(f"  {name:<50} {products:8d} {rms:9.2e} {med:9.2e} {seconds * 1e3:10.0f} "
                      f"{rms / peer_rms:9.2f}x {speed:10.2f}x", flush=True)
                rows.append([name, products, f"{rms * 100:.2f} %", f"{med * 100:.2f} %", f"{seconds * 1e3:.0f}",
                             f"{rms / peer_rms:.2f}x", f"{speed:.2f}x"])
            best = min(stats, key=lambda k: stats[k][1])
            orders.append(f"m = {m}: the lowest RMS error is {best}'s ({stats[best][1] * 100:.2f} %); ours: Krylov "
                          f"Hutch++ (the metric's) has {stats[KRYLOV][1] / peer_rms:.2f}x the RMS error of curvlinops' "
                          "XTrace.")
        tables.append(f"{title}, {repeats} seeds; exact trace {exact:.6g}; ours and curvlinops' H v agree to "
                      f"{agree:.1e}:\n\n"
                      + report.table(["estimator", "products", "RMS relative error", "median relative error",
                                      "time (ms)", "RMS / curvlinops XTrace", "time / curvlinops XTrace"], rows)
                      + "\n\n" + " ".join(orders))
    return tables


def demo_settings(ds, args) -> str:
    """Section 2: the metric's Krylov against sketch Hutch++ at the demo's settings."""
    repeats = args.repeats or 10
    model = trained_model(16, args.epochs, ds)
    batch = ds.train.batch(args.batch, torch.Generator().manual_seed(0))
    ref, ref_err, how = reference_trace(model, batch.x, batch.y, args.ref_sketch, args.ref_probes)
    print(f"\nresnet1d width 16: {models.n_params(model)} parameters; reference trace {ref:.5g} +- {ref_err:.2g} ({how})")
    metric = METRICS["hessian"]
    mdata = MetricData(batch, batch, ds.n_classes)
    options = {basis: metric.options(**DEMO, batch_size=None, hutchpp_basis=basis) for basis in ("sketch", "krylov")}
    times = {}
    res = timed({basis: lambda r, o=o: metric.compute(model, mdata, o, torch.Generator().manual_seed(r))
                 for basis, o in options.items()}, repeats, times)
    print(f"demo settings {DEMO}, {repeats} repeats; errors relative to the reference")
    print(f"  {'Hutch++ basis':<14} {'time (s)':>9} {'trace HVPs':>10} {'Hutchinson med/RMS err':>23} "
          f"{'Hutch++ med/RMS err':>20}")
    rows = []
    for basis, (seconds, outs) in res.items():
        made = [o["train/hvp_traces"] for o in outs]
        errs = {q: np.array([abs(o[f"train/{q}"] - ref) / abs(ref) for o in outs]) for q in ("trace", "trace_hutchpp")}
        cols = [f"{np.median(e):.2e} / {math.sqrt(np.mean(e ** 2)):.2e}" for e in errs.values()]
        print(f"  {basis:<14} {seconds:9.3f} {np.median(made):10.0f} {cols[0]:>23} {cols[1]:>20}")
        default = " (default)" if basis == metric.options().hutchpp_basis else ""
        rows.append([basis + default, f"{seconds:.3f}", f"{np.median(made):.0f}", *cols])
    faster = paired_ratio(times["sketch"], times["krylov"])
    rms = {b: math.sqrt(np.mean([(o["train/trace_hutchpp"] - ref) ** 2 for o in outs])) for b, (_, outs) in res.items()}
    print(f"krylov vs sketch: metric call {faster:.2f}x faster, Hutch++ RMS error {rms['krylov'] / rms['sketch']:.2f}x")
    settings = ", ".join(f"{k} {v}" for k, v in DEMO.items())
    return (f"The `hessian` metric at the demo's settings: resnet1d width 16 ({models.n_params(model)} parameters), "
            f"{settings}; reference trace {ref:.5g} +- {ref_err:.2g} ({how}); relative errors over "
            f"{repeats} repeats:\n\n"
            + report.table(["Hutch++ basis", "metric call (s)", "trace products", "Hutchinson median / RMS error",
                            "Hutch++ median / RMS error"], rows)
            + f"\n\nKrylov against sketch on this model, over these {repeats} seeds: the metric call **{faster:.2f}x** "
            f"faster (median of the seeds' time ratios), Hutch++ RMS error **{rms['krylov'] / rms['sketch']:.2f}x**.")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, nargs="+", help="products m for every model (default: per model)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, help="seeds per estimator (default: 40 for the mlp, 10 for the resnet "
                    "and for the demo settings)")
    ap.add_argument("--ref-sketch", type=int, default=50)
    ap.add_argument("--ref-probes", type=int, default=200)
    ap.add_argument("--cache-dir", default="/tmp/pd_data")
    ap.add_argument("--write-docs", action="store_true", help="write the tables into docs/performance.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = data.load("mnist1d", cache_dir=args.cache_dir)
    print("equal products, one thread; errors relative to the exact trace")
    tables = equal_products(ds, args)
    demo = demo_settings(ds, args)
    if args.write_docs:
        report.write_section("trace", report.command(__file__, argv), (
            f"Equal products m, one thread; models (each table names its own) trained {args.epochs} epochs, batch "
            f"{args.batch}, float32; time of a whole call including the operator's set-up (median over the seeds; "
            "time / curvlinops XTrace: the median over the seeds of the two calls' ratio):\n\n"
            + "\n\n".join(tables) + "\n\n" + demo))


if __name__ == "__main__":
    main()
