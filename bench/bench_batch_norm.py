"""Training-mode BatchNorm: torch's against `batch_norm`'s sums, alone and inside whole ensemble steps.

One torch thread (as the job pool's workers), float32, the demo's resnet1d with S = 3 members
(member-major activations (1, S*C, L, B)). Printed, from time.perf_counter medians over
`--repeats` alternating repeats after a warm-up:

1. forward + backward of one BatchNorm on the activation shapes of widths 8, 16, 32 (stem
   C = width, L = 40; last stage C = 4 width, L = 10) at batch sizes 16, 64, 256: torch's
   `nn.BatchNorm2d` against `FoldableBatchNorm2d` with the sums forced (`MIN_ELEMENTS` = 0), and
   which one the default threshold picks;
2. one `ensemble.ensemble_step` of the demo's cells: with torch's batch-norm kernel everywhere against the
   default (sums from `MIN_ELEMENTS` values up).

    python bench/bench_batch_norm.py
    python bench/bench_batch_norm.py --write-docs   # also writes its tables into docs/performance.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import report  # bench/report.py: bench/ is the script's folder, so on sys.path
import torch
from torch import nn

from phasediagram.accel import batch_norm, ensemble_models
from phasediagram.accel.ensemble_models import FoldableBatchNorm2d
from phasediagram.execution import runtime
from phasediagram.models import families as models
from phasediagram.training import ensemble

MEMBERS = 3
NEVER = 2**62  # a threshold no activation reaches: torch's BatchNorm everywhere


def mean_ms(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def alternate(fns: dict, n: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each fn, the fns alternating within every repeat (after one warm-up each)."""
    times = {k: [] for k in fns}
    for k, fn in fns.items():
        mean_ms(fn, 2)
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(mean_ms(fn, n))
    return {k: statistics.median(v) for k, v in times.items()}


def layer(channels: int, length: int, batch: int, repeats: int) -> tuple[float, str]:
    """Print one BatchNorm's times; return (torch / sums, the one the default threshold picks)."""
    shape = (1, MEMBERS * channels, length, batch)
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(shape)
    ours = FoldableBatchNorm2d(shape[1])
    theirs = nn.BatchNorm2d(shape[1])
    default = batch_norm.MIN_ELEMENTS

    def sums():
        batch_norm.MIN_ELEMENTS = 0
        try:
            torch.autograd.grad(ours(x), x, upstream)
        finally:
            batch_norm.MIN_ELEMENTS = default

    t = alternate({"torch": lambda: torch.autograd.grad(theirs(x), x, upstream), "sums": sums},
                  max(5, 2_000_000 // x.numel()), repeats)
    pick = "sums" if batch_norm.applies(ours, x) and batch_norm.uses_sums(x) else "torch"
    print(f"{str(shape):>20} {t['torch']:9.3f} {t['sums']:9.3f} {t['torch'] / t['sums']:6.2f}  {pick}")
    return t["torch"] / t["sums"], pick


def step(width: int, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    ens = ensemble_models.from_models([models.create("resnet1d", width, (40,), 10) for _ in range(MEMBERS)]).train()
    opt = torch.optim.SGD(ens.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)
    x, y = torch.randn(MEMBERS, batch, 40), torch.randint(0, 10, (MEMBERS, batch))
    default = batch_norm.MIN_ELEMENTS

    def run(threshold):
        def fn():
            batch_norm.MIN_ELEMENTS = threshold
            try:
                ensemble.ensemble_step(ens, opt, x, y)
            finally:
                batch_norm.MIN_ELEMENTS = default
        return fn

    t = alternate({"torch": run(NEVER), "default": run(default)}, max(3, 1500 // batch), repeats)
    ratio = t["torch"] / t["default"]
    print(f"{width:5d} {batch:5d} {t['torch']:9.2f} {t['default']:9.2f} {ratio:6.3f}")
    return ratio


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write-docs", action="store_true", help="write the tables into docs/performance.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    runtime.keep_freed_memory()
    print(f"1. one BatchNorm, forward + backward, ms (S = {MEMBERS}); "
          f"default threshold {batch_norm.MIN_ELEMENTS} values")
    print(f"{'activation':>20} {'torch':>9} {'sums':>9} {'ratio':>6}  default picks")
    layers = []
    for width in (8, 16, 32):
        for batch in (16, 64, 256):
            cells = []
            for channels, length in ((width, 40), (4 * width, 10)):
                ratio, pick = layer(channels, length, batch, args.repeats)
                cells.append(f"{ratio:.2f}x ({pick})")
            layers.append([width, batch, MEMBERS * width * 40 * batch, *cells])  # both layers hold as many values
    print("2. one ensemble training step of the demo's cells, ms (torch's batch-norm kernel everywhere / default)")
    print(f"{'width':>5} {'batch':>5} {'torch':>9} {'default':>9} {'ratio':>6}")
    batches = (16, 32, 64, 128, 256)
    steps = {w: [step(w, b, args.repeats) for b in batches] for w in (8, 16, 32)}
    ratios = [r for rs in steps.values() for r in rs]
    print(f"step ratio torch / default: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, "
          f"max {max(ratios):.3f}")
    if args.write_docs:
        report.write_section("batch_norm", report.command(__file__, argv), (
            f"One BatchNorm, forward and backward, S = {MEMBERS} members: torch / sums (and what the default "
            f"threshold of {batch_norm.MIN_ELEMENTS} values picks):\n\n"
            + report.table(["width", "batch", "values", "stem", "last stage"], layers)
            + "\n\nOne ensemble training step, torch's kernel everywhere / the default:\n\n"
            + report.table(["width \\ batch", *map(str, batches)],
                           [[w, *(f"{r:.2f}x" for r in rs)] for w, rs in steps.items()])))


if __name__ == "__main__":
    main()
