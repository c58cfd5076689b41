"""Hessian top eigenvalue and trace: this package against PyHessian 0.1, on the same models and batch.

Models (`--models`, arch:width): resnet1d width 7 (a BatchNorm conv net of 5,799 parameters),
resnet1d width 16 (28,506 parameters) and mlp width 64 (7,434 parameters), each trained
briefly with SGD on MNIST-1D (seeded), float32, eval mode; batch: 200 seeded training examples;
loss: mean cross-entropy. Sections 1 and 2 run on every model, sections 3-5 on the first
(resnet1d width 7), section 6 on `--cert-models` (resnet1d width 7 and mlp width 64).
Everything runs with one torch thread (as the job pool's workers do), which also keeps timings
sane on a shared machine.

Printed, each measured side by side in this run (time.perf_counter medians over `--repeats`
runs after one warm-up run each, the methods interleaved within every repeat, each repeat with
its own random start; a speed ratio is the median over the repeats of the two arms' ratio in
that repeat):

1. Top eigenvalue at the same tolerance (1e-3, at most 100 products): PyHessian's power iteration
   (`eigenvalues(maxIter=100, tol=1e-3)`, lambda_max alone) vs our Lanczos for lambda_max alone
   (`linalg.lanczos_eigs(..., magnitude=False)`, Krylov vectors in the model's dtype as in the metric),
   with each stopping rule ("gap", "residual", "change")
   and start (gradient-mixed, the metric's start when it computes no density, or random as in
   PyHessian; with a density the metric starts from the SLQ run's Ritz vectors,
   `metrics.hessian._eig_values`): time, products, relative error against the exact value, speed-up.
   The graph build (and for the gradient start, reading the gradient off it) is inside every timing,
   as in PyHessian's. One more row is the metric's own default, which also runs until lambda_min has
   converged (the eigenvalue of largest magnitude needs both ends). Then the same error: PyHessian
   at tighter tolerances, against the gap rule from the gradient start for lambda_max alone.
2. Trace, both with at most 100 probes and tol 1e-3: our Hutchinson (same reference stopping
   rule, with |trace|) and Hutch++ (sketch 10) vs PyHessian's `trace(maxIter=100, tol=1e-3)`;
   then at equal products, 42 each (tol 0, so every run takes them all): our Hutch++ (sketch 14,
   28 products, then 14 probes) against PyHessian's Hutchinson (42 probes).
3. Lanczos vs power iteration: products needed to reach relative accuracy 1e-2 ... 1e-6, on the
   trained model and at initialisation: (a) both from the same random start (as before);
   (b) both from the same gradient-mixed start; (c) products until each method's own
   a-posteriori bound first certifies the target (Lanczos: gap bound min(r, r^2/gap) and residual
   bound r; power iteration: its residual ||H v - mu v||, the only bound it has), with the worst
   true error at that point over the starts, in units of the target (<= 1: the certificate held
   in those `--seeds` starts; section 6 counts over many starts).
4. Hessian-vector products: cached double backward vs torch.func forward-over-reverse.
5. The k largest eigenvalues (k in --top-k, default 1, 2, 3, 5; the metric's `top_k`): products
   until all k are within 1e-2 ... 1e-4 of the exact values, our Lanczos against power iteration
   with deflation (PyHessian's `top_n`: each next eigenvalue by power iteration on H projected off
   the eigenvectors found before), from random starts, on the trained model and at initialisation
   (a k whose lambda_k is below |lambda_min| is left out: power iteration finds another set there).
6. Certificates over `--starts` random starts (default 40) on each `--cert-models`, tol 1e-3: for each
   stopping rule and start of section 1 (lambda_max alone, float32 as the metric) and the
   metric's default (both ends), the median products, the worst true error in units of tol and
   the number of starts whose answer is further than tol from the exact lambda_max; power
   iteration with the reference's change rule (`linalg.power_iteration`, PyHessian's algorithm)
   for comparison.
7. (with --sweep) Robustness of the stopping rules and starts at tol 1e-3 on 20 Hessians
   (resnet1d widths 4, 8, 32 and mlp widths 32, 128, each after 0, 1, 5 and 20 epochs), with
   --sweep-starts random starts each: median products, worst error / tol and the number of
   runs beyond tol, for our Lanczos rules and starts and for power iteration with the reference's
   change rule (`linalg.power_iteration`, PyHessian's algorithm).

"Exact" values: the top eigenvalue from Lanczos on the float64 copy of the model run to a
residual of 1e-10 (exact to ~1e-10 relative, far below the float32 errors measured). The trace
of a larger model is not formed exactly (one product per parameter), so its reference is a long float64
Hutch++ estimate (`--ref-sketch` + `--ref-probes` products), printed with its standard error;
for a model of at most 5,000 parameters the exact trace sum_i e_i^T H e_i is used instead.

    python bench/bench_hessian.py
    python bench/bench_hessian.py --models resnet1d:4 mlp:32 --repeats 5
    python bench/bench_hessian.py --sweep   # adds section 7 (printed only)
    python bench/bench_hessian.py --write-docs   # also writes the tables of sections 1-6 into docs/performance.md
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time
import warnings

import numpy as np
import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.data import datasets as data
from phasediagram.metrics.hessian import vector_dtype
from phasediagram.models import families as models
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator

TOL = 1e-3
MAX_ITER = 100
EQUAL_PRODUCTS = 42  # the fixed budget of section 2's equal-products rows
EXACT_TRACE_MAX_PARAMS = 5000


# --------------------------------------------------------------------------- setup
def trained_model(width: int, epochs: int, dataset, arch: str = "resnet1d") -> nn.Module:
    """`arch` at `width` after `epochs` of SGD (lr 0.05, momentum 0.9, batch 128), seed 0."""
    torch.manual_seed(0)
    model = models.create(arch, width, dataset.input_shape, dataset.n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(dataset.train), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(dataset.train.x[idx]), dataset.train.y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def timed(fns: dict, repeats: int, per_repeat: dict | None = None) -> dict:
    """name -> (median seconds, results) over `repeats` calls fn(r), r = 0..repeats-1.

    One warm-up call each first; the methods are interleaved within every repeat (in rotating
    order), so a change in machine load hits all of them alike. `per_repeat`, when given, receives
    name -> the list of each repeat's seconds (for `paired_ratio`).
    """
    for fn in fns.values():
        fn(0)
    times = {k: [] for k in fns}
    results = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            out = fns[name](r)
            times[name].append(time.perf_counter() - t0)
            results[name].append(out)
    if per_repeat is not None:
        per_repeat.update(times)
    return {k: (statistics.median(times[k]), results[k]) for k in fns}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over repeats of numerator[r] / denominator[r] (two arms timed in the same repeat)."""
    return float(np.median(np.array(numerator) / np.array(denominator)))


