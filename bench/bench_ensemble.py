"""Ensemble vs sequential training of S seeds, per (width, batch size): the table behind `policy.group_size`.

For each (width, batch size) this times, side by side in one process, the same training work
done two ways, with one torch thread (as the job pool's workers run):

- sequential: S runs one after another, each `steps` SGD steps of its own `methods` SGD
  (exactly the step `train.train_seed` takes: gather the batch, forward, cross-entropy,
  backward, `torch.optim.SGD` step with momentum 0.9 and weight decay 5e-4);
- ensemble: `steps` steps of one S-member ensemble (`ensemble.ensemble_step`, every member
  with its own batch: x of shape (S, B, 40); its SGD `ensemble.sgd`, as `ensemble.assemble` builds it);
- auto: what `--ensemble auto` trains, groups of g = `policy.group_size` members (timed as
  one g-member ensemble when 0 < g < S, for round(S / g) x `steps` steps, so that each arm's
  repeat holds about as many member-steps; g = S is the ensemble, g = 0 the sequential runs).

Reported per cell: ms per member-step of each (`time.perf_counter` medians over `--repeats` repeats
after a warm-up, the arms timed in turn within each repeat), and the ratios sequential / ensemble
and sequential / auto as medians of the repeats' paired ratios (the two arms of one repeat run a
second or so apart, so the machine's drifting speed cancels), the first ratio also from thread CPU
time (`time.thread_time`, less disturbed when other processes share the cores). And the bound
arithmetic puts on the ratio: the sequential step's FLOP rate as a fraction of the machine's fp32
matmul peak (`bench_peak.matmul_peak`, one thread; FLOPs by `bench_peak.step_flops`, 3x the analytic
forward), and the fraction an ensemble step would have to reach for 4x (4 x that; above 100 % no
implementation can reach 4x on this machine). And a floor from torch's own kernels (`kernel_floor`):
the ensemble step's matrix products ("mm") and its BatchNorm and ReLU passes ("bn+relu"), each timed
alone on its shapes (the fastest of the repeats), per member-step; "floor/4x" = their sum over the
time a 4x faster step may take (sequential / 4; above 100 % no ensemble built from these kernels
reaches 4x, even with nothing between them), "max ratio" = sequential / floor. `steps` is set so
that one sequential repeat takes about `--seconds` (timed on the warm-up). The process keeps freed
memory for reuse (`runtime.keep_freed_memory`), as the pool's workers do. Data: random inputs of
MNIST-1D's shape (4000 x 40, 10 classes); the timing does not depend on the values.

    python bench/bench_ensemble.py                       # resnet1d, widths 8 32 128 x batch 16 128 512
    python bench/bench_ensemble.py --arch mlp --repeats 3
    python bench/bench_ensemble.py --write-docs          # also writes its table into docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import report  # bench/report.py
import torch
from bench_peak import call_times, matmul_peak, step_flops  # bench/ is the script's folder, so on sys.path
from torch import nn

from phasediagram.accel import ensemble_models, policy
from phasediagram.execution import runtime
from phasediagram.methods import build_method
from phasediagram.models import families as models
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.training import ensemble


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet1d", choices=sorted(ensemble_models.ARCHS))
    p.add_argument("--widths", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128, 512])
    p.add_argument("--members", type=int, default=5, help="seeds trained together (S)")
    p.add_argument("--seconds", type=float, default=0.4, help="target duration of one sequential repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--conv", default="auto", choices=["auto", "bmm", "grouped"], help="ensemble convolution (resnets)")
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/performance.md")
    return p.parse_args(argv)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def bench_cell(arch: str, width: int, batch: int, members: int, seconds: float, repeats: int, conv: str,
               group: int):
    """(steps, {"seq", "ens", "auto": [(wall, cpu) seconds per member-step, one per repeat]}), the three
    timed in turn in every repeat; auto is a `group`-member ensemble (or one of the other two when group
    is 0 or S)."""
    spec = ExperimentSpec(name="bench", arch=arch, widths=(width,), batch_sizes=(batch,), seeds=tuple(range(members)),
                          metrics=())
    g = torch.Generator().manual_seed(0)
    n = 4000
    x, y = torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)
    runs = []
    for seed in range(members):
        torch.manual_seed(seed)
        model = models.create(arch, width, (40,), 10)
        runs.append(build_method(spec, model, lr=0.01, weight_decay=5e-4, seed=seed))
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(members)])

    def ensemble_of(k):
        ens = ensemble_models.from_models([r.model for r in runs[:k]], conv).train()
        return ens, ensemble.sgd(ens.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    full, part = ensemble_of(members), (ensemble_of(group) if 0 < group < members else None)
    for r in runs:
        r.model.train()

    def batch_idx(step):
        start = (step * batch) % (n - batch)
        return orders[:, start:start + batch]

    steps = 2

    def sequential():
        for s, r in enumerate(runs):
            for step in range(steps):
                idx = batch_idx(step)[s]
                r.step(x[idx], y[idx], 0)

    def together(ens_opt, k):
        def run():
            for step in range(steps * rounds(k)):
                idx = batch_idx(step)[:k]
                ensemble.ensemble_step(*ens_opt, x[idx], y[idx])
        return run

    def rounds(k):  # a k-member ensemble repeats its steps so that every repeat has about S * steps member-steps
        return max(1, round(members / k))

    timers = {"seq": (sequential, members, 1), "ens": (together(full, members), members, 1)}
    if part is not None:
        timers["auto"] = (together(part, group), group, rounds(group))
    for fn, _, _ in timers.values():
        fn()  # warm-up
    steps = max(2, min(500, round(seconds * steps / timed(sequential)[0])))  # ~`seconds` per sequential repeat
    per = {name: [] for name in timers}
    for _ in range(repeats):
        for name, (fn, k, r) in timers.items():
            wall, cpu = timed(fn)
            per[name].append((wall / (k * r * steps), cpu / (k * r * steps)))
    if part is None:
        per["auto"] = per["ens"] if group == members else per["seq"]
    return steps, per


def fastest(fn, repeats: int, warmup: int = 3) -> float:
    """The least perf_counter seconds of `repeats` calls of fn after `warmup` calls: a kernel's time alone,
    least disturbed by other processes."""
    return min(call_times(fn, repeats, warmup))


def bmm_time(members: int, m: int, k: int, n: int, repeats: int) -> float:
    """Seconds of one torch.bmm of (members, m, k) @ (members, k, n), alone (`fastest`)."""
    a, b = torch.randn(members, m, k), torch.randn(members, k, n)
    return fastest(lambda: torch.bmm(a, b), repeats)


def kernel_floor(arch: str, width: int, batch: int, members: int, repeats: int) -> tuple[float, float]:
    """(matrix products, normalisation and ReLU): seconds per member-step of the ensemble step's own kernels,
    each timed alone on tensors of its shape (`fastest`: warm caches, nothing between kernels).

    Products: every Conv1d/Linear layer (C_in -> C_out, kernel k, N = L_out * B output columns) costs its
    forward (C_out x C_in k) @ (C_in k x N), its input gradient (C_in k x C_out) @ (C_out x N) (not the
    first layer's) and its weight gradient (C_out x N) @ (N x C_in k), as torch.bmm over the members, each
    in the faster of the im2col form (one product, K = C_in k, without the im2col copy) and the tap form
    (k products with K = C_in). Normalisation: every BatchNorm layer of the ensemble in training mode
    (its own forward, as the ensemble runs it) and every ReLU, forward and backward. Left out: residual
    adds, pooling, the loss, the SGD update, copies and all per-operation overhead, so an ensemble step
    built from these kernels takes at least the sum. The products are those of the bmm form (`--conv
    auto` for resnet1d), whichever `--conv` the ensemble arm is timed with.
    """
    torch.manual_seed(0)
    model = models.create(arch, width, (40,), 10).eval()
    layers = []
    hooks = [m.register_forward_hook(lambda mod, i, o: layers.append((mod, o.shape)))
             for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    with torch.no_grad():
        model(torch.randn(batch, 40))
    for h in hooks:
        h.remove()
    products = 0.0
    for j, (layer, out_shape) in enumerate(layers):
        if isinstance(layer, nn.Linear):
            c_in, c_out, k, n = layer.in_features, layer.out_features, 1, batch
        else:
            c_in, c_out, k, n = layer.in_channels, layer.out_channels, layer.kernel_size[0], out_shape[-1] * batch
        forms = {(c_in * k, 1), (c_in, k)}  # (K, products)
        products += min(p * (bmm_time(members, c_out, kk, n, repeats) + bmm_time(members, c_out, n, kk, repeats)
                             + (bmm_time(members, kk, c_out, n, repeats) if j else 0.0)) for kk, p in forms)
    ens = ensemble_models.from_models([model] * members).train()
    norms, relus = [], []
    hooks = []
    for m in ens.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_hook(lambda mod, i, o: norms.append((mod, o.shape))))
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(lambda mod, i, o: relus.append(o.shape)))
        if isinstance(m, models.BasicBlock):  # its two functional ReLUs, after bn1 and after bn2 + shortcut
            hooks += [bn.register_forward_hook(lambda mod, i, o: relus.append(o.shape)) for bn in (m.bn1, m.bn2)]
    with torch.no_grad():
        ens(torch.randn(members, batch, 40))
    for h in hooks:
        h.remove()

    def forward_backward(fn, shape):
        x, g = torch.randn(shape, requires_grad=True), torch.randn(shape)
        return fastest(lambda: fn(x).backward(g), repeats)

    elementwise = sum(forward_backward(mod, shape) for mod, shape in norms)
    elementwise += sum(forward_backward(torch.relu, shape) for shape in relus)
    return products / members, elementwise / members


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    runtime.keep_freed_memory()
    print(f"{args.arch}, S = {args.members} seeds, one thread, float32; times per member-step; "
          f"ratio = sequential / ensemble (median of {args.repeats} paired perf_counter ratios; cpu: thread_time); "
          "auto: groups of g seeds (policy.group_size)")
    peak = matmul_peak(args.repeats)[0]
    print(f"fp32 matmul peak, one thread: {peak:.1f} GFLOP/s")
    print(f"{'width':>5} {'batch':>5} {'steps':>5} {'seq ms':>8} {'ens ms':>8} {'ratio':>6} {'cpu ratio':>9} "
          f"{'g':>2} {'auto ms':>8} {'seq/auto':>8} {'seq/peak':>8} {'4x needs':>8} "
          f"{'mm ms':>8} {'bn+relu':>8} {'floor/4x':>8} {'max ratio':>8}")
    rows, table = [], []
    for width in args.widths:
        for batch in args.batch_sizes:
            group = policy.group_size(args.arch, width, batch, args.members)
            steps, per = bench_cell(args.arch, width, batch, args.members, args.seconds, args.repeats, args.conv,
                                    group)
            sw, ew, aw = (statistics.median(t[0] for t in per[name]) for name in ("seq", "ens", "auto"))
            ratio, cpu_ratio, auto_ratio = (statistics.median(a[i] / b[i] for a, b in zip(per["seq"], per[name]))
                                            for name, i in (("ens", 0), ("ens", 1), ("auto", 0)))
            rows.append((width, batch, ratio, cpu_ratio, group, auto_ratio))
            flops = step_flops(models.create(args.arch, width, (40,), 10), torch.randn(batch, 40))[1]
            seq_peak = flops / sw / 1e9 / peak
            products, elementwise = kernel_floor(args.arch, width, batch, args.members, args.repeats)
            floor = products + elementwise
            print(f"{width:5d} {batch:5d} {steps:5d} {sw * 1e3:8.3f} {ew * 1e3:8.3f} {ratio:6.2f} {cpu_ratio:9.2f} "
                  f"{group:2d} {aw * 1e3:8.3f} {auto_ratio:8.2f} {100 * seq_peak:7.1f}% {400 * seq_peak:7.1f}% "
                  f"{products * 1e3:8.3f} {elementwise * 1e3:8.3f} {400 * floor / sw:7.0f}% {sw / floor:8.2f}",
                  flush=True)
            table.append([width, batch, f"{sw * 1e3:.3f}", f"{ew * 1e3:.3f}", f"**{ratio:.2f}x**", group,
                          f"{auto_ratio:.2f}x", f"{100 * seq_peak:.1f} %", f"{400 * seq_peak:.1f} %",
                          f"{400 * floor / sw:.0f} %", f"{sw / floor:.2f}x"])
    small = [r for r in rows if r[0] <= 32 and r[1] <= 128]
    used = [r for r in rows if r[4]]
    if small:
        print(f"widths <= 32 and batch <= 128: ratio min {min(r[2] for r in small):.2f}, "
              f"median {statistics.median(r[2] for r in small):.2f} (target >= 4)")
    if used:
        print(f"where auto uses ensembles: seq/auto min {min(r[5] for r in used):.2f} (target >= 1: never slower)")
    if args.write_docs:
        report.write_section("ensemble", report.command(__file__, argv), (
            f"{args.arch}, S = {args.members} seeds, one thread; ms per member-step; fp32 matmul peak {peak:.1f} "
            f"GFLOP/s; ratios are medians of {args.repeats} paired repeats:\n\n"
            + report.table(["width", "batch", "sequential ms", "ensemble ms", "sequential / ensemble", "auto g",
                            "sequential / auto", "seq / peak", "4x needs", "floor / 4x", "max"], table)))


if __name__ == "__main__":
    main()
