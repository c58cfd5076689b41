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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from phasediagram.data.datasets import Dataset
from phasediagram.errors import CorruptFile
from phasediagram.methods import build_method
from phasediagram.models import families as models
from phasediagram.seeding import stable_seed
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def lr_at(spec: ExperimentSpec, base_lr: float, epoch: int) -> float:
    """The learning rate of `epoch` (0-based) under the spec's schedule."""
    if spec.schedule == "step" and epoch >= math.floor(spec.lr_decay_at * spec.epochs):
        return base_lr * spec.lr_decay_factor
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


def final_status(layout: Layout, spec: ExperimentSpec, cell: Cell, seed: int, log=print) -> str | None:
    """'ok' or 'diverged' if run (cell, seed) has a valid final checkpoint of this spec, else None."""
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
    return ckpt["status"]


def resume_state(layout: Layout, spec, cell, seed, model, method, log=print) -> RunState:
    """Load `last.pt` into `model` and `method` if it is valid; a corrupt one is moved aside."""
    path = layout.checkpoint(cell, seed, "last")
    if not path.exists():
        return RunState()
    try:
        ckpt = checkpoints.load(path)
    except CorruptFile as exc:
        log(f"warning: {exc}; moved aside to {checkpoints.quarantine(path).name}, training restarts from epoch 0")
        return RunState()
    if ckpt.get("training_hash") != spec.training_hash():
        raise CorruptFile(path, "belongs to another spec; use a new experiment name")
    model.load_state_dict(ckpt["model"])
    method.load_state_dict(ckpt["trainer"])
    return RunState(ckpt["epoch"], list(ckpt["history"]), float(ckpt["best_loss"]))


@dataclass
class Run:
    """One run (cell, seed) in training: its seed, its ordinary model, its method (optimizer) and its state."""

    seed: int
    model: torch.nn.Module
    method: object
    state: RunState


def start_run(spec: ExperimentSpec, cell: Cell, seed: int, layout: Layout, dataset: Dataset,
              device: str | torch.device = "cpu", log=print) -> Run:
    """Run (cell, seed): its model initialised from `seed`, then resumed from a valid `last.pt`."""
    model = init_model(spec, cell, seed, dataset).to(device)
    method = build_method(spec, model, lr=cell.lr, weight_decay=cell.weight_decay, seed=seed)
    return Run(seed, model, method, resume_state(layout, spec, cell, seed, model, method, log))


class MethodSteps:
    """Steps of runs taken one by one, each by its own method (any optimizer and regularizer):
    run i's step on its batch (x[i], y[i]) is `method.step`, and its model is always current."""

    def __init__(self, runs: list[Run]):
        self.runs = runs

    def set_lr(self, lr: float) -> None:
        for run in self.runs:
            run.method.set_lr(lr)

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> list[float]:
        return [run.method.step(x[i], y[i], epoch) for i, run in enumerate(self.runs)]

    def sync(self) -> None:
        """Make every run's own model and method hold its current state (they already do)."""


def train_runs(spec: ExperimentSpec, cell: Cell, layout: Layout, dataset: Dataset, runs: list[Run],
               steps_of=MethodSteps, device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train `runs` (of `cell`, all at the same epoch) to completion; return {seed: status}.

    The one training loop. Epoch e of run s visits `epoch_order(n, s, e)` in batches of
    `cell.batch_size` (the last incomplete one dropped) at the lr `lr_at(spec, cell.lr, e)`; the
    runs' steps are taken by `steps_of(runs)` (`MethodSteps`, or the ensemble form
    `training.ensemble.EnsembleSteps`), which returns each run's loss before its step. A run whose
    loss is non-finite ends there (`save_diverged`); the others go on, stepped by a new
    `steps_of(survivors)`. After every epoch each run's `best.pt` and `last.pt` are written
    (`save_epoch`), and `final.pt` when it is done (`save_final`).
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
    while alive and alive[0].state.epoch < spec.epochs:
        epoch = alive[0].state.epoch
        lr = lr_at(spec, cell.lr, epoch)
        stepper.set_lr(lr)
        orders = torch.stack([epoch_order(n, run.seed, epoch) for run in alive]).to(device)
        for run in alive:
            run.model.train()
        totals = [0.0] * len(alive)
        for step in range(steps):
            idx = orders[:, step * bs:(step + 1) * bs]
            losses = stepper.step(x[idx], y[idx], epoch)
            totals = [t + loss for t, loss in zip(totals, losses)]
            bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
            if bad:
                stepper.sync()
                for i in bad:
                    run = alive[i]
                    save_diverged(spec, cell, run.seed, layout, dataset, run.method, run.state, lr, step, losses[i],
                                  log)
                    statuses[run.seed] = "diverged"
                keep = [i for i in range(len(alive)) if i not in bad]
                alive, totals, orders = [alive[i] for i in keep], [totals[i] for i in keep], orders[keep]
                if not alive:
                    break
                stepper = steps_of(alive)
                stepper.set_lr(lr)
        if not alive:
            break
        stepper.sync()
        for run, total in zip(alive, totals):
            save_epoch(spec, cell, run.seed, layout, dataset, run.method, run.state, lr, total / steps)
            if on_epoch is not None:
                on_epoch(cell, run.seed, run.state.epoch)
    for run in alive:
        save_final(spec, cell, run.seed, layout, dataset, run.method, run.state)
        statuses[run.seed] = "ok"
    return statuses


