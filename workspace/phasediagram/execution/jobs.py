"""Jobs: the deterministic job list of a stage, how one job runs (`run_job`), the one loop every
executor runs its jobs with (`run_jobs`), and their reports.

A stage is "train" or a metric name; it has one job per cell, in `spec.cells()` order, so array
index i always means the same job. A job whose valid result exists is skipped, so every job is
idempotent and rerunning a stage resumes it. The executors (`executors`) run job lists in this
process (`inprocess`), in a local pool of worker processes (`local_pool`) or through submitit
(`cluster`).
"""

from __future__ import annotations

import functools
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from phasediagram.data import datasets as data_mod
from phasediagram.errors import MissingCheckpoint, SpecError
from phasediagram.execution.failures import FATAL, JobFailure, attempt
from phasediagram.execution.runtime import (
    deterministic_algorithms,
)
from phasediagram.measure import metric_rows
from phasediagram.metrics import METRICS
from phasediagram.resolve import metric_options
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage import checkpoints, results
from phasediagram.storage.layout import Layout
from phasediagram.training import train
from phasediagram.training.ensemble import train_cell_auto

TRAIN = "train"


@dataclass(frozen=True)
class Job:
    stage: str
    cell: Cell

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.cell.id}"


def stages_of(spec: ExperimentSpec) -> list[str]:
    return [TRAIN, *spec.metrics]


def stage_jobs(spec: ExperimentSpec, stage: str) -> list[Job]:
    if stage != TRAIN and stage not in METRICS:
        raise SpecError("stage", f"{stage!r} is not one of train, {', '.join(METRICS)}")
    return [Job(stage, cell) for cell in spec.cells()]


def cost_order(jobs: list[Job]) -> list[Job]:
    """Largest models and smallest batches first, so a pool does not end on one long job."""
    return sorted(jobs, key=lambda j: (-j.cell.width, j.cell.batch_size))


# --------------------------------------------------------------------------- data cache
@functools.lru_cache(maxsize=4)
def _dataset(name, data_root, cache_dir, train_fraction, label_noise, dtype):
    return data_mod.load(name, data_root=data_root, cache_dir=cache_dir, train_fraction=train_fraction,
                         label_noise=label_noise, dtype=train.DTYPES[dtype])


def dataset_for(spec: ExperimentSpec, cell: Cell, layout: Layout) -> data_mod.Dataset:
    return _dataset(spec.dataset, spec.data_root, str(layout.data_dir), cell.train_fraction, cell.label_noise,
                    spec.dtype)


@functools.lru_cache(maxsize=1)
def _dataset_on(device: str, *key) -> data_mod.Dataset:
    return _dataset(*key).to(device)


def dataset_on(spec: ExperimentSpec, cell: Cell, layout: Layout, device: str | torch.device) -> data_mod.Dataset:
    """`dataset_for` on `device`, copied there once and kept for the jobs that follow on the same data
    (one dataset at a time; on the CPU the same tensors)."""
    return _dataset_on(str(torch.device(device)), spec.dataset, spec.data_root, str(layout.data_dir),
                       cell.train_fraction, cell.label_noise, spec.dtype)


# --------------------------------------------------------------------------- one job
def job_options(spec: ExperimentSpec, stage: str) -> dict:
    """What a stage's result was made with: a metric's options and the checkpoint it read."""
    if stage == TRAIN:
        return {}
    options = asdict(metric_options(spec, stage))
    return options if spec.metric_checkpoint == "final" else {**options, "checkpoint": spec.metric_checkpoint}


def checkpoint_digests(spec: ExperimentSpec, layout: Layout, job: Job) -> dict[str, str | None]:
    """{path relative to the experiment folder: digest} of the checkpoints a job's rows come from:
    every seed's `final.pt`, and for a metric job the `spec.metric_checkpoint` it reads."""
    kinds = ["final"] if job.stage == TRAIN or spec.metric_checkpoint == "final" else ["final",
                                                                                        spec.metric_checkpoint]
    out = {}
    for seed in spec.seeds:
        for kind in kinds:
            path = layout.checkpoint(job.cell, seed, kind)
            out[path.relative_to(layout.exp_dir).as_posix()] = checkpoints.digest(path)
    return out


