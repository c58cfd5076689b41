"""Training the seeds of a cell: sequentially, or in groups, each group one ensemble model, where that is faster.

Ensemble training (`train_members`) trains S runs (cell, seed_1..S) at once and gives each the
result its own sequential run (`train.train_seed`) gives, up to floating-point summation order:

- member s starts as `train.init_model(spec, cell, seed_s)` (resumed from its own `last.pt` if
  there is one) and the S models are stacked into one (`ensemble_models`);
- every step, member s takes the next batch of its own order `train.epoch_order(n, seed_s,
  epoch)`: one step gathers x of shape (S, B, ...) and y of shape (S, B);
- loss L = sum_s L_s with L_s the mean cross-entropy of member s on its batch; no operation mixes
  members, so dL/dtheta_s = dL_s/dtheta_s, the gradient of its sequential run;
- one `torch.optim.SGD` over the stacked parameters (same momentum, dampening, weight decay,
  Nesterov flag; the lr of `train.lr_at`) is exactly S per-member optimizers, SGD being
  elementwise: v_s <- mu v_s + g_s + wd theta_s, theta_s <- theta_s - lr v_s.

Checkpoints are written per (cell, seed) by the same functions `train_seed` uses
(`train.save_epoch`, `save_diverged`, `save_final`): after every epoch each member's weights and
momentum buffers are copied into its own ordinary model and optimizer, so its `last.pt` is the one
a sequential run would write (a sequential resume can continue it, and vice versa), `best.pt`
and `final.pt` likewise.

Divergence: when member s's loss is non-finite at a step, its run ends exactly as the sequential
one does (the step is taken, `final.pt` with status "diverged" and diverged_at {epoch, step}
holds the weights that step left); the survivors are copied out and re-stacked into an ensemble
of S-1 members that continues from the next step, so the diverged member's NaNs never meet them.

Resume: members are grouped by the epoch their `last.pt` reached (a kill between two members'
writes leaves two groups) and each group is trained as one ensemble, so no finished epoch is
trained twice.

`spec.ensemble`: "on" trains all seeds of a cell as one ensemble wherever the arch and the
training method allow (`methods.ensemble_supported`), "off" never, "auto" in groups of
`group_size` seeds (measured with bench/bench_ensemble.py), possibly of one: a one-member
ensemble is still the faster form of some models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from phasediagram.accel import ensemble_models
from phasediagram.data.datasets import Dataset
from phasediagram.methods import ensemble_supported
from phasediagram.methods.sgd import SGD
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage.layout import Layout
from phasediagram.training.train import (
    DTYPES,
    RunState,
    epoch_order,
    final_status,
    lr_at,
    save_diverged,
    save_epoch,
    save_final,
    start_run,
    train_seed,
)

# auto: seeds per ensemble group, from bench/bench_ensemble.py (one thread, 1-5 members, widths
# 8-128, batch sizes 16-512, on a 2-core CPU).
# - resnet1d: the ensemble form (im2col + one bmm per convolution on member-major activations)
#   pays per-operation overhead once for its members, until the group's activations (members x
#   width x batch) outgrow the caches: groups stay within RESNET1D_GROUP_BUDGET. Beyond it, one
#   member alone in that form still beats nn.Conv1d sequential runs up to RESNET1D_ALONE_MAX_WIDTH
#   (at width 32, batch 512: 1.07-1.21x in seven of eight runs, 0.89x in one noisy two-step run;
#   1.06-1.11x at widths 48 and 64, batch 256 and 512); at width 128 it gains nothing
#   (0.96-1.06x at batch 128 and 512 over five runs), so auto trains sequential runs there.
# - mlp: all seeds together where width^2 * batch_size <= 2^20 and batch_size <= 512, else sequential.
# - other archs (resnet18: grouped 2D convolutions, slow on a CPU): sequential.
RESNET1D_GROUP_BUDGET = 16_384
RESNET1D_ALONE_MAX_WIDTH = 64
MLP_BUDGET = (1_048_576, 512)


def group_size(arch: str, width: int, batch_size: int, seeds: int) -> int:
    """Seeds trained together as one ensemble in auto mode; 0: ordinary sequential runs (`train.train_seed`).

    resnet1d: the largest g <= seeds with g * width * batch_size <= RESNET1D_GROUP_BUDGET if that is 2 or
    more; else 1 (one member alone in the ensemble form) up to width RESNET1D_ALONE_MAX_WIDTH, 0 beyond.
    mlp: all seeds if width^2 * batch_size <= 2^20 and batch_size <= 512, else 0. Other archs: 0.
    """
    if arch == "resnet1d":
        g = min(seeds, RESNET1D_GROUP_BUDGET // (width * batch_size))
        return g if g >= 2 else int(width <= RESNET1D_ALONE_MAX_WIDTH)
    if arch == "mlp":
        budget, max_batch = MLP_BUDGET
        return seeds if width * width * batch_size <= budget and batch_size <= max_batch else 0
    return 0


# auto: metrics whose registry entry has `compute_seeds` (the `hessian`) compute a cell's seeds in
# the ensemble form, all together up to METRIC_GROUP_MAX_WIDTH and one at a time beyond
# (bench/bench_metrics_batched.py, section 4: the demo's `hessian` of 3 seeds, one thread, against
# `nn.Conv1d` seed after seed: together 2.5x at widths 2 and 4, 1.9x at 8, 1.35x at 16, 1.2x at 32;
# one at a time in the ensemble form 1.5-1.7x at widths 2-16, 1.4x at 32). mlp: seed after seed
# (together measured 1.09x at width 16, 0.85x at 64); other archs: seed after seed.
METRIC_GROUP_MAX_WIDTH = {"resnet1d": 8}


def metric_group_size(spec: ExperimentSpec, cell: Cell) -> int:
    """Seeds per call of a metric's `compute_seeds` (`Metric.compute_seeds`); 0: `compute`, seed by seed.

    `ensemble` "off": 0; "on": all seeds wherever the arch has an ensemble form; "auto": resnet1d
    all seeds up to METRIC_GROUP_MAX_WIDTH, one seed (the ensemble form alone) beyond; others 0.
    """
    if spec.ensemble == "off" or not ensemble_models.supports(spec.arch):
        return 0
    if spec.ensemble == "on":
        return len(spec.seeds)
    if spec.arch not in METRIC_GROUP_MAX_WIDTH:
        return 0
    return len(spec.seeds) if cell.width <= METRIC_GROUP_MAX_WIDTH[spec.arch] else 1


def pair_group_size(spec: ExperimentSpec, cell: Cell, batch_size: int, pairs: int) -> int:
    """Pairs per call of a pair metric's `compute_pairs` (`Metric.compute_pairs`: the `curve`'s bends,
    trained as one ensemble); 0: `compute`, pair by pair.

    `ensemble` "off": 0; "on": all pairs wherever the arch has an ensemble form; "auto": the training
    policy, `group_size`(arch, width, batch_size, pairs), since training a bend is SGD at `batch_size`
    (bench/bench_metrics_batched.py, section 5: the 3 pairs of 3 seeds at the demo's curve options,
    together 2.4x at width 2, 2.2x at 4, 2.0x at 8, 1.5x at 16, 1.3x at 32 against pair after pair;
    one pair alone in the ensemble form 0.97-1.14x).
    """
    if spec.ensemble == "off" or not ensemble_models.supports(spec.arch):
        return 0
    if spec.ensemble == "on":
        return pairs
    return group_size(spec.arch, cell.width, batch_size, pairs)


def ensemble_choice(spec: ExperimentSpec, cell: Cell) -> tuple[int, str]:
    """(seeds per ensemble group, why); 0 means ordinary sequential runs."""
    if spec.ensemble == "off":
        return 0, "ensemble off"
    if not ensemble_supported(spec):
        return 0, f"optimizer {spec.optimizer} with regularizer {spec.regularizer} has no ensemble form"
    if not ensemble_models.supports(spec.arch):
        return 0, f"arch {spec.arch} has no ensemble form"
    if spec.ensemble == "on":
        return len(spec.seeds), "ensemble on"
    g = group_size(spec.arch, cell.width, cell.batch_size, len(spec.seeds))
    return g, (f"auto: groups of {g} seed(s)" if g else "auto: sequential is as fast here")


@dataclass
class Member:
    """One run of the ensemble: its seed and its ordinary model, method (optimizer) and state."""

    seed: int
    model: torch.nn.Module
    method: SGD
    state: RunState

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())


def train_cell_auto(spec: ExperimentSpec, cell: Cell, layout: Layout, dataset: Dataset,
                    device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train every seed of `cell` (in ensemble groups of the size `ensemble_choice` gives); return {seed: status}.

    The seeds still to train are taken in groups of that size, in order; within a group, members
    resuming from different epochs train as separate ensembles.
    """
    statuses = {seed: final_status(layout, spec, cell, seed, log) for seed in spec.seeds}
    todo = [seed for seed in spec.seeds if statuses[seed] is None]
    size, _ = ensemble_choice(spec, cell)
    members = []
    if size and todo:
        members = [Member(seed, *start_run(spec, cell, seed, layout, dataset, device, log)) for seed in todo]
        if not all(type(m.method) is SGD and m.method.regularizer is None for m in members):
            log(f"note: {spec.optimizer} has no ensemble step here; training {cell.id} sequentially")
            members = []
    if members:
        for first in range(0, len(members), size):
            by_epoch: dict[int, list[Member]] = {}
            for m in members[first:first + size]:
                by_epoch.setdefault(m.state.epoch, []).append(m)
            for group in by_epoch.values():
                statuses.update(train_members(spec, cell, layout, dataset, group, device, log, on_epoch))
    else:
        for seed in todo:
            statuses[seed] = train_seed(spec, cell, seed, layout, dataset, device, log, on_epoch)
    return {seed: statuses[seed] for seed in spec.seeds}


