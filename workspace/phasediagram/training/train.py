"""Training: `train_seed(spec, cell, seed, ...)` -> final checkpoint of one run, resumable.

`train_runs` is the one training loop, for one run or several of a cell at once; how the runs'
steps are taken is its stepper's (`MethodSteps`: each run by its own method; the ensemble form:
`training.ensemble.EnsembleSteps`).

One run: the model is initialised from torch's RNG seeded with `seed`; every epoch visits the
training set in the order of a permutation seeded by (seed, epoch), in batches of
`cell.batch_size`, dropping the last incomplete batch. The lr is `cell.lr`, multiplied by
`spec.lr_decay_factor` from epoch `floor(lr_decay_at * epochs)` on under the "step" schedule.
After every epoch `last.pt` holds the whole training state (model, optimizer, history), so a
killed run resumes at the next epoch and no finished epoch is trained twice; `best.pt` holds the
model of the epoch with the lowest mean training loss; `final.pt` (status "ok" or "diverged")
marks the run done. A non-finite loss stops the run with status "diverged" and its epoch and step.

With `spec.track`, each run's tracker (`training.tracking`) measures the model at the tracked steps
(`tracking.schedule`) on a fixed subset of the training set, without touching the model or the
random numbers training draws; its rows and warm-start vector go into `last.pt` with the rest of the
training state, and its trajectory file (`Layout.trajectory_path`) is rewritten after every epoch and
when the run is done, so a resumed run's rows equal an uninterrupted run's.

On a GPU the data, the orders and the models stay on the device; a step's only host transfer is
its losses (the divergence rule needs them at every step), copied as soon as the forward has
computed them, so the backward and the update are queued before the host waits (`read_later`).
`spec.autocast` "bf16" runs every forward of the models in training under `torch.autocast` to
bfloat16, its logits cast back to float32 for the loss (`autocast_forward`); the parameters, the
gradients' updates and the checkpoints stay float32, and the metrics read them without autocast.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from phasediagram.data.datasets import Dataset
from phasediagram.errors import CorruptFile
from phasediagram.methods import build_method
from phasediagram.methods.sgd import SGD
from phasediagram.models import families as models
from phasediagram.seeding import stable_seed
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.training import tracking

DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTOCAST = {"off": None, "bf16": torch.bfloat16}
RESUMABLE = ("prev", "last")  # the training states a run keeps, older first


def lr_at(spec: ExperimentSpec, base_lr: float, epoch: int) -> float:
    """The learning rate of `epoch` (0-based) under the spec's schedule: "step" as the module says,
    "cosine" base_lr (1 + cos(pi epoch / epochs)) / 2."""
    if spec.schedule == "step" and epoch >= math.floor(spec.lr_decay_at * spec.epochs):
        return base_lr * spec.lr_decay_factor
    if spec.schedule == "cosine":
        return base_lr * (1 + math.cos(math.pi * epoch / spec.epochs)) / 2
    return base_lr


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of the training set in `epoch` of run `seed`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed("order", seed, epoch)))


def init_model(spec: ExperimentSpec, cell: Cell, seed: int, dataset: Dataset) -> torch.nn.Module:
    """The initial model of run `seed` (the same weights, bit for bit, every time)."""
    torch.manual_seed(seed)
    model = models.create(spec.arch, cell.width, dataset.input_shape, dataset.n_classes)
    return model.to(DTYPES[spec.dtype])


@dataclass
class RunState:
    """What a run has done so far: the next epoch to train, its history and its best loss."""

    epoch: int = 0
    history: list | None = None
    best_loss: float = math.inf

    def __post_init__(self):
        self.history = self.history or []


def checkpoint_dict(spec, cell, seed, dataset, model, state: RunState, status: str, **extra) -> dict:
    return {
        "model": model.state_dict(),
        "model_args": models.model_args(spec.arch, cell.width, dataset.input_shape, dataset.n_classes),
        "cell": cell.as_dict(),
        "seed": seed,
        "epoch": state.epoch,
        "history": state.history,
        "status": status,
        "experiment": spec.name,
        "training_hash": spec.training_hash(),
        "method": {"optimizer": spec.optimizer, "optimizer_options": dict(spec.optimizer_options),
                   "regularizer": spec.regularizer, "regularizer_options": dict(spec.regularizer_options)},
        **extra,
    }


def check_matches(ckpt: dict, spec: ExperimentSpec, cell: Cell, path: Path) -> None:
    """Refuse a checkpoint whose architecture or width differ from what the spec says."""
    args = ckpt["model_args"]
    if args.get("arch") != spec.arch or args.get("width") != cell.width:
        raise CorruptFile(path, f"holds a {args.get('arch')} of width {args.get('width')}, but the spec "
                                      f"says {spec.arch} of width {cell.width}; use a new experiment name")


def finished(layout: Layout, spec: ExperimentSpec, cell: Cell, seed: int, log=print,
             check_best: bool = True) -> dict | None:
    """The valid final checkpoint of run (cell, seed) of this spec, or None: none, a corrupt one (moved
    aside), or, with `check_best`, a run whose `best.pt` is missing or corrupt (moved aside; retraining
    rebuilds it)."""
    path = layout.checkpoint(cell, seed, "final")
    if not path.exists():
        return None
    try:
        ckpt = checkpoints.load(path)
    except CorruptFile as exc:
        log(f"warning: {exc}; moved aside to {checkpoints.quarantine(path).name}, the run will be redone")
        return None
    check_matches(ckpt, spec, cell, path)
    if ckpt.get("training_hash") != spec.training_hash():
        raise CorruptFile(path, "was trained with other training settings than this spec; "
                                      "use a new experiment name")
    trajectory = layout.trajectory_path(cell, seed)
    if spec.track is not None and tracking.load_trajectory(trajectory) is None:
        log(f"warning: {trajectory} is missing or damaged: the run will be retrained to rebuild it (to the same rows)")
        return None
    best = layout.checkpoint(cell, seed, "best")
    if check_best and (ckpt["status"] == "ok" or best.exists()):
        problem = "is missing"
        try:
            checkpoints.load(best)
            return ckpt
        except FileNotFoundError:
            pass
        except CorruptFile as exc:
            problem = f"is damaged ({exc.reason}); moved aside to {checkpoints.quarantine(best).name}"
        log(f"warning: {best} {problem}: the run will be retrained to rebuild it (to the same weights)")
        return None
    return ckpt


def final_status(layout: Layout, spec: ExperimentSpec, cell: Cell, seed: int, log=print,
                 check_best: bool = True) -> str | None:
    """'ok' or 'diverged' if run (cell, seed) has a valid final checkpoint of this spec (`finished`), else None."""
    ckpt = finished(layout, spec, cell, seed, log, check_best)
    return None if ckpt is None else ckpt["status"]


def saved_states(layout: Layout, spec: ExperimentSpec, cell: Cell, seed: int, log=print) -> dict[int, dict]:
    """{epoch: state} of the valid training states of run (cell, seed) on disk: `last.pt` and the one
    before it, `prev.pt`. A corrupt one is moved aside; one of another spec is refused."""
    states = {}
    for kind in RESUMABLE:
        path = layout.checkpoint(cell, seed, kind)
        if not path.exists():
            continue
        try:
            ckpt = checkpoints.load(path)
        except CorruptFile as exc:
            log(f"warning: {exc}; moved aside to {checkpoints.quarantine(path).name}")
            continue
        if ckpt.get("training_hash") != spec.training_hash():
            raise CorruptFile(path, "belongs to another spec; use a new experiment name")
        check_matches(ckpt, spec, cell, path)
        states[int(ckpt["epoch"])] = ckpt
    return states


@dataclass
class Run:
    """One run (cell, seed) in training: its seed, its ordinary model, its method (optimizer) and its state.

    A run that is not `recorded` is replayed only (its checkpoints are already final): it takes its
    steps so that the runs trained with it see what they saw the first time, and writes nothing.
    """

    seed: int
    model: torch.nn.Module
    method: object
    state: RunState
    recorded: bool = True
    autocast: torch.dtype | None = None  # the dtype its forwards are autocast to (`autocast_forward`), if any
    tracker: tracking.Tracker | None = None  # with `spec.track`: what it measured so far


def start_run(spec: ExperimentSpec, cell: Cell, seed: int, dataset: Dataset, saved: dict | None = None,
              device: str | torch.device = "cpu", recorded: bool = True) -> Run:
    """Run (cell, seed): its model initialised from `seed`, then, given a `saved` training state
    (`saved_states`), continued from it."""
    model = init_model(spec, cell, seed, dataset).to(device)
    autocast = AUTOCAST[spec.autocast]
    if autocast is not None:
        autocast_forward(model, autocast)
    method = build_method(spec, model, lr=cell.lr, weight_decay=cell.weight_decay, seed=seed)
    tracker = None if spec.track is None else tracking.tracker_of(spec.track, seed, model,
                                                                  None if saved is None else saved["tracking"])
    state = RunState()
    if saved is not None:
        model.load_state_dict(saved["model"])
        method.load_state_dict(saved["trainer"])
        state = RunState(int(saved["epoch"]), list(saved["history"]), float(saved["best_loss"]))
    return Run(seed, model, method, state, recorded, autocast, tracker)


def autocast_forward(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Make every call of `model` run under `torch.autocast(<its input's device type>, dtype)` and
    return its output as float32: the forward's matrix products and convolutions in `dtype`, the loss
    on float32 logits, the backward and the update outside autocast (forward hooks, so the state dict,
    copies of the model and `torch.func` calls are unchanged). Returns `model`."""
    entered: list = []

    def enter(module, args):
        context = torch.autocast(args[0].device.type, dtype=dtype)
        context.__enter__()
        entered.append(context)

    def leave(module, args, output):
        entered.pop().__exit__(None, None, None)
        return None if output is None else output.float()

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
    return model