def is_done(spec: ExperimentSpec, layout: Layout, job: Job, log=print) -> bool:
    """A job is done when its result file is valid and current (made from the checkpoints now on
    disk); a train job also needs every seed's final checkpoint to load and match (a corrupt one is
    moved aside, so the run is redone)."""
    current = results.is_current(layout.result_path(job.stage, job.cell), experiment=spec.name,
                                 training_hash=spec.training_hash(), stage=job.stage, cell=job.cell,
                                 options=job_options(spec, job.stage),
                                 checkpoints=checkpoint_digests(spec, layout, job), log=log)
    if current and job.stage == TRAIN:
        return all(train.final_status(layout, spec, job.cell, seed, log) is not None for seed in spec.seeds)
    return current


def run_job(spec: ExperimentSpec, layout: Layout, job: Job, device: str | torch.device = "cpu", log=print,
            on_epoch=None, models: CellModels | None = None) -> str:
    """Run `job` unless its valid result exists; return 'skipped' or 'done'.

    `on_epoch(cell, seed, epoch)` is called after each training epoch's checkpoint is written.
    `models`, for a metric job, shares the cell's loaded checkpoints with other metric jobs.
    With `spec.deterministic` the job runs under `runtime.deterministic_algorithms`.
    """
    if is_done(spec, layout, job, log):
        layout.failure_path(job.stage, job.cell).unlink(missing_ok=True)
        return "skipped"
    try:
        with deterministic_algorithms(spec.deterministic, device):
            if job.stage == TRAIN:
                rows = _train_job(spec, layout, job.cell, device, log, on_epoch)
                made_from = checkpoint_digests(spec, layout, job)
            else:
                models = models if models is not None else CellModels(spec, layout, job.cell, device, log)
                made_from = models.digests(job)
                rows = _metric_job(spec, layout, job.stage, job.cell, device, models)
    except FATAL:
        raise
    except Exception as exc:
        record_failure(layout, job, exc)
        raise
    results.write(layout.result_path(job.stage, job.cell), experiment=spec.name, training_hash=spec.training_hash(),
                  stage=job.stage, cell=job.cell, options=job_options(spec, job.stage), checkpoints=made_from,
                  rows=rows)
    layout.failure_path(job.stage, job.cell).unlink(missing_ok=True)
    return "done"


FAILURE_TAIL_LINES = 20