# --------------------------------------------------------------------------- the two implementations
def ours_top(model, x, y, r: int, rule: str = "gap", start: str = "gradient", both_ends: bool = False):
    """Our Lanczos for lambda_max alone (what PyHessian's `eigenvalues` returns), timed from the graph build;
    with `both_ends` the metric's computation without a density (`metrics.hessian._eig_values`), which
    also runs until lambda_min has converged, for the eigenvalue of largest magnitude."""
    op = HessianOperator(model, x, y)
    hint = op.gradient() if start == "gradient" else None
    res = linalg.lanczos_eigs(op, op.dim, 1, MAX_ITER, TOL, torch.Generator().manual_seed(r), rule=rule,
                              dtype=vector_dtype(op), hint=hint, magnitude=both_ends)
    return float(res.top[0]), res.n_products


def ours_trace(model, x, y, r: int, sketch: int = 0, probes: int = MAX_ITER, tol: float = TOL):
    op = HessianOperator(model, x, y)
    g = torch.Generator().manual_seed(r)
    res = linalg.hutchpp(op, op.dim, sketch, probes, tol, g) if sketch else \
        linalg.hutchinson(op, op.dim, probes, tol, g)
    return res.value, res.n_products


def pyhessian_top(model, x, y, r: int, tol: float = TOL, max_iter: int = MAX_ITER):
    from pyhessian import hessian

    torch.manual_seed(r)
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    counter = _count_products()
    value = float(h.eigenvalues(maxIter=max_iter, tol=tol)[0][0])
    model.zero_grad(set_to_none=True)
    return value, counter()


def pyhessian_trace(model, x, y, r: int, max_iter: int = MAX_ITER, tol: float = TOL):
    """PyHessian's Hutchinson; with tol 0 it takes all `max_iter` probes (its test is `change < tol`)."""
    from pyhessian import hessian

    torch.manual_seed(r)
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    samples = h.trace(maxIter=max_iter, tol=tol)
    model.zero_grad(set_to_none=True)
    return float(np.mean(samples)), len(samples)


def _count_products():
    """PyHessian's power iteration makes one product per iteration; count them by wrapping its module function."""
    module = importlib.import_module("pyhessian.hessian")  # the module, not the class `pyhessian.hessian`
    calls = [0]
    original = module.hessian_vector_product

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counting

    def read():
        module.hessian_vector_product = original
        return calls[0]

    return read


# --------------------------------------------------------------------------- references
def exact_top(model, x, y) -> float:
    m64 = copy.deepcopy(model).double()
    op = HessianOperator(m64, x.double(), y)
    return float(linalg.lanczos_eigs(op, op.dim, 1, 400, 1e-10, torch.Generator().manual_seed(123),
                                     rule="residual").top[0])


def reference_trace(model, x, y, sketch: int, probes: int) -> tuple[float, float, str]:
    """(value, standard error, description): exact if the model is small, else a long float64 Hutch++."""
    m64 = copy.deepcopy(model).double()
    op = HessianOperator(m64, x.double(), y)
    if op.dim <= EXACT_TRACE_MAX_PARAMS:
        eye = torch.eye(op.dim, dtype=torch.float64)
        return float(sum(float(op.matvec(e)[i]) for i, e in enumerate(eye))), 0.0, f"exact ({op.dim} products)"
    res = linalg.hutchpp(op, op.dim, sketch, probes, 0.0, torch.Generator().manual_seed(321))
    return res.value, res.stderr, f"float64 Hutch++, {res.n_products} products"


