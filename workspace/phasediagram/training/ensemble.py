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

from phasediagram.accel import ensemble_models, policy
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
    g = policy.group_size(spec.arch, cell.width, cell.batch_size, len(spec.seeds))
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
    differently; tests/test_ensemble.py), in fewer passes over memory than the foreach step."""
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