def record_failure(layout: Layout, job: Job, exc: BaseException) -> None:
    """Write the failure record of `job` (its error and the last lines of its traceback, the host and
    process): what `Study.status` reports until the job succeeds."""
    trace = traceback.format_exc().rstrip().splitlines()[-FAILURE_TAIL_LINES:]
    checkpoints.atomic_write_json(layout.failure_path(job.stage, job.cell), {
        "job": job.id, "error": f"{type(exc).__name__}: {exc}"[:1000], "trace": trace,
        "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})


def run_jobs(spec: ExperimentSpec, layout: Layout, jobs: list[Job], device: str | torch.device = "cpu", log=print,
             fatal: tuple[type[BaseException], ...] = FATAL, on_epoch=None) -> Iterator[tuple[Job, str | JobFailure]]:
    """Run `jobs` one after another (`run_job`), yielding each with its outcome: 'done', 'skipped', or
    the `JobFailure` it raised (an exception of a `fatal` type propagates: bad input stops the run).
    The one loop of every executor (in-process, a pool worker's task, a submitit task, an array task).
    The metric jobs of one cell in a row share its checkpoints, loaded once (`CellModels`)."""
    models = None
    for job in jobs:
        if job.stage != TRAIN and (models is None or models.cell != job.cell):
            models = CellModels(spec, layout, job.cell, device, log)
        shared = None if job.stage == TRAIN else models
        yield job, attempt(job.id, lambda: run_job(spec, layout, job, device, log, on_epoch, shared), fatal)


def _train_job(spec, layout, cell, device, log, on_epoch=None) -> list[dict]:
    dataset = dataset_on(spec, cell, layout, device)
    statuses = train_cell_auto(spec, cell, layout, dataset, device, log, on_epoch)
    rows = []
    for seed, status in statuses.items():
        ckpt = train.load_model(layout.checkpoint(cell, seed, "final"))[1]
        hist = ckpt["history"]
        last_loss = hist[-1]["train_loss"] if hist else math.nan
        rows.append(results.make_row(spec.name, cell, seed, None, "train", "epochs", None, float(ckpt["epoch"]),
                                     status, TRAIN))
        rows.append(results.make_row(spec.name, cell, seed, None, "train", "final_epoch_loss", None,
                                     float(last_loss), status, TRAIN))
        if status == "diverged":
            at = ckpt.get("diverged_at", {})
            rows.append(results.make_row(spec.name, cell, seed, None, "train", "diverged_epoch", None,
                                         float(at.get("epoch", math.nan)), status, TRAIN))
            rows.append(results.make_row(spec.name, cell, seed, None, "train", "diverged_step", None,
                                         float(at.get("step", math.nan)), status, TRAIN))
    return rows


class CellModels:
    """The trained checkpoints of a cell's seeds that the metrics read (`spec.metric_checkpoint`), each
    loaded (and checked) at most once; the final checkpoint says whether the run is ok or diverged.

    `get(seed)` returns (model, status); the model is None unless status is "ok". Metric jobs
    leave models as they found them (the metric contract), so the jobs of one cell share them.
    Raises `MissingCheckpoint` for a seed without a valid trained checkpoint.
    """

    def __init__(self, spec: ExperimentSpec, layout: Layout, cell: Cell, device, log=print):
        self.spec, self.layout, self.cell, self.device, self.log = spec, layout, cell, device, log
        self._loaded: dict[int, tuple[torch.nn.Module | None, str]] = {}

    def get(self, seed: int) -> tuple[torch.nn.Module | None, str]:
        if seed not in self._loaded:
            path = self.layout.checkpoint(self.cell, seed, "final")
            if train.final_status(self.layout, self.spec, self.cell, seed, self.log, check_best=False) is None:
                raise MissingCheckpoint(f"no valid trained checkpoint {path}: run the train stage first "
                                        "(a corrupt one was moved aside)")
            model, ckpt = train.load_model(path, self.device)
            train.check_matches(ckpt, self.spec, self.cell, path)
            if ckpt["status"] == "ok" and self.spec.metric_checkpoint != "final":
                path = self.layout.checkpoint(self.cell, seed, self.spec.metric_checkpoint)
                try:
                    model, best = train.load_model(path, self.device)
                except FileNotFoundError:
                    raise MissingCheckpoint(f"no {path}: the run has no checkpoint of this kind") from None
                train.check_matches(best, self.spec, self.cell, path)
            self._loaded[seed] = (model if ckpt["status"] == "ok" else None, ckpt["status"])
        return self._loaded[seed]

    def digests(self, job: Job) -> dict[str, str | None]:
        """`checkpoint_digests` of `job`, with every seed's checkpoints loaded (and checked) first."""
        for seed in self.spec.seeds:
            self.get(seed)
        return checkpoint_digests(self.spec, self.layout, job)


def _metric_job(spec, layout, stage, cell, device, models: CellModels) -> list[dict]:
    """Per-seed (single) or per-pair (pair) values of metric `stage` on the cell's checkpoints (`metric_rows`)."""
    loaded = {seed: models.get(seed) for seed in spec.seeds}
    return metric_rows(spec, stage, cell, loaded, dataset_on(spec, cell, layout, device),
                       lambda unit: layout.state_dir(stage, cell, unit))


# --------------------------------------------------------------------------- reports
@dataclass
class RunReport:
    done: int = 0
    skipped: int = 0
    failed: list | None = None

    def __post_init__(self):
        self.failed = self.failed or []

    def add(self, job: Job, outcome: str | Exception) -> None:
        if isinstance(outcome, Exception):
            self.failed.append((job, outcome))
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.done += 1


class NoProgress:
    """What `progress` gives without a terminal: no tqdm object at all, so no tqdm lock is taken (a
    process killed while holding tqdm's multiprocessing lock would block its forked siblings forever)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def progress(total: int, desc: str):
    """A progress bar on a terminal (stderr a tty), else a no-op with the same methods."""
    if not sys.stderr.isatty():
        return NoProgress()
    return tqdm(total=total, desc=desc, leave=False)


def write_line(message: str, file=None) -> None:
    """A log line that does not break a progress bar: `tqdm.write` on a terminal, else print."""
    (tqdm.write if sys.stderr.isatty() else print)(message, file=file)


