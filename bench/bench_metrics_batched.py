"""Metric work done together vs one after another: the per-seed evaluations of a cell (`loss_acc`),
the Monte Carlo samples of `local_energy`, the `hessian` of a cell's seeds and the `curve`'s bends.

Side by side in one process, one torch thread (as the pool's workers), on resnet1d models of
MNIST-1D's shape (random weights and data: timing does not depend on the values; BatchNorm in
eval mode with its initial statistics):

1. `loss_acc` of the S seeds of a cell on 4000 + 1000 examples: S calls of `loss_acc` (what
   the job does) vs `ensemble_models.evaluate_members` on both splits (one ensemble forward per
   batch of 1000 for all seeds).
2. `local_energy` (M samples, sigmas 0.025..0.1, both splits of 1000 examples): batching "loop"
   (sample after sample, the default), "vmap" (torch.func.vmap over `sample_chunk` samples) and
   "ensemble" (`sample_chunk` perturbed copies as one ensemble model).
3. Hessian-vector products on 200 examples (cached double backward, as `hvp.HessianOperator`):
   8 vectors one after another vs one call with `is_grads_batched` (vmap over the vectors), and
   the S seeds one after another vs one double backward of their ensemble (block-diagonal H).
4. The `hessian` metric of the S seeds at the demo's options (`--preset demo`), each on its own
   200-example batch: seed after seed (`hessian`, products through `nn.Conv1d`) vs together
   (`hessian_seeds`: the seeds' estimators in lockstep, one ensemble backward per round of
   products) vs one seed at a time in the ensemble form (`hessian_seeds` of one model): the job
   with `policy.metric_group_size` 0, S or 1.
5. The `curve` metric's bend training for all S (S - 1) / 2 seed pairs at the demo's curve options
   (`--preset demo`: 3 epochs of 16 batches of 128): pair after pair (`train_bend`, through
   `nn.Conv1d`) vs together (`train_bends`: the pairs' bends as one ensemble) vs one pair at a
   time in the ensemble form: the job with `policy.pair_group_size` 0, all pairs or 1.

Printed: median seconds over `--repeats` alternating repeats after a warm-up, and the ratios
to the sequential form, with the largest difference between the values each form returns.

    python bench/bench_metrics_batched.py
    python bench/bench_metrics_batched.py --widths 8 32 --seeds 5 --repeats 5
    python bench/bench_metrics_batched.py --write-docs   # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from torch.nn import functional as F

from phasediagram import cli
from phasediagram.accel import ensemble_models
from phasediagram.data.datasets import Split
from phasediagram.metrics import MetricData, key
from phasediagram.metrics.curve import train_bend, train_bends
from phasediagram.metrics.hessian import hessian, hessian_seeds
from phasediagram.metrics.local_energy import LocalEnergyOptions, local_energy
from phasediagram.metrics.loss_acc import LossAccOptions, loss_acc
from phasediagram.models import families as models
from phasediagram.resolve import metric_options


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


def hvp_times(nets, repeats: int) -> tuple[dict[str, float], float]:
    """Seconds of: 8 products one by one, 8 by is_grads_batched; S seeds one by one, S as one ensemble;
    and the largest relative difference of the batched and the one-by-one products."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 40, generator=g), torch.randint(0, 10, (200,), generator=g)

    def graph(model, xs, ys):
        ps = list(model.parameters())
        out = model(xs)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ys, reduction="sum") / len(y)
        return ps, torch.autograd.grad(loss, ps, create_graph=True)

    ps, grads = graph(nets[0], x, y)
    vs = [torch.randn(8, *p.shape, generator=g) for p in ps]
    per_seed = [graph(m, x, y) for m in nets]
    ens = ensemble_models.from_models(nets).eval()
    e_ps, e_grads = graph(ens, x.unsqueeze(0).expand(len(nets), *x.shape), y.repeat(len(nets)))
    e_vs = [torch.randn_like(p) for p in e_ps]
    seed_vs = [[torch.randn_like(p) for p in m_ps] for m_ps, _ in per_seed]
    fns = {"vec seq": lambda: [torch.autograd.grad(grads, ps, [v[k] for v in vs], retain_graph=True) for k in range(8)],
           "vec batched": lambda: torch.autograd.grad(grads, ps, vs, retain_graph=True, is_grads_batched=True),
           "seed seq": lambda: [torch.autograd.grad(gr, m_ps, v, retain_graph=True)
                                for (m_ps, gr), v in zip(per_seed, seed_vs)],
           "seed ensemble": lambda: torch.autograd.grad(e_grads, e_ps, e_vs, retain_graph=True)}
    times, res = timed(fns, repeats)
    diff = max(float((a - b[3]).norm() / a.norm()) for a, b in zip(res["vec seq"][3], res["vec batched"]))
    return times, diff


def max_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)


