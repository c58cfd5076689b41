"""Hessian trace at the demo's settings: Hutch++ deflated by the SLQ run's Krylov basis against a sketch.

Model and batch as bench/bench_hessian.py (resnet1d width 16 trained 5 epochs with SGD on
MNIST-1D, float32, eval mode, 200 seeded training examples, one torch thread). The `hessian`
metric at the demo's settings (10 probes, trace tol 1e-3, SLQ density of 20 Lanczos steps, sketch
3) computes, with its own generator per repeat r:

- "sketch": Hutch++ deflated by orth(H S) of a 3-column sketch (6 products) plus the probes;
- "krylov" (the default): Hutch++ deflated by the 20-vector Krylov basis of the SLQ run the
  density makes anyway (no product of its own) plus the same number of probes.

Printed: for each, the median and RMS relative error of Hutchinson and Hutch++ against a long
float64 Hutch++ reference (`--ref-sketch` + `--ref-probes` products, printed with its standard
error), the products the trace estimators made beyond the density's, and the time of the whole
metric call (time.perf_counter medians over `--repeats`, the two interleaved, after a warm-up).

    python bench/bench_trace.py
    python bench/bench_trace.py --repeats 20
    python bench/bench_trace.py --write-docs   # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from bench_hessian import reference_trace, timed, trained_model

from phasediagram.data import datasets as data
from phasediagram.metrics import METRICS
from phasediagram.metrics.base import MetricData
from phasediagram.models import families as models

DEMO = {"trace_probes": 10, "hutchpp_sketch": 3, "density_iters": 20}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ref-sketch", type=int, default=50)
    ap.add_argument("--ref-probes", type=int, default=200)
    ap.add_argument("--cache-dir", default="/tmp/pd_data")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = data.load("mnist1d", cache_dir=args.cache_dir)
    model = trained_model(args.width, args.epochs, ds)
    batch = ds.train.batch(args.batch, torch.Generator().manual_seed(0))
    ref, ref_err, how = reference_trace(model, batch.x, batch.y, args.ref_sketch, args.ref_probes)
    print(f"resnet1d width {args.width}: {models.n_params(model)} parameters; batch {args.batch}; one thread; "
          f"reference trace {ref:.5g} +- {ref_err:.2g} ({how})")
    metric = METRICS["hessian"]
    mdata = MetricData(batch, batch, ds.n_classes)
    options = {basis: metric.options(**DEMO, batch_size=None, hutchpp_basis=basis) for basis in ("sketch", "krylov")}
    res = timed({basis: lambda r, o=o: metric.compute(model, mdata, o, torch.Generator().manual_seed(r))
                 for basis, o in options.items()}, args.repeats)
    print(f"demo settings {DEMO}, {args.repeats} repeats; errors relative to the reference")
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
    ts, tk = res["sketch"][0], res["krylov"][0]
    rms = {b: math.sqrt(np.mean([(o["train/trace_hutchpp"] - ref) ** 2 for o in outs])) for b, (_, outs) in res.items()}
    print(f"krylov vs sketch: metric call {ts / tk:.2f}x faster, Hutch++ RMS error {rms['krylov'] / rms['sketch']:.2f}x")
    if args.write_docs:
        settings = ", ".join(f"{k} {v}" for k, v in DEMO.items())
        report.write_section("trace", report.command(__file__, argv), (
            f"resnet1d width {args.width} ({models.n_params(model)} parameters) trained {args.epochs} epochs, batch "
            f"{args.batch}, {settings}; reference trace {ref:.5g} +- {ref_err:.2g} ({how}); relative errors over "
            f"{args.repeats} repeats:\n\n"
            + report.table(["Hutch++ basis", "metric call (s)", "trace products", "Hutchinson median / RMS error",
                            "Hutch++ median / RMS error"], rows)
            + f"\n\nKrylov against sketch: the metric call **{ts / tk:.2f}x** faster, Hutch++ RMS error "
            f"**{rms['krylov'] / rms['sketch']:.2f}x**."))


if __name__ == "__main__":
    main()
