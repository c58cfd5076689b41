"""A training step of the package's training loop against a plain torch loop: ResNet18 on CIFAR-10-shaped data.

    python scripts/gpu_step_timing.py --min-ratio 0.95        # CUDA: ResNet18 width 64, batch 128
    python scripts/gpu_step_timing.py --device cpu --width 2 --batch 8 --steps 3 --warmup 1 --rounds 1

Ours: `train.batch_step` with the stepper `train.train_runs` takes for the spec (one run made by
`train.start_run`: `models.families.create("resnet18", width, (3, 32, 32), 10)`, its method SGD
with momentum 0.9 and weight decay 5e-4 at lr 0.1), then the loop's check that every loss is
finite. Plain: the same architecture with `torch.optim.SGD(lr=0.1, momentum=0.9,
weight_decay=5e-4)`, zero_grad, cross-entropy, backward, step, and no transfer to the host. Both
index the same device-resident random data (x ~ N(0, 1), uniform labels) with a permutation on the
device. With --autocast bf16 both run the forward and loss under bfloat16 autocast.

Each round times `steps` steps of each loop (the first of the two alternating between rounds)
after `warmup` untimed ones, the device synchronised only before and after the timed steps.
Prints each loop's median time per step over the rounds and ratio = plain / ours (the throughput
of ours relative to the plain loop); exit status 1 when the ratio is below --min-ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch.nn import functional as F

from phasediagram.data.datasets import Dataset, Split
from phasediagram.errors import SpecError
from phasediagram.execution.runtime import check_device
from phasediagram.models import families
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.training import ensemble, train

INPUT_SHAPE, CLASSES, LR, MOMENTUM, WEIGHT_DECAY = (3, 32, 32), 10, 0.1, 0.9, 5e-4


def synthetic(n: int, device: torch.device) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *INPUT_SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return Dataset("synthetic", Split(x, y), Split(x[:1], y[:1]), CLASSES).to(device)


def our_steps(spec: ExperimentSpec, data: Dataset, device: torch.device):
    """A function taking step i of our loop (as `train.train_runs` takes it) on `data`."""
    cell = spec.cells()[0]
    run = train.start_run(spec, cell, spec.seeds[0], data, device=device)
    steps_of = ensemble.EnsembleSteps if ensemble.ensemble_choice(spec, cell)[0] else train.MethodSteps
    stepper = steps_of([run])
    stepper.set_lr(LR)
    run.model.train()
    orders = train.epoch_order(len(data.train), run.seed, 0).unsqueeze(0).to(device)
    per_epoch = len(data.train) // cell.batch_size

    def step(i: int) -> None:
        losses = train.batch_step(stepper, data.train.x, data.train.y, orders, i % per_epoch, cell.batch_size, 0)
        if not all(math.isfinite(loss) for loss in losses):
            raise SystemExit(f"our loop diverged at step {i}")

    return step


def plain_steps(width: int, batch: int, data: Dataset, device: torch.device, autocast: torch.dtype | None):
    """A function taking step i of a plain torch loop on `data`."""
    torch.manual_seed(0)
    model = families.create("resnet18", width, INPUT_SHAPE, CLASSES).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1)).to(device)
    per_epoch = len(data.train) // batch

    def step(i: int) -> None:
        idx = order[(i % per_epoch) * batch:(i % per_epoch + 1) * batch]
        x, y = data.train.x[idx], data.train.y[idx]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def seconds_per_step(step, first: int, steps: int, warmup: int, device: torch.device) -> float:
    for i in range(first, first + warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(first + warmup, first + warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed steps per loop and round")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each timing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--autocast", choices=("off", "bf16"), default="off")
    p.add_argument("--min-ratio", type=float, default=None, help="exit 1 when plain / ours is below this")
    args = p.parse_args(argv)
    try:
        device = check_device(args.device)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = synthetic(args.batch * (args.steps + args.warmup), device)
    spec = ExperimentSpec(name="steptime", arch="resnet18", dataset="cifar10", widths=(args.width,),
                          batch_sizes=(args.batch,), seeds=(0,), epochs=1, schedule="constant", lrs=(LR,),
                          momentum=MOMENTUM, weight_decays=(WEIGHT_DECAY,), autocast=args.autocast, metrics=())
    loops = {"ours": our_steps(spec, data, device),
             "plain": plain_steps(args.width, args.batch, data, device, train.AUTOCAST[args.autocast])}
    times: dict[str, list[float]] = {name: [] for name in loops}
    done = {name: 0 for name in loops}
    for r in range(args.rounds):
        for name in (("ours", "plain") if r % 2 == 0 else ("plain", "ours")):
            times[name].append(seconds_per_step(loops[name], done[name], args.steps, args.warmup, device))
            done[name] += args.steps + args.warmup
    ours, plain = (statistics.median(times[name]) for name in ("ours", "plain"))
    ratio = plain / ours
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"resnet18 width {args.width}, batch {args.batch}, autocast {args.autocast}, {name}, torch "
          f"{torch.__version__}: ours {ours * 1e3:.2f} ms/step, plain torch {plain * 1e3:.2f} ms/step, "
          f"ratio plain/ours {ratio:.3f}" + (f" (target >= {args.min_ratio})" if args.min_ratio else ""))
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"FAIL: ratio {ratio:.3f} is below {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