# --------------------------------------------------------------------------- sections
def rel(value: float, exact: float) -> float:
    return abs(value - exact) / abs(exact)


def row(name: str, seconds: float, products, errors: list[float], values: list[float]) -> None:
    print(f"  {name:<30} {seconds:9.3f} {np.median(products):7.0f} {np.median(values):12.5g} "
          f"{np.median(errors):10.2e} {np.max(errors):10.2e}")


def header(title: str) -> None:
    print(f"\n{title}\n  {'method':<30} {'time (s)':>9} {'HVPs':>7} {'value':>12} {'med err':>10} {'max err':>10}")


def run_rows(model, x, y, exact: float, repeats: int, entries) -> dict[str, tuple[float, list[float], float, list[float]]]:
    """Time (interleaved) and print each (name, fn(model, x, y, r) -> (value, products)); return
    name -> (median seconds, relative errors, median products, each repeat's seconds)."""
    fns = {name: (lambda r, fn=fn: fn(model, x, y, r)) for name, fn in entries}
    out, times = {}, {}
    for name, (seconds, res) in timed(fns, repeats, times).items():
        out[name] = (seconds, [rel(v, exact) for v, _ in res], float(np.median([n for _, n in res])), times[name])
        row(name, seconds, [n for _, n in res], out[name][1], [v for v, _ in res])
    return out


def errors(e: list[float]) -> str:
    return f"{np.median(e):.1e} / {np.max(e):.1e}"


OURS = (("gap", "gradient"), ("residual", "gradient"), ("gap", "random"), ("residual", "random"),
        ("change", "random"))  # the first is the metric's rule and start
METRIC_DEFAULT = "ours: gap rule, gradient start, lambda_max and lambda_min (the metric's default without a density)"


def ours_name(rule: str, start: str) -> str:
    return f"ours: {rule} rule, {start} start"


def compare_top(model, x, y, exact: float, repeats: int, label: str) -> str:
    """Section 1 on one model, printed; returns its markdown."""
    header(f"1. {label}: top eigenvalue, same tolerance (tol {TOL:g}, <= {MAX_ITER} products); exact = {exact:.8g} "
           f"(float64 Lanczos, residual 1e-10)")
    res = run_rows(model, x, y, exact, repeats, [("PyHessian power iteration", pyhessian_top)] + [
        (ours_name(rule, start), lambda m, a, b, r, rule=rule, start=start: ours_top(m, a, b, r, rule, start))
        for rule, start in OURS] + [(METRIC_DEFAULT, lambda m, a, b, r: ours_top(m, a, b, r, both_ends=True))])
    py = res["PyHessian power iteration"]
    for name in list(res)[1:]:
        t, e, _, ts = res[name]
        print(f"  {name[6:50]:<26}: speed-up {paired_ratio(py[3], ts):.2f}x (target >= 2x), median error ours / "
              f"PyHessian {np.median(e) / np.median(py[1]):.2g}, max error ours / PyHessian "
              f"{np.max(e) / np.max(py[1]):.2g} (target <= 1)")
    default = ours_name(*OURS[0])
    print(f"\n  same error: PyHessian with tighter tolerances (<= 1000 products) vs {default[6:]} at tol {TOL:g}")
    tighter = run_rows(model, x, y, exact, repeats, [
        (f"PyHessian power, tol {t:g}", lambda m, a, b, r, t=t: pyhessian_top(m, a, b, r, t, 1000))
        for t in (1e-4, 1e-5, 1e-6)] + [(default, lambda m, a, b, r: ours_top(m, a, b, r))])
    ours_again = tighter.pop(default)
    match = next((n for n, (_, e, _, _) in tighter.items() if np.median(e) <= np.median(ours_again[1])), None)
    if match:
        speed = paired_ratio(tighter[match][3], ours_again[3])
        print(f"  first PyHessian setting with median error <= ours: {match}; speed-up {speed:.2f}x")
        same = (f"The first PyHessian setting whose median error is at most ours (gap rule, gradient start, "
                f"lambda_max alone): {match}; ours is **{speed:.2f}x** faster (timed alternating with it).")
    else:
        print("  no PyHessian setting tried reached our median error")
        same = ("No PyHessian setting tried (tol down to 1e-6) reached the median error of ours (gap rule, gradient "
                "start, lambda_max alone).")
    rows = []
    for name, (t, e, n, ts) in res.items():
        tag = " (lambda_max alone, as PyHessian)" if name == default else ""
        speed = paired_ratio(py[3], ts)
        rows.append([name + tag, f"{t:.3f}", f"{n:.0f}", errors(e),
                     f"**{speed:.2f}x**" if name == default else f"{speed:.2f}x"])
    for name, (t, e, n, ts) in tighter.items():
        rows.append([name, f"{t:.3f}", f"{n:.0f}", errors(e), f"ours {paired_ratio(ts, ours_again[3]):.2f}x faster"])
    return (f"{label}: top eigenvalue at tol {TOL:g} (at most {MAX_ITER} products; PyHessian at tighter tolerances "
            f"at most 1000); exact value {exact:.6g} (float64 Lanczos). Every row computes lambda_max alone, as "
            f"PyHessian's `eigenvalues` does, except the metric's default, which also waits for lambda_min (for the "
            f"eigenvalue of largest magnitude, signed). Speed: the median over repeats of PyHessian's time / the row's "
            f"(the tighter PyHessian rows: the row's time / ours', timed together):\n\n"
            + report.table(["method", "time (s)", "products", "median / max relative error",
                            f"speed vs PyHessian at tol {TOL:g}"], rows) + "\n\n" + same)