def train_members(spec: ExperimentSpec, cell: Cell, layout: Layout, dataset: Dataset, members: list[Member],
                  device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train `members` (runs of `cell` at the same epoch) to completion as one ensemble; {seed: status}."""
    if len({m.state.epoch for m in members}) != 1:
        raise ValueError("ensemble members must resume from the same epoch")
    dtype = DTYPES[spec.dtype]
    x, y = dataset.train.x.to(device, dtype), dataset.train.y.to(device)
    n, bs = len(y), cell.batch_size
    steps = n // bs
    statuses: dict[int, str] = {}
    alive = list(members)
    ens, opt = assemble(alive)
    while alive and alive[0].state.epoch < spec.epochs:
        epoch = alive[0].state.epoch
        lr = lr_at(spec, cell.lr, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        for m in alive:
            m.method.set_lr(lr)
        orders = torch.stack([epoch_order(n, m.seed, epoch) for m in alive]).to(device)
        ens.train()
        totals = [0.0] * len(alive)
        for step in range(steps):
            idx = orders[:, step * bs:(step + 1) * bs]
            losses = ensemble_step(ens, opt, x[idx], y[idx])
            totals = [t + loss for t, loss in zip(totals, losses)]
            bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
            if bad:
                scatter(ens, opt, alive)
                for i in bad:
                    m = alive[i]
                    save_diverged(spec, cell, m.seed, layout, dataset, m.method, m.state, lr, step, losses[i], log)
                    statuses[m.seed] = "diverged"
                keep = [i for i in range(len(alive)) if i not in bad]
                alive, totals, orders = [alive[i] for i in keep], [totals[i] for i in keep], orders[keep]
                if not alive:
                    break
                ens, opt = assemble(alive)
                ens.train()
        if not alive:
            break
        scatter(ens, opt, alive)
        for m, total in zip(alive, totals):
            save_epoch(spec, cell, m.seed, layout, dataset, m.method, m.state, lr, total / steps)
            if on_epoch is not None:
                on_epoch(cell, m.seed, m.state.epoch)
    for m in alive:
        save_final(spec, cell, m.seed, layout, dataset, m.method, m.state)
        statuses[m.seed] = "ok"
    return statuses


def ensemble_step(ens: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """One SGD step of every member on its own batch x[s], y[s]; returns [L_s] (before the step).

    L_s = (1/B) sum_b CE(f_s(x[s, b]), y[s, b]); the step descends sum_s L_s, whose gradient with
    respect to member s's parameters is dL_s/dtheta_s.
    """
    opt.zero_grad(set_to_none=True)
    logits = ens(x)
    s, b, k = logits.shape
    per_member = F.cross_entropy(logits.reshape(s * b, k), y.reshape(s * b), reduction="none").view(s, b).mean(1)
    per_member.sum().backward()
    opt.step()
    return per_member.detach().tolist()


FUSED_SGD_DEVICES = ("cpu", "cuda")  # where torch.optim.SGD has a fused kernel


def sgd(params, **hyper) -> torch.optim.SGD:
    """torch.optim.SGD(params, **hyper), with torch's fused kernel when every parameter is a floating tensor on
    a CPU or CUDA device (else torch's default). The fused step is the same update, v <- mu v + (1 - dampening)
    (g + wd w), w <- w - lr v (or the Nesterov form), in one pass per tensor: the values of torch's foreach
    SGD up to rounding (some elements differ in the last bit: the kernel rounds the tail of its vector loop
    differently; tests/test_ensemble.py), 3x faster on the 29 tensors of a resnet1d ensemble (0.06 against
    0.19 ms at width 2, 0.17 against 0.48 ms at width 32, 3 members, one thread)."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in FUSED_SGD_DEVICES for p in params) and bool(params)
    return torch.optim.SGD(params, **hyper, fused=fused or None)


def assemble(members: list[Member]) -> tuple[torch.nn.Module, torch.optim.SGD]:
    """The ensemble of the members' models and one SGD over it holding their momentum buffers."""
    ens = ensemble_models.from_models([m.model for m in members])
    hyper = members[0].method.opt.param_groups[0]
    opt = sgd(ens.parameters(), lr=hyper["lr"], momentum=hyper["momentum"], dampening=hyper["dampening"],
              weight_decay=hyper["weight_decay"], nesterov=hyper["nesterov"], maximize=hyper.get("maximize", False))
    params = [m.params for m in members]
    for name, p in ens.named_parameters():
        bufs = [m.method.opt.state.get(ps[name], {}).get("momentum_buffer") for m, ps in zip(members, params)]
        if all(b is None for b in bufs):
            continue
        if any(b is None for b in bufs):
            raise ValueError(f"some members have a momentum buffer for {name} and some do not")
        layout = ensemble_models.layout_of(p.shape, bufs[0].shape, len(members))
        opt.state[p]["momentum_buffer"] = ensemble_models.stack_tensors(bufs, layout)
    return ens, opt


def scatter(ens: torch.nn.Module, opt: torch.optim.SGD, members: list[Member]) -> None:
    """Copy member s's weights, buffers and momentum from the ensemble into members[s]'s own model and optimizer."""
    ensemble_models.load_into_models(ens, [m.model for m in members])
    params = [m.params for m in members]
    for name, p in ens.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is None:
            continue
        member_shape = params[0][name].shape
        parts = ensemble_models.split_tensor(buf, ensemble_models.layout_of(p.shape, member_shape, len(members)),
                                             len(members))
        for m, ps, part in zip(members, params, parts):
            m.method.opt.state[ps[name]]["momentum_buffer"] = part