def train_seed(spec: ExperimentSpec, cell: Cell, seed: int, layout: Layout, dataset: Dataset,
               device: str | torch.device = "cpu", log=print, on_epoch=None) -> str:
    """Train run (cell, seed) to completion, resuming if possible; return its status."""
    status = final_status(layout, spec, cell, seed, log)
    if status is not None:
        return status
    run = start_run(spec, cell, seed, layout, dataset, device, log)
    return train_runs(spec, cell, layout, dataset, [run], MethodSteps, device, log, on_epoch)[seed]


def save_epoch(spec, cell, seed, layout: Layout, dataset, method, state: RunState, lr: float,
               mean_loss: float) -> None:
    """Close epoch `state.epoch` of run (cell, seed) with mean training loss `mean_loss`: append it
    to the history, write `best.pt` if the loss is the lowest so far, then `last.pt` (the whole
    resumable state: model, optimizer, history, best loss)."""
    state.epoch += 1
    state.history.append({"epoch": state.epoch, "lr": lr, "train_loss": mean_loss})
    if mean_loss < state.best_loss:
        state.best_loss = mean_loss
        checkpoints.save(layout.checkpoint(cell, seed, "best"),
                         checkpoint_dict(spec, cell, seed, dataset, method.model, state, "ok"))
    checkpoints.save(layout.checkpoint(cell, seed, "last"),
                     checkpoint_dict(spec, cell, seed, dataset, method.model, state, "running",
                                     trainer=method.state_dict(), best_loss=state.best_loss))


def save_diverged(spec, cell, seed, layout: Layout, dataset, method, state: RunState, lr: float, step: int,
                  loss: float, log=print) -> None:
    """Stop run (cell, seed) at `step` of epoch `state.epoch` (non-finite loss `loss`): `final.pt` with
    status "diverged", `diverged_at` {epoch, step} and the model as that step left it; `last.pt` removed."""
    epoch = state.epoch
    state.history.append({"epoch": epoch + 1, "lr": lr, "train_loss": float("nan")})
    ckpt = checkpoint_dict(spec, cell, seed, dataset, method.model, state, "diverged",
                           diverged_at={"epoch": epoch, "step": step})
    checkpoints.save(layout.checkpoint(cell, seed, "final"), ckpt)
    layout.checkpoint(cell, seed, "last").unlink(missing_ok=True)
    log(f"run {cell.id} seed {seed} diverged at epoch {epoch} step {step} (loss {loss})")


def save_final(spec, cell, seed, layout: Layout, dataset, method, state: RunState) -> None:
    """Mark run (cell, seed) done: `final.pt` with status "ok", then remove `last.pt`."""
    checkpoints.save(layout.checkpoint(cell, seed, "final"),
                     checkpoint_dict(spec, cell, seed, dataset, method.model, state, "ok"))
    layout.checkpoint(cell, seed, "last").unlink(missing_ok=True)


def train_cell(spec: ExperimentSpec, cell: Cell, layout: Layout, dataset: Dataset,
               device: str | torch.device = "cpu", log=print, on_epoch=None) -> dict[int, str]:
    """Train every seed of `cell`; return {seed: status}."""
    return {seed: train_seed(spec, cell, seed, layout, dataset, device, log, on_epoch) for seed in spec.seeds}


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model stored in checkpoint `path`; return (model in eval mode, checkpoint dict)."""
    ckpt = checkpoints.load(path, map_location=device)
    model = models.from_args(ckpt["model_args"])
    first = next(iter(ckpt["model"].values()))
    model = model.to(device=device, dtype=first.dtype)
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
