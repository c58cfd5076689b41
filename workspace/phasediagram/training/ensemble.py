"""The ensemble form of training: S runs of a cell stepped as one ensemble model, where that is faster.

`train.train_runs` is the one training loop; `EnsembleSteps` is its stepper for S runs
(cell, seed_1..S) at once, and gives each the result its own sequential run (`train.train_seed`,
stepper `train.MethodSteps`) gives, up to floating-point summation order:

- run s starts as `train.init_model(spec, cell, seed_s)` (resumed from its own `last.pt` if
  there is one) and the S models are stacked into one (`ensemble_models`);
- every step, member s takes the next batch of its own order `train.epoch_order(n, seed_s,
  epoch)`: one step gathers x of shape (S, B, ...) and y of shape (S, B);
- loss L = sum_s L_s with L_s the mean cross-entropy of member s on its batch; no operation mixes
  members, so dL/dtheta_s = dL_s/dtheta_s, the gradient of its sequential run;
- one `torch.optim.SGD` over the stacked parameters (same momentum, dampening, weight decay,
  Nesterov flag; the lr of `train.lr_at`) is exactly S per-member optimizers, SGD being
  elementwise: v_s <- mu v_s + g_s + wd theta_s, theta_s <- theta_s - lr v_s.

The loop writes every run's checkpoints: after every epoch (and before a diverged run's
`final.pt`) the stepper copies each member's weights and momentum buffers into its run's own
model and optimizer (`scatter`), so its `last.pt` is the one a sequential run would write (a
sequential resume can continue it, and vice versa), `best.pt` and `final.pt` likewise.

Divergence: when member s's loss is non-finite at a step, its run ends exactly as the sequential
one does (the step is taken, `final.pt` with status "diverged" and diverged_at {epoch, step}
holds the weights that step left); the survivors are re-stacked into an ensemble of S-1 members
that continues from the next step, so the diverged member's NaNs never meet them.

Resume: a member's numbers depend on the ensemble it was stepped in (its rounding does), so a
group always resumes as the group it was: from the latest epoch all its members saved (a kill
between two members' writes sends the members ahead back to their `prev.pt`), and a member whose
final checkpoint was lost is retrained with its group, the others replayed without writing
(`train.train_group`). The finished checkpoints equal the uninterrupted run's bit for bit.

`spec.ensemble`: "on" trains all seeds of a cell as one ensemble wherever the arch and the
training method allow (`methods.ensemble_supported`), "off" never, "auto" in groups of
`accel.policy.group_size` seeds, possibly of one: a one-member ensemble is still the faster form
of some models. With `spec.autocast` other than "off" the runs train one by one.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from phasediagram.accel import ensemble_models, policy
from phasediagram.data.datasets import Dataset
from phasediagram.methods import ensemble_supported
from phasediagram.methods.sgd import SGD
from phasediagram.numerics.sgd import set_lr, sgd
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage.layout import Layout
from phasediagram.training.train import Run, read_later, train_group, train_seed


def ensemble_choice(spec: ExperimentSpec, cell: Cell) -> tuple[int, str]:
    """(seeds per ensemble group, why); 0 means ordinary sequential runs."""
    if spec.ensemble == "off":
        return 0, "ensemble off"
    if not ensemble_supported(spec):
        return 0, f"optimizer {spec.optimizer} with regularizer {spec.regularizer} has no ensemble form"
    if not ensemble_models.supports(spec.arch):
        return 0, f"arch {spec.arch} has no ensemble form"
    if spec.autocast != "off":
        return 0, f"autocast {spec.autocast} trains runs one by one (the ensemble layers' own kernels are float32 " \
                  "and float64 only)"
    if spec.ensemble == "on":
        return len(spec.seeds), "ensemble on"
    g = policy.group_size(spec.arch, cell.width, cell.batch_size, len(spec.seeds))
    return g, (f"auto: groups of {g} seed(s)" if g else "auto: sequential is as fast here")


def train_cell_auto(spec: ExperimentSpec, cell: Cell, layout: Layout, dataset: Dataset,
                    device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train every seed of `cell`; return {seed: status}.

    The seeds are cut, in order, into groups of the size `ensemble_choice` gives, each group one
    ensemble (`train.train_group` with `EnsembleSteps`), or, with size 0, trained one by one. The
    groups depend only on the spec, so a resumed cell trains the groups its first attempt did.
    """
    size, _ = ensemble_choice(spec, cell)
    seeds = list(spec.seeds)
    statuses: dict[int, str] = {}
    if not size:
        for seed in seeds:
            statuses[seed] = train_seed(spec, cell, seed, layout, dataset, device, log, on_epoch)
        return statuses
    for first in range(0, len(seeds), size):
        statuses.update(train_members(spec, cell, seeds[first:first + size], layout, dataset, device, log, on_epoch))
    return statuses