def read_later(values: torch.Tensor) -> Callable[[], list[float]]:
    """Start copying `values` to the host; the returned function waits for that copy (not for what the
    device was given to do after it) and returns the values as floats, flattened. On a CUDA device the
    copy goes to pinned memory behind the operations queued so far; elsewhere the values are read when asked."""
    values = values.detach()
    if values.device.type != "cuda":
        return lambda: values.reshape(-1).tolist()
    host = values.to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(values.device))

    def read() -> list[float]:
        copied.synchronize()
        return host.reshape(-1).tolist()

    return read


def sgd_step(method: SGD, x: torch.Tensor, y: torch.Tensor, epoch: int) -> Callable[[], list[float]]:
    """`SGD.step` of `method` on the batch (x, y), the same operations in the same order, its loss read
    back later (`read_later`): the host need not wait for the update before it queues the next step."""
    method.opt.zero_grad(set_to_none=True)
    loss, total = method.objective(x, y, epoch)
    read = read_later(loss)
    total.backward()
    method.opt.step()
    return read


class MethodSteps:
    """Steps of runs taken one by one, each by its own method (any optimizer and regularizer):
    run i's step on its batch (x[i], y[i]) is `method.step` (for plain `SGD`, the same step as
    `sgd_step`), and its model is always current."""

    def __init__(self, runs: list[Run]):
        self.runs = runs

    def set_lr(self, lr: float) -> None:
        for run in self.runs:
            run.method.set_lr(lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> list[float]:
        reads = []
        for i, run in enumerate(self.runs):
            if type(run.method) is SGD:
                reads.append(sgd_step(run.method, x[i], y[i], epoch))
            else:
                loss = run.method.step(x[i], y[i], epoch)
                reads.append(lambda loss=loss: [loss])
        return [loss for read in reads for loss in read()]

    def sync(self) -> None:
        """Make every run's own model and method hold its current state (they already do)."""


def resume_epoch(spec: ExperimentSpec, finals: dict[int, dict | None], states: dict[int, dict[int, dict]]) -> int:
    """The epoch from which the runs `finals` (seed -> final checkpoint, None if not done), trained
    together, continue so that each ends exactly as an uninterrupted run of them would: the latest
    epoch E at which every run not done has a saved state (`states`: seed -> {epoch: state}), and
    so has every done run that still trained at E in the uninterrupted run (a run done "ok" trained
    until the last epoch; one that diverged in epoch d trained at E <= d), because the runs trained
    together step as one (the ensemble's rounding depends on its members). E = 0 (the initial
    models) when there is no such saved epoch.
    """
    todo = [seed for seed, final in finals.items() if final is None]
    common = set.intersection(*(set(states[seed]) for seed in todo)) if todo else set()
    for epoch in sorted(common, reverse=True):
        if all(epoch in states[seed] for seed in finals if still_training(spec, finals[seed], epoch)):
            return epoch
    return 0


def still_training(spec: ExperimentSpec, final: dict | None, epoch: int) -> bool:
    """Whether a run with final checkpoint `final` (None: not done) trains in epoch `epoch` (0-based)."""
    if final is None:
        return True
    if final["status"] == "diverged":
        return int(final["diverged_at"]["epoch"]) >= epoch
    return epoch < spec.epochs


def train_group(spec: ExperimentSpec, cell: Cell, seeds: list[int], layout: Layout, dataset: Dataset,
                steps_of=None, device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train the runs `seeds` of `cell` together (stepped by `steps_of`, default `MethodSteps`) to
    completion, resuming where they stopped; return {seed: status}.

    Whatever was interrupted or corrupted, each run ends bit for bit as the uninterrupted training
    of the group would have left it: the group continues from `resume_epoch`, replaying (without
    writing) the done runs that the others trained with from there. Then the training states of
    the done runs are removed.
    """
    finals = {seed: finished(layout, spec, cell, seed, log) for seed in seeds}
    statuses = {seed: final["status"] for seed, final in finals.items() if final is not None}
    if len(statuses) < len(seeds):
        states = {seed: saved_states(layout, spec, cell, seed, log) for seed in seeds}
        epoch = resume_epoch(spec, finals, states)
        runs = [start_run(spec, cell, seed, dataset, states[seed].get(epoch), device, recorded=finals[seed] is None)
                for seed in seeds if still_training(spec, finals[seed], epoch)]
        trained = train_runs(spec, cell, layout, dataset, runs, steps_of or MethodSteps, device, log, on_epoch)
        statuses.update({seed: trained[seed] for seed in trained if finals[seed] is None})
    for seed in seeds:
        remove_states(layout, cell, seed)
    return {seed: statuses[seed] for seed in seeds}


def train_runs(spec: ExperimentSpec, cell: Cell, layout: Layout, dataset: Dataset, runs: list[Run],
               steps_of=MethodSteps, device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train `runs` (of `cell`, all at the same epoch) to completion; return {seed: status}.

    The one training loop. Epoch e of run s visits `epoch_order(n, s, e)` in batches of
    `cell.batch_size` (the last incomplete one dropped) at the lr `lr_at(spec, cell.lr, e)`; the
    runs' steps are taken by `steps_of(runs)` (`MethodSteps`, or the ensemble form
    `training.ensemble.EnsembleSteps`), which returns each run's loss before its step. A run whose
    loss is non-finite ends there (`save_diverged`); the others go on, stepped by a new
    `steps_of(survivors)`. After every epoch each run's `best.pt` and `last.pt` are written
    (`save_epoch`), and `final.pt` when it is done (`save_final`); runs not `recorded` write nothing.
    With `spec.track` the recorded runs are measured at the tracked steps (`track_runs`).
    """
    if len({run.state.epoch for run in runs}) > 1:
        raise ValueError("runs trained together must resume from the same epoch")
    dtype = DTYPES[spec.dtype]
    x, y = dataset.train.x.to(device, dtype), dataset.train.y.to(device)
    n, bs = len(y), cell.batch_size
    steps = n // bs
    statuses: dict[int, str] = {}
    alive = list(runs)
    stepper = steps_of(alive) if alive else None
    due = set(tracking.schedule(spec.track, steps, spec.epochs)) if spec.track is not None else set()
    subset = tracking.subset_of(dataset.train, spec.track).to(device, dtype) if due else None
    while alive and alive[0].state.epoch < spec.epochs:
        epoch = alive[0].state.epoch
        lr = lr_at(spec, cell.lr, epoch)
        stepper.set_lr(lr)
        orders = torch.stack([epoch_order(n, run.seed, epoch) for run in alive]).to(device)
        for run in alive:
            run.model.train()
        if epoch == 0:
            track_runs(stepper, alive, subset, due, 0, steps, lr)
        totals = [0.0] * len(alive)
        for step in range(steps):
            losses = batch_step(stepper, x, y, orders, step, bs, epoch)
            totals = [t + loss for t, loss in zip(totals, losses)]
            bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
            if bad:
                stepper.sync()
                for i in bad:
                    run = alive[i]
                    if run.recorded:
                        save_diverged(spec, cell, run.seed, layout, dataset, run.method, run.state, lr, step,
                                      losses[i], log, run.tracker)
                    statuses[run.seed] = "diverged"
                keep = [i for i in range(len(alive)) if i not in bad]
                alive, totals, orders = [alive[i] for i in keep], [totals[i] for i in keep], orders[keep]
                if not alive:
                    break
                stepper = steps_of(alive)
                stepper.set_lr(lr)
            track_runs(stepper, alive, subset, due, epoch * steps + step + 1, steps, lr)
        if not alive:
            break
        stepper.sync()
        for run, total in zip(alive, totals):
            if run.recorded:
                save_epoch(spec, cell, run.seed, layout, dataset, run.method, run.state, lr, total / steps,
                           run.tracker)
                if on_epoch is not None:
                    on_epoch(cell, run.seed, run.state.epoch)
            else:
                run.state.epoch += 1
    for run in alive:
        if run.recorded:
            save_final(spec, cell, run.seed, layout, dataset, run.method, run.state, run.tracker)
        statuses[run.seed] = "ok"
    return statuses


def track_runs(stepper, runs: list[Run], subset, due: set[int], step: int, steps_per_epoch: int, lr: float) -> None:
    """At a tracked `step` (one of `due`), measure every recorded run's model (brought up to date by
    `stepper.sync()`) on `subset` with its tracker."""
    if step not in due:
        return
    stepper.sync()
    for run in runs:
        if run.recorded:
            run.tracker.measure(run.method.model, subset, step, steps_per_epoch, lr)


def batch_step(stepper, x: torch.Tensor, y: torch.Tensor, orders: torch.Tensor, step: int, batch_size: int,
               epoch: int) -> list[float]:
    """Step `step` of every run of `stepper`: run i on the examples orders[i, step*B:(step+1)*B] of
    (x, y), B = `batch_size`; returns each run's loss before its step."""
    idx = orders[:, step * batch_size:(step + 1) * batch_size]
    return stepper.step(x[idx], y[idx], epoch)


def train_seed(spec: ExperimentSpec, cell: Cell, seed: int, layout: Layout, dataset: Dataset,
               device: str | torch.device = "cpu", log=print, on_epoch=None) -> str:
    """Train run (cell, seed) alone to completion, resuming if possible; return its status."""
    return train_group(spec, cell, [seed], layout, dataset, MethodSteps, device, log, on_epoch)[seed]


def save_epoch(spec, cell, seed, layout: Layout, dataset, method, state: RunState, lr: float,
               mean_loss: float, tracker: tracking.Tracker | None = None) -> None:
    """Close epoch `state.epoch` of run (cell, seed) with mean training loss `mean_loss`: append it
    to the history, write `best.pt` if the loss is the lowest so far, then `last.pt` (the whole
    resumable state: model, optimizer, history, best loss), the `last.pt` before it kept as `prev.pt`
    (so that runs trained together can go back to one epoch all of them reached); with a `tracker`, its
    state goes into `last.pt` and its trajectory file is rewritten (`save_trajectory`)."""
    state.epoch += 1
    state.history.append({"epoch": state.epoch, "lr": lr, "train_loss": mean_loss})
    if mean_loss < state.best_loss:
        state.best_loss = mean_loss
        checkpoints.save(layout.checkpoint(cell, seed, "best"),
                         checkpoint_dict(spec, cell, seed, dataset, method.model, state, "ok"))
    last = layout.checkpoint(cell, seed, "last")
    if last.exists():
        os.replace(last, layout.checkpoint(cell, seed, "prev"))
    extra = {} if tracker is None else {"tracking": tracker.state_dict()}
    checkpoints.save(last, checkpoint_dict(spec, cell, seed, dataset, method.model, state, "running",
                                           trainer=method.state_dict(), best_loss=state.best_loss, **extra))
    save_trajectory(spec, cell, seed, layout, tracker, "running")


def save_trajectory(spec, cell, seed, layout: Layout, tracker: tracking.Tracker | None, status: str) -> None:
    """Write run (cell, seed)'s trajectory file (`tracking.save_trajectory`), if it has a tracker."""
    if tracker is not None:
        tracking.save_trajectory(layout.trajectory_path(cell, seed), tracker, status, experiment=spec.name,
                                 training_hash=spec.training_hash(), cell=cell.as_dict(), seed=seed)


def save_diverged(spec, cell, seed, layout: Layout, dataset, method, state: RunState, lr: float, step: int,
                  loss: float, log=print, tracker: tracking.Tracker | None = None) -> None:
    """Stop run (cell, seed) at `step` of epoch `state.epoch` (non-finite loss `loss`): `final.pt` with
    status "diverged", `diverged_at` {epoch, step} and the model as that step left it. Its training
    states stay until its group is done (`train_group`): the runs trained with it may replay it."""
    epoch = state.epoch
    state.history.append({"epoch": epoch + 1, "lr": lr, "train_loss": float("nan")})
    ckpt = checkpoint_dict(spec, cell, seed, dataset, method.model, state, "diverged",
                           diverged_at={"epoch": epoch, "step": step})
    save_trajectory(spec, cell, seed, layout, tracker, "diverged")
    checkpoints.save(layout.checkpoint(cell, seed, "final"), ckpt)
    log(f"run {cell.id} seed {seed} diverged at epoch {epoch} step {step} (loss {loss})")


def save_final(spec, cell, seed, layout: Layout, dataset, method, state: RunState,
               tracker: tracking.Tracker | None = None) -> None:
    """Mark run (cell, seed) done: `final.pt` with status "ok" (its trajectory file written first)."""
    save_trajectory(spec, cell, seed, layout, tracker, "ok")
    checkpoints.save(layout.checkpoint(cell, seed, "final"),
                     checkpoint_dict(spec, cell, seed, dataset, method.model, state, "ok"))


def remove_states(layout: Layout, cell: Cell, seed: int) -> None:
    """Remove the training states (`last.pt`, `prev.pt`) of a run that is done."""
    if layout.checkpoint(cell, seed, "final").exists():
        for kind in RESUMABLE:
            layout.checkpoint(cell, seed, kind).unlink(missing_ok=True)


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model stored in checkpoint `path`; return (model in eval mode, checkpoint dict).
    `CorruptFile` when its weights do not fit the model its `model_args` describe (a size mismatch, a
    missing or unexpected parameter), or those are not a model's arguments."""
    ckpt = checkpoints.load(path, map_location=device)
    try:
        model = models.from_args(ckpt["model_args"])
        first = next(iter(ckpt["model"].values()))
        model = model.to(device=device, dtype=first.dtype)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, StopIteration) as exc:
        reason = " ".join(str(exc).split())  # load_state_dict's message spans lines
        raise CorruptFile(path, f"its weights do not fit the model its model_args {ckpt.get('model_args')} describe "
                                f"({type(exc).__name__}: {reason[:300]})") from None
    model.eval()
    return model, ckpt