def hessian_times(nets, d: MetricData, repeats: int) -> tuple[dict[str, float], float]:
    """Seconds of the demo's `hessian` of every model, seed after seed and together, and the largest
    relative difference of their scalar values (the density grid moves with rounding)."""
    options = metric_options(cli.spec_from_args(cli.build_parser().parse_args(["--preset", "demo"])), "hessian")

    def gens():
        return [torch.Generator().manual_seed(100 + s) for s in range(len(nets))]

    times, res = timed({"seq": lambda: [hessian(m, d, options, g) for m, g in zip(nets, gens())],
                        "together": lambda: hessian_seeds(nets, d, options, gens()),
                        "alone": lambda: [hessian_seeds([m], d, options, [g])[0] for m, g in zip(nets, gens())]},
                       repeats)
    diff = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(res["seq"], res["together"])
               for k in x if "density@" not in k)
    return times, diff


def bend_times(nets, d: MetricData, repeats: int) -> tuple[dict[str, float], float, int]:
    """Seconds of training the curve bends of all pairs of `nets` at the demo's curve options, pair after
    pair, together and one pair at a time in the ensemble form; the largest relative difference (norm)
    of a bend trained together and alone; the number of pairs."""
    options = metric_options(cli.spec_from_args(cli.build_parser().parse_args(["--preset", "demo"])), "curve")
    pairs = [(a, b) for i, a in enumerate(nets) for b in nets[i + 1:]]

    def gens():
        return [torch.Generator().manual_seed(200 + i) for i in range(len(pairs))]

    times, res = timed({"seq": lambda: [train_bend(a, b, d.train, options, g) for (a, b), g in zip(pairs, gens())],
                        "together": lambda: train_bends(pairs, d.train, options, gens(), [None] * len(pairs)),
                        "alone": lambda: [train_bends([p], d.train, options, [g], [None])[0]
                                          for p, g in zip(pairs, gens())]},
                       repeats)
    diff = max(float((x[n] - y[n]).norm() / x[n].norm()) for x, y in zip(res["seq"], res["together"]) for n in x)
    return times, diff, len(pairs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=20, help="local-energy Monte Carlo samples M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cell_data = data(4000, 1000)
    le_data = data(1000, 1000)
    print(f"one thread; {args.seeds} seeds; loss_acc on 4000 + 1000 examples; local energy M = {args.samples}, "
          f"sigmas 0.025-0.1, 1000 + 1000 examples; medians of {args.repeats}")
    print(f"{'width':>5} | {'loss_acc: seq':>13} {'cell':>7} {'ratio':>6} {'diff':>8} | {'local energy: loop':>18} "
          f"{'vmap':>7} {'ensemble':>8} {'loop/vmap':>9} {'loop/ens':>8} {'diff':>8}")
    rows = []
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
        hv, diff = hvp_times(nets, args.repeats)
        print(f"      | Hessian-vector products: 8 vectors {hv['vec seq']:.3f}s one by one, {hv['vec batched']:.3f}s "
              f"batched ({hv['vec seq'] / hv['vec batched']:.2f}x, rel. diff {diff:.1e}); {len(nets)} seeds "
              f"{hv['seed seq']:.3f}s one by one, {hv['seed ensemble']:.3f}s as one ensemble "
              f"({hv['seed seq'] / hv['seed ensemble']:.2f}x)", flush=True)
        ht, hdiff = hessian_times(nets, cell_data, args.repeats)
        print(f"      | hessian metric (demo options) of {len(nets)} seeds: {ht['seq']:.3f}s seed after seed, "
              f"{ht['together']:.3f}s together ({ht['seq'] / ht['together']:.2f}x, rel. diff {hdiff:.1e}), "
              f"{ht['alone']:.3f}s one at a time in the ensemble form ({ht['seq'] / ht['alone']:.2f}x)", flush=True)
        bt, bdiff, n_pairs = bend_times(nets, cell_data, args.repeats)
        print(f"      | curve bends (demo options) of {n_pairs} pairs: {bt['seq']:.3f}s pair after pair, "
              f"{bt['together']:.3f}s together ({bt['seq'] / bt['together']:.2f}x, rel. diff {bdiff:.1e}), "
              f"{bt['alone']:.3f}s one at a time in the ensemble form ({bt['seq'] / bt['alone']:.2f}x)", flush=True)
        ratios = [la_t["seq"] / la_t["cell"], le_t["loop"] / le_t["ensemble"], le_t["loop"] / le_t["vmap"],
                  hv["vec seq"] / hv["vec batched"], hv["seed seq"] / hv["seed ensemble"], ht["seq"] / ht["together"],
                  ht["seq"] / ht["alone"], bt["seq"] / bt["together"], bt["seq"] / bt["alone"]]
        rows.append([width, *(f"{r:.2f}x" for r in ratios)])
    if args.write_docs:
        k = args.seeds
        report.write_section("metrics_batched", report.command(__file__, argv), (
            f"resnet1d, one thread, {k} seeds, local energy M = {args.samples}; sequential / together, medians of "
            f"{args.repeats}:\n\n"
            + report.table(["width", f"loss_acc of {k} seeds as one ensemble", "local energy, samples as one ensemble",
                            "samples by vmap", "8 Hessian-vector products by vmap",
                            f"{k} seeds' products as one ensemble", f"`hessian` of {k} seeds in lockstep",
                            "`hessian` one seed at a time, alone", f"`curve` bends of {k * (k - 1) // 2} pairs together",
                            "`curve` one pair at a time, alone"], rows)))


if __name__ == "__main__":
    main()