def compare_trace(model, x, y, ref: tuple[float, float, str], repeats: int, label: str) -> str:
    """Section 2 on one model, printed; returns its markdown."""
    value, stderr, how = ref
    m = EQUAL_PRODUCTS
    fixed = f"ours: Hutch++, {m} products (sketch {m // 3} + {m // 3} probes, tol 0)"
    equal = f"PyHessian Hutchinson, {m} probes (tol 0)"
    header(f"2. {label}: trace (tol {TOL:g}, <= {MAX_ITER} probes); reference = {value:.6g} +- {stderr:.2g} ({how})")
    res = run_rows(model, x, y, value, repeats, (
        ("PyHessian Hutchinson", pyhessian_trace), ("ours: Hutchinson", ours_trace),
        ("ours: Hutch++ (sketch 10)", lambda m, a, b, r: ours_trace(m, a, b, r, sketch=10)),
        (fixed, lambda net, a, b, r: ours_trace(net, a, b, r, m // 3, m // 3, 0.0)),
        (equal, lambda net, a, b, r: pyhessian_trace(net, a, b, r, m, 0.0))))
    py, plus, same = res["PyHessian Hutchinson"], res[fixed], res[equal]
    rows = []
    for name, (t, e, n, ts) in res.items():
        speed = paired_ratio(py[3], ts)
        ratio = np.median(e) / np.median(py[1])
        print(f"  {name}: speed vs PyHessian {speed:.2f}x, median error / PyHessian's {ratio:.2g}")
        rows.append([name, f"{t:.3f}", f"{n:.0f}", errors(e), f"{speed:.2f}x", f"{ratio:.2f}x"])
    time_ratio = paired_ratio(plus[3], same[3])
    error_ratio = np.median(plus[1]) / np.median(same[1])
    print(f"  equal products: Hutch++ time / PyHessian's {time_ratio:.2f}, median error / PyHessian's {error_ratio:.2f}")
    return (f"{label}: trace at tol {TOL:g} (at most {MAX_ITER} probes); reference {value:.6g} +- {stderr:.2g} "
            f"({how}); speed: the median over repeats of PyHessian's time at tol {TOL:g} / the row's:\n\n"
            + report.table(["method", "time (s)", "products", "median / max relative error", "speed vs PyHessian",
                            "median error / PyHessian's"], rows)
            + f"\n\nAt equal products ({m} each, timed together): ours: Hutch++ takes **{time_ratio:.2f}x** the time "
            f"of PyHessian's Hutchinson for **{error_ratio:.2f}x** its median error.")


def first_within(history: list[float], exact: float, target: float) -> int | None:
    """1-based index from which every later estimate is within `target` relative error (None: never)."""
    ok = [rel(v, exact) <= target for v in history]
    for i in range(len(ok)):
        if all(ok[i:]):
            return i + 1
    return None


def histories(op, exact: float, target: float, max_iter: int, seed: int, hint=None) -> dict:
    """Per product, from the same start (random, or mixed with `hint`): the top Ritz value of Lanczos with
    its gap bound (`linalg.ritz_bounds`) and residual, and power iteration's Rayleigh quotient with its
    residual (all relative to the value); each run until it is within `target` of `exact` for three
    products in a row and its residual is below `target` (or `max_iter`)."""
    def settled(h):
        return len(h) >= 3 and all(rel(v, exact) <= target for v in h[-3:])

    lz, lz_gap, lz_res = [], [], []

    def record(run):
        theta, s = run.ritz()
        r, bound = linalg.ritz_bounds(theta, s, run.residual, np.array([len(theta) - 1]))
        lz.append(float(theta[-1]))
        lz_gap.append(float(bound[0]) / abs(theta[-1]))
        lz_res.append(float(r[0]) / abs(theta[-1]))
        return settled(lz) and lz_res[-1] <= target

    linalg.lanczos(op, linalg.start_vector(op.dim, torch.Generator().manual_seed(seed), hint=hint), max_iter,
                   stop=record)
    pw = linalg.power_iteration(op, op.dim, max_iter, 0.0, torch.Generator().manual_seed(seed),
                                stop=lambda h, r: settled(h) and r[-1] / abs(h[-1]) <= target, hint=hint)
    return dict(lz=lz, lz_gap=lz_gap, lz_res=lz_res, pw=pw.history,
                pw_res=[r / abs(mu) for r, mu in zip(pw.residuals, pw.history)])


def certified_at(values: list[float], bounds: list[float], exact: float, target: float) -> tuple[float, float]:
    """(1-based product at which the relative bound first is <= target, true relative error there / target);
    (inf, nan) if it never is."""
    i = next((i for i, b in enumerate(bounds) if b <= target), None)
    return (np.inf, np.nan) if i is None else (i + 1, rel(values[i], exact) / target)


def compare_counts(models_: dict, x, y, max_iter: int, seeds: int) -> str:
    """Section 3, printed; returns its markdown."""
    targets = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    oracle, certified = [], []
    print(f"\n3. products to reach a relative error of the top eigenvalue (float64 copies of the models, so no float32 "
          f"floor; median over {seeds} random starts, the same for both; <= {max_iter} products)")
    runs = {}
    for label, model in models_.items():
        exact = exact_top(model, x, y)
        op = HessianOperator(copy.deepcopy(model).double(), x.double(), y)
        hint = op.gradient()
        runs[label] = (exact, [histories(op, exact, targets[-1], max_iter, s) for s in range(seeds)],
                       [histories(op, exact, targets[-1], max_iter, s, hint) for s in range(seeds)])
    for title, which in (("(a) same random start (as in PyHessian)", 1), ("(b) same gradient-mixed start", 2)):
        print(f"  {title}\n  {'model':<18} {'target':>7} {'Lanczos':>8} {'power':>7} {'ratio':>6}"
              "   (target ratio >= 3)")
        for label, run in runs.items():
            exact, hs = run[0], run[which]
            cells = []
            for target in targets:
                a = np.median([first_within(h["lz"], exact, target) or np.inf for h in hs])
                b = np.median([first_within(h["pw"], exact, target) or np.inf for h in hs])
                print(f"  {label:<18} {target:7.0e} {a:8.0f} {b:7.0f} {b / a:6.1f}")
                cells.append(f"{a:.0f} / {b:.0f}: {b / a:.1f}x")
            oracle.append([label, title.split(" ", 2)[2].removesuffix(" (as in PyHessian)"), *cells])
    print("  (c) products until the method's own bound certifies the target (random start; median over starts), "
          "and the worst true error there / target\n"
          f"  {'model':<18} {'target':>7} {'L gap':>6} {'err':>5} {'L res':>6} {'err':>5} {'P res':>6} {'err':>5} "
          f"{'P/Lgap':>7} {'P/Lres':>7}")
    for label, (exact, hs, _) in runs.items():
        cells = []
        for target in targets:
            cols = []
            for vals, bnds in (("lz", "lz_gap"), ("lz", "lz_res"), ("pw", "pw_res")):
                at = [certified_at(h[vals], h[bnds], exact, target) for h in hs]
                cols.append((np.median([a for a, _ in at]), np.nanmax([e for _, e in at] + [np.nan])))
            (lg, eg), (lr, er), (pr, ep) = cols
            print(f"  {label:<18} {target:7.0e} {lg:6.0f} {eg:5.2f} {lr:6.0f} {er:5.2f} {pr:6.0f} {ep:5.2f} "
                  f"{pr / lg:7.1f} {pr / lr:7.1f}")
            cells.append(f"{lg:.0f} ({eg:.2f}) / {lr:.0f} ({er:.2f}) / {pr:.0f} ({ep:.2f})")
        certified.append([label, *cells])
    head = [f"{t:.0e}" for t in targets]
    oracle.sort(key=lambda r: list(models_).index(r[0]))
    return (f"Products until the top eigenvalue stays within a relative error (float64 copies, median of {seeds} "
            "starts, the same for both): Lanczos / power iteration: ratio\n\n"
            + report.table(["model", "start", *head], oracle)
            + f"\n\nProducts until each method's own bound certifies the target (random start, median of {seeds}): "
            "Lanczos gap rule / Lanczos residual rule / power iteration's residual, each with its worst true error "
            f"there over the {seeds} starts in units of the target (at most 1: the certificate held in those starts; "
            "section 6 counts over many starts)\n\n" + report.table(["model", *head], certified))


def exact_eigs(model, x, y, k: int) -> tuple[np.ndarray, float]:
    """(the k largest algebraic eigenvalues, the smallest one) of the float64 Hessian, to a residual of 1e-10."""
    op = HessianOperator(copy.deepcopy(model).double(), x.double(), y)
    eigs = linalg.lanczos_eigs(op, op.dim, k, 400, 1e-10, torch.Generator().manual_seed(123), rule="residual")
    return eigs.top, eigs.bottom


def topk_errors(values: np.ndarray, exact: np.ndarray) -> float:
    """Largest relative error of the estimates of lambda_1..lambda_k (inf while fewer than k are known)."""
    if len(values) < len(exact):
        return np.inf
    return float(np.max(np.abs(values[:len(exact)] - exact) / np.abs(exact)))


def first_within_k(history: list[np.ndarray], exact: np.ndarray, target: float) -> float:
    """1-based product from which the k largest Ritz values all stay within `target` (inf: never)."""
    ok = [topk_errors(h, exact) <= target for h in history]
    return next((i + 1 for i in range(len(ok)) if all(ok[i:])), np.inf)


def lanczos_topk_history(op, k: int, exact: np.ndarray, target: float, max_iter: int, seed: int) -> list[np.ndarray]:
    """The k largest Ritz values after every product, from a random start, until all are within `target`
    for three products in a row (or `max_iter`)."""
    history: list[np.ndarray] = []

    def record(run):
        history.append(run.ritz()[0][::-1][:k])
        return len(history) >= 3 and all(topk_errors(h, exact) <= target for h in history[-3:])

    linalg.lanczos(op, linalg.start_vector(op.dim, torch.Generator().manual_seed(seed), dtype=vector_dtype(op)),
                   max_iter, stop=record, dtype=vector_dtype(op))
    return history


def power_topk_histories(op, exact: np.ndarray, target: float, max_iter: int, seed: int) -> list[list[float]]:
    """Power iteration with deflation (PyHessian's `top_n`): stage i iterates on H deflated by the vectors
    of stages 1..i-1 from its own random start, until its Rayleigh quotient is within `target` of
    lambda_i for three products in a row (or `max_iter`); the Rayleigh quotients of every stage."""
    found = torch.empty(op.dim, 0, dtype=vector_dtype(op))
    stages = []
    for i, lam in enumerate(exact):
        run = linalg.power_iteration(op, op.dim, max_iter, 0.0, torch.Generator().manual_seed(1000 * seed + i),
                                     dtype=vector_dtype(op), deflate=found,
                                     stop=lambda h, r, lam=lam: len(h) >= 3 and all(rel(v, lam) <= target
                                                                                    for v in h[-3:]))
        stages.append(run.history)
        found = torch.cat([found, run.vector[:, None]], dim=1)
    return stages


def compare_topk(models_: dict, x, y, ks: tuple[int, ...], max_iter: int, seeds: int) -> str:
    """Section 5: products for the top-k eigenvalues, Lanczos against power iteration with deflation; printed,
    and returned as markdown."""
    targets = (1e-2, 1e-3, 1e-4)
    rows, spectra = [], []
    k_max = max(ks)
    print(f"\n5. products until all of the k largest eigenvalues are within a relative error (float32, as the metric; "
          f"random starts; median over {seeds} starts; <= {max_iter} products per Lanczos run and per power stage)\n"
          "  Lanczos: the product from which the k largest Ritz values stay within the target; power iteration "
          "with deflation (PyHessian's top_n): the sum over its k stages of the product from which each stage's "
          "estimate stays within the target, each stage run to the tightest target first, so the power counts "
          "are lower bounds of what it needs")
    print(f"  {'model':<18} {'k':>3} {'target':>7} {'Lanczos':>8} {'power':>7} {'ratio':>6}   (target ratio >= 3)")
    for label, model in models_.items():
        exact, smallest = exact_eigs(model, x, y, k_max)
        op = HessianOperator(model, x, y)
        comparable = [k for k in ks if exact[k - 1] > abs(smallest)]
        print(f"  {label}: lambda_1..{k_max} = " + ", ".join(f"{v:.4g}" for v in exact) + f"; lambda_min = {smallest:.4g}"
              + "".join(f"; k = {k} left out (lambda_{k} < |lambda_min|: power iteration finds another set)"
                        for k in ks if k not in comparable))
        spectra.append(f"{label}: lambda_1..{k_max} = " + ", ".join(f"{v:.4g}" for v in exact)
                       + f", lambda_min = {smallest:.4g}")
        rows += [[label, k, "lambda_k < \\|lambda_min\\|: not comparable", "", ""] for k in ks if k not in comparable]
        if not comparable:
            continue
        exact = exact[:max(comparable)]
        lz = [lanczos_topk_history(op, len(exact), exact, targets[-1], max_iter, s) for s in range(seeds)]
        pw = [power_topk_histories(op, exact, targets[-1], max_iter, s) for s in range(seeds)]
        for k in comparable:
            cells = []
            for target in targets:
                a = np.median([first_within_k(h, exact[:k], target) for h in lz])
                b = np.median([sum(first_within(st, lam, target) or np.inf for st, lam in zip(stages[:k], exact))
                               for stages in pw])
                print(f"  {label:<18} {k:3d} {target:7.0e} {a:8.0f} {b:7.0f} {b / a:6.1f}")
                cells.append(f"{a:.0f} / {b:.0f}: {b / a:.1f}x")
            rows.append([label, k, *cells])
    rows.sort(key=lambda r: (list(models_).index(r[0]), r[1]))
    return (f"Products until all of the k largest eigenvalues stay within a relative error (float32, median of {seeds} "
            "random starts): Lanczos / power iteration with deflation: ratio. " + "; ".join(spectra) + ".\n\n"
            + report.table(["model", "k", *(f"{t:.0e}" for t in targets)], rows))


def compare_hvp(model, x, y, repeats: int, label: str = "resnet1d") -> str:
    """Section 4, printed; returns its markdown."""
    print("\n4. one Hessian-vector product (median ms; graph build excluded for the cached method)")
    rows = []
    torch.manual_seed(0)
    mlp = models.create("mlp", 32, (x.shape[1],), 10).eval()
    for label, net in ((label, model), ("mlp width 32 at init", mlp)):
        ops = {m: HessianOperator(net, x, y, method=m) for m in ("double_backward", "func")}
        v = torch.randn(ops["func"].dim, generator=torch.Generator().manual_seed(0))
        ms = {m: 1e3 * t for m, (t, _) in timed({m: (lambda r, op=op: op.matvec(v)) for m, op in ops.items()},
                                                  max(repeats, 20)).items()}
        print(f"  {label:<14} double backward {ms['double_backward']:8.2f}   func jvp(grad) {ms['func']:8.2f}   "
              f"func / double backward {ms['func'] / ms['double_backward']:.2f}x")
        rows.append([label, f"{ms['double_backward']:.2f}", f"{ms['func']:.2f}",
                     f"{ms['func'] / ms['double_backward']:.2f}x"])
    return ("One Hessian-vector product, median ms:\n\n"
            + report.table(["model", "cached double backward (default)", "torch.func forward-over-reverse",
                            "func / double backward"], rows))


CERT_CONFIGS = [(rule, start, False) for rule, start in OURS[:4]] + [("gap", "gradient", True), ("power", "random", False)]


def cert_label(rule: str, start: str, both_ends: bool) -> str:
    if rule == "power":
        return "power iteration, change rule (PyHessian's)"
    return f"{rule} rule, {start} start" + (", both ends (the metric's default)" if both_ends else "")


def certificate_runs(op, exact: float, starts: int, configs=CERT_CONFIGS) -> dict:
    """(rule, start, both_ends) -> (products, relative errors / TOL) of each random start r = 0..starts-1, at TOL
    with float32 vectors as the metric; `exact` is lambda_max."""
    hint = op.gradient()
    out = {}
    for rule, start, both in configs:
        used, errs = [], []
        for r in range(starts):
            g = torch.Generator().manual_seed(r)
            if rule == "power":
                res = linalg.power_iteration(op, op.dim, MAX_ITER, TOL, g, dtype=vector_dtype(op))
                value, n = res.eigenvalue, res.n_products
            else:
                res = linalg.lanczos_eigs(op, op.dim, 1, MAX_ITER, TOL, g, rule=rule, dtype=vector_dtype(op),
                                          hint=hint if start == "gradient" else None, magnitude=both)
                value, n = float(res.top[0]), res.n_products
            used.append(n)
            errs.append(rel(value, exact) / TOL)
        out[(rule, start, both)] = (used, errs)
    return out


def compare_certificates(models_: dict, x, y, starts: int) -> str:
    """Section 6: each rule's answer against the exact lambda_max over `starts` random starts per model."""
    print(f"\n6. certificates at tol {TOL:g} over {starts} random starts (float32): median products, worst error / tol, "
          "starts beyond tol")
    rows = []
    for label, model in models_.items():
        exact = exact_top(model, x, y)
        runs = certificate_runs(HessianOperator(model, x, y), exact, starts)
        for config, (used, errs) in runs.items():
            beyond = sum(e > 1 for e in errs)
            print(f"  {label:<40} {cert_label(*config):<52} {np.median(used):5.1f} {max(errs):8.3g} {beyond:3d}/{starts}",
                  flush=True)
            rows.append([label, cert_label(*config), f"{np.median(used):.0f}", f"{max(errs):.2f}", f"{beyond} of {starts}"])
    return (f"Certificates at tol {TOL:g}: each rule's answer for lambda_max against the exact value (float64 Lanczos) "
            f"over {starts} random starts per model (seeds 0..{starts - 1}; float32 vectors, at most {MAX_ITER} "
            "products). The gap rule's bound min(r, r^2 / gap) holds only under its gap assumption "
            "(`linalg.ritz_bounds`); the residual rule's bound r needs none. Worst error in units of tol (at most 1: "
            "every answer within tol):\n\n"
            + report.table(["model", "rule and start", "median products", "worst error / tol", "starts beyond tol"],
                           rows))


SWEEP = [("resnet1d", 4), ("resnet1d", 8), ("resnet1d", 32), ("mlp", 32), ("mlp", 128)]


def sweep(ds, x, y, starts: int) -> None:
    configs = list(OURS[:4])
    print(f"\n7. stopping rules on 20 Hessians, tol {TOL:g}, {starts} random starts each: median products / worst "
          f"error in units of tol / runs beyond tol (float32 products, float32 vectors)")
    print(f"  {'model':<16} {'lambda_1':>9} {'lambda_2':>9} " + " ".join(f"{r + '/' + st[:4]:>17}" for r, st in configs)
          + f" {'power (ref.)':>17}")
    total = {c: [0, 0] for c in configs + [("power", "random")]}
    for arch, width in SWEEP:
        for epochs in (0, 1, 5, 20):
            model = trained_model(width, epochs, ds, arch)
            m64 = copy.deepcopy(model).double()
            op64 = HessianOperator(m64, x.double(), y)
            top2 = linalg.lanczos_eigs(op64, op64.dim, 2, 400, 1e-10, torch.Generator().manual_seed(123),
                                       rule="residual").top
            runs = certificate_runs(HessianOperator(model, x, y), float(top2[0]), starts,
                                    [(rule, start, False) for rule, start in total])
            cells = []
            for (rule, start, _), (used, errors) in runs.items():
                fails = sum(e > 1 for e in errors)
                total[(rule, start)][0] += fails
                total[(rule, start)][1] += starts
                cells.append(f"{np.median(used):4.1f} {max(errors):7.2g} {fails:2d}")
            print(f"  {arch + ' ' + str(width) + ', ' + str(epochs) + ' ep':<16} {top2[0]:9.4g} {top2[1]:9.4g} "
                  + " ".join(f"{c:>17}" for c in cells), flush=True)
    print("  runs beyond tol: " + ", ".join(f"{r} rule {st} start {f}/{n}" if r != "power" else
                                            f"power iteration {f}/{n}" for (r, st), (f, n) in total.items()))


def model_label(arch: str, width: int, model: nn.Module, epochs: int) -> str:
    kind = " (BatchNorm conv net)" if arch == "resnet1d" else ""
    return f"{arch} width {width}{kind}, {models.n_params(model)} parameters, trained {epochs} ep"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet1d:7", "resnet1d:16", "mlp:64"],
                    help="arch:width of the models of sections 1 and 2; sections 3-5 use the first")
    ap.add_argument("--cert-models", nargs="+", default=["resnet1d:7", "mlp:64"], help="arch:width of section 6's models")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--power-iters", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3, help="random starts in sections 3 and 5")
    ap.add_argument("--starts", type=int, default=40, help="random starts per model in section 6")
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 3, 5], help="k in section 5")
    ap.add_argument("--ref-sketch", type=int, default=50)
    ap.add_argument("--ref-probes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default="/tmp/pd_data")
    ap.add_argument("--sweep", action="store_true", help="add section 7 (robustness over 20 Hessians)")
    ap.add_argument("--sweep-starts", type=int, default=10)
    ap.add_argument("--write-docs", action="store_true", help="write the tables of sections 1-6 into docs/performance.md")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Using backward.. with create_graph=True")  # PyHessian's own call
    torch.set_num_threads(args.threads)
    ds = data.load("mnist1d", cache_dir=args.cache_dir)
    b = ds.train.batch(args.batch, torch.Generator().manual_seed(0))
    x, y = b.x, b.y
    trained = {}
    for spec in dict.fromkeys(args.models + args.cert_models):
        arch, width = spec.split(":")
        model = trained_model(int(width), args.epochs, ds, arch)
        trained[spec] = (model_label(arch, int(width), model, args.epochs), model)
    nets = dict(trained[spec] for spec in args.models)
    print("; ".join(nets) + f"; batch {len(y)} of MNIST-1D; float32; {args.threads} thread(s)")
    parts = [f"Models: {'; '.join(nets)} (SGD on MNIST-1D); batch {len(y)} of MNIST-1D, float32, {args.threads} "
             f"thread(s); times are medians of {args.repeats} repeats. The top eigenvalue and the trace against "
             "PyHessian on every model; the certificates on "
             + " and ".join(trained[spec][0] for spec in args.cert_models)
             + f"; the product counts and the Hessian-vector product on the first ({next(iter(nets))}) and that "
             "architecture at init."]
    for label, model in nets.items():
        parts.append(compare_top(model, x, y, exact_top(model, x, y), args.repeats, label))
    for label, model in nets.items():
        parts.append(compare_trace(model, x, y, reference_trace(model, x, y, args.ref_sketch, args.ref_probes),
                                   args.repeats, label))
    parts.append(compare_certificates(dict(trained[spec] for spec in args.cert_models), x, y, args.starts))
    first_label, first = next(iter(nets.items()))
    arch, width = args.models[0].split(":")
    at_init = trained_model(int(width), 0, ds, arch)
    pair = {f"{arch} width {width}, trained {args.epochs} ep": first, f"{arch} width {width}, at init": at_init}
    parts.append(compare_counts(pair, x, y, args.power_iters, args.seeds))
    parts.append(compare_hvp(first, x, y, args.repeats, first_label))
    parts.append(compare_topk(pair, x, y, tuple(args.top_k), args.power_iters, args.seeds))
    if args.write_docs:
        report.write_section("hessian", report.command(__file__, argv), "\n\n".join(parts))
    if args.sweep:
        sweep(ds, x, y, args.sweep_starts)


if __name__ == "__main__":
    main()
