"""Fraction of the machine's fp32 peak reached by a training step of the widest demo model.

1. Peak: the largest fp32 matmul rate torch reaches with one thread (the job pool's workers run
   one thread each), max over n in 256..2048 of 2 n^3 / t(n x n @ n x n), t the perf_counter
   median of `--repeats` after a warm-up.
2. Analytic FLOPs of a training step: forward hooks on every Conv/Linear of the model record
   their output shapes; a convolution costs 2 * B * C_out * L_out * (C_in / groups) * k
   multiply-adds-as-two-FLOPs, a linear layer 2 * B * in * out. A training step costs the
   forward plus the backward's two products per layer (gradient w.r.t. the weights and w.r.t.
   the layer input, each as many FLOPs as the forward), i.e. 3 x forward, less the input
   gradient of the stem (the data needs none). BatchNorm, ReLU, pooling, the loss and the SGD
   update are left out (O(activations) / O(parameters), a few percent of the FLOPs, but
   memory-bound and so a large part of the time).
3. Achieved rate = FLOPs / (perf_counter median of a step) for the widest demo model (the demo
   preset read from the CLI, `--preset demo`) at each demo batch size: an ensemble step of
   S = len(seeds) members (S x the FLOPs), and one sequential member's step; the process keeps
   freed memory for reuse (`runtime.keep_freed_memory`), as the pool's workers do.

    python bench/bench_peak.py
    python bench/bench_peak.py --write-docs   # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from torch import nn

from phasediagram import cli
from phasediagram.accel import ensemble_models
from phasediagram.execution import runtime
from phasediagram.methods import build_method
from phasediagram.models import families as models
from phasediagram.training import ensemble


def call_times(fn, repeats: int, warmup: int = 2) -> list[float]:
    """perf_counter seconds of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    return statistics.median(call_times(fn, repeats, warmup))


def matmul_peak(repeats: int) -> tuple[float, int, dict[int, float]]:
    """(peak GFLOP/s, its n, {n: GFLOP/s}) of fp32 n x n matmuls."""
    rates = {}
    for n in (256, 384, 512, 768, 1024, 1536, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = median_time(lambda: torch.mm(a, b), repeats)
        rates[n] = 2 * n**3 / t / 1e9
    best = max(rates, key=rates.get)
    return rates[best], best, rates


def step_flops(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(forward FLOPs, training-step FLOPs) of `model` on batch `x` (see the module docstring)."""
    fwd: list[float] = []

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            k = 1
            for s in module.kernel_size:
                k *= s
            fwd.append(2.0 * output.numel() * module.in_channels // module.groups * k)
        elif isinstance(module, nn.Linear):
            fwd.append(2.0 * output.numel() * module.in_features)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    training = model.training
    with torch.no_grad():
        model.eval()(x)  # eval: leaves the BatchNorm statistics alone
    model.train(training)
    for h in handles:
        h.remove()
    forward = sum(fwd)
    return forward, 3 * forward - fwd[0]  # fwd[0]: the stem, whose input needs no gradient


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runtime.keep_freed_memory()  # as the pool's workers run
    spec = cli.spec_from_args(cli.build_parser().parse_args(["--preset", "demo"]))
    width, members = max(spec.widths), len(spec.seeds)
    peak, peak_n, rates = matmul_peak(args.repeats)
    print("fp32 matmul, one thread: " + ", ".join(f"n={n}: {r:.1f}" for n, r in rates.items()) + " GFLOP/s")
    print(f"peak: {peak:.1f} GFLOP/s (n = {peak_n})")
    torch.manual_seed(0)
    input_shape = (40,)
    ms = []
    for seed in range(members):
        torch.manual_seed(seed)
        ms.append(models.create(spec.arch, width, input_shape, 10))
    fwd1, _ = step_flops(ms[0], torch.randn(1, *input_shape))
    print(f"widest demo model: {spec.arch} width {width} ({models.n_params(ms[0])} parameters), "
          f"{fwd1 / 1e6:.2f} MFLOP forward per example; S = {members} seeds")
    print(f"{'batch':>5} {'step GFLOP':>10} {'ens ms':>8} {'ens GFLOP/s':>11} {'ens/peak':>8} "
          f"{'seq ms':>8} {'seq GFLOP/s':>11} {'seq/peak':>8}")
    ens = ensemble_models.from_models(ms)
    opt = ensemble.sgd(ens.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    method = build_method(spec, ms[0], lr=0.01, weight_decay=5e-4, seed=0)
    best = (0.0, 0)
    rows = []
    for batch in spec.batch_sizes:
        _, flops = step_flops(ms[0], torch.randn(batch, *input_shape))
        x, y = torch.randn(members, batch, *input_shape), torch.randint(0, 10, (members, batch))

        def ens_steps():
            for _ in range(args.steps):
                ensemble.ensemble_step(ens, opt, x, y)

        def seq_steps():
            for _ in range(args.steps):
                method.step(x[0], y[0], 0)

        t_ens = median_time(ens_steps, args.repeats) / args.steps
        t_seq = median_time(seq_steps, args.repeats) / args.steps
        r_ens, r_seq = members * flops / t_ens / 1e9, flops / t_seq / 1e9
        best = max(best, (r_ens / peak, batch))
        print(f"{batch:5d} {members * flops / 1e9:10.3f} {t_ens * 1e3:8.2f} {r_ens:11.1f} {100 * r_ens / peak:7.1f}% "
              f"{t_seq * 1e3:8.2f} {r_seq:11.1f} {100 * r_seq / peak:7.1f}%", flush=True)
        rows.append([batch, f"{t_ens * 1e3:.2f}", f"{r_ens:.1f}", f"{100 * r_ens / peak:.1f} %", f"{t_seq * 1e3:.2f}",
                     f"{r_seq:.1f}", f"{100 * r_seq / peak:.1f} %"])
    print(f"best: ensemble at batch {best[1]}: {100 * best[0]:.1f}% of peak (target >= 30%)")
    if args.write_docs:
        report.write_section("peak", report.command(__file__, argv),
                             f"fp32 matmul peak, one thread: **{peak:.1f} GFLOP/s** (n = {peak_n}). Model: {spec.arch} "
                             f"width {width} ({models.n_params(ms[0])} parameters), S = {members} seeds; per training "
                             "step:\n\n" + report.table(
                                 ["batch", "ensemble ms", "GFLOP/s", "of peak", "one seed ms", "GFLOP/s", "of peak"],
                                 rows) + f"\n\nBest: the ensemble at batch {best[1]}, **{100 * best[0]:.1f} %** of "
                             "the peak.")


if __name__ == "__main__":
    main()