def train_members(spec: ExperimentSpec, cell: Cell, seeds: list[int], layout: Layout, dataset: Dataset,
                  device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train the runs `seeds` of `cell` to completion as one ensemble; {seed: status}."""
    return train_group(spec, cell, seeds, layout, dataset, EnsembleSteps, device, log, on_epoch)


class EnsembleSteps:
    """The steps of S runs as one step of their ensemble (`ensemble_step`): member s is run s,
    its momentum the one its own optimizer held. The runs' own models and optimizers are
    brought up to date by `sync` (`scatter`)."""

    def __init__(self, runs: list[Run]):
        if not all(type(run.method) is SGD and run.method.regularizer is None for run in runs):
            raise ValueError("the ensemble form steps plain SGD without a regularizer only")
        if any(run.autocast is not None for run in runs):
            raise ValueError("the ensemble form steps runs without autocast only")
        self.runs = runs
        self.ens, self.opt = assemble(runs)
        self.ens.train()

    def set_lr(self, lr: float) -> None:
        set_lr(self.opt, lr)
        for run in self.runs:
            run.method.set_lr(lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> list[float]:
        return ensemble_step(self.ens, self.opt, x, y)

    def sync(self) -> None:
        scatter(self.ens, self.opt, self.runs)


def ensemble_step(ens: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """One SGD step of every member on its own batch x[s], y[s]; returns [L_s] (before the step).

    L_s = (1/B) sum_b CE(f_s(x[s, b]), y[s, b]); the step descends sum_s L_s, whose gradient with
    respect to member s's parameters is dL_s/dtheta_s. The losses are copied to the host as soon as
    they are computed (`train.read_later`), so the backward and the update are queued before the host waits.
    """
    opt.zero_grad(set_to_none=True)
    logits = ens(x)
    s, b, k = logits.shape
    per_member = F.cross_entropy(logits.reshape(s * b, k), y.reshape(s * b), reduction="none").view(s, b).mean(1)
    read = read_later(per_member)
    per_member.sum().backward()
    opt.step()
    return read()


def assemble(members: list[Run]) -> tuple[torch.nn.Module, torch.optim.SGD]:
    """The ensemble of the members' models and one SGD over it holding their momentum buffers."""
    ens = ensemble_models.from_models([m.model for m in members])
    hyper = members[0].method.opt.param_groups[0]
    opt = sgd(ens.parameters(), lr=hyper["lr"], momentum=hyper["momentum"], dampening=hyper["dampening"],
              weight_decay=hyper["weight_decay"], nesterov=hyper["nesterov"], maximize=hyper.get("maximize", False),
              fused=True)
    params = [dict(m.model.named_parameters()) for m in members]
    for name, p in ens.named_parameters():
        bufs = [m.method.opt.state.get(ps[name], {}).get("momentum_buffer") for m, ps in zip(members, params)]
        if all(b is None for b in bufs):
            continue
        if any(b is None for b in bufs):
            raise ValueError(f"some members have a momentum buffer for {name} and some do not")
        layout = ensemble_models.layout_of(p.shape, bufs[0].shape, len(members))
        opt.state[p]["momentum_buffer"] = ensemble_models.stack_tensors(bufs, layout)
    return ens, opt


def scatter(ens: torch.nn.Module, opt: torch.optim.SGD, members: list[Run]) -> None:
    """Copy member s's weights, buffers and momentum from the ensemble into members[s]'s own model and optimizer."""
    ensemble_models.load_into_models(ens, [m.model for m in members])
    params = [dict(m.model.named_parameters()) for m in members]
    for name, p in ens.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is None:
            continue
        member_shape = params[0][name].shape
        parts = ensemble_models.split_tensor(buf, ensemble_models.layout_of(p.shape, member_shape, len(members)),
                                             len(members))
        for m, ps, part in zip(members, params, parts):
            m.method.opt.state[ps[name]]["momentum_buffer"] = part
