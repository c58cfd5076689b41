"""Jobs: the deterministic job list of a stage, how one job runs, and the executors.

A stage is "train" or a metric name; it has one job per cell, in `spec.cells()` order, so array
index i always means the same job. A job whose valid result exists is skipped, so every job is
idempotent and rerunning a stage resumes it. Executors run a job list in this process, in a
local pool of worker processes (one-thread CPU workers, or workers pinned to GPUs), or through
submitit (see `cluster`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing.forkserver
import os
import socket
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from phasediagram.data import datasets as data_mod
from phasediagram.errors import MissingCheckpoint, SpecError
from phasediagram.execution.failures import FATAL, JobFailure, attempt
from phasediagram.execution.runtime import (
    configure_worker,
    deterministic_algorithms,
    exit_with,
    freeze_alive,
    interrupt_tasks_only,
    interruptible_task,
    interrupts_deferred,
    interrupts_ignored,
    main_script_withheld,
    pool_slots,
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


def run_cell_metrics(spec: ExperimentSpec, layout: Layout, stages: list[str], cell: Cell,
                     device: str | torch.device = "cpu", log=print) -> dict[str, str | Exception]:
    """Run the metric jobs of `stages` for `cell` one after another, loading its checkpoints once for
    all of them; {stage: 'skipped' | 'done' | the exception that job raised}."""
    models = CellModels(spec, layout, cell, device, log)
    outcomes: dict[str, str | Exception] = {}
    for stage in stages:
        job = Job(stage, cell)
        outcomes[stage] = attempt(job.id, lambda job=job: run_job(spec, layout, job, device, log, models=models))
    return outcomes


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


# --------------------------------------------------------------------------- executors
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


class _NoProgress:
    """What `_progress` gives without a terminal: no tqdm object at all, so no tqdm lock is taken (a
    process killed while holding tqdm's multiprocessing lock would block its forked siblings forever)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _progress(total: int, desc: str):
    """A progress bar on a terminal (stderr a tty), else a no-op with the same methods."""
    if not sys.stderr.isatty():
        return _NoProgress()
    return tqdm(total=total, desc=desc, leave=False)


def _write(message: str, file=None) -> None:
    """A log line that does not break a progress bar: `tqdm.write` on a terminal, else print."""
    (tqdm.write if sys.stderr.isatty() else print)(message, file=file)


def run_inprocess(spec: ExperimentSpec, layout: Layout, jobs: list[Job], device="cpu", desc="jobs") -> RunReport:
    """Run `jobs` one after another here: a bar for the stage and, for training, one for the job's epochs."""
    report = RunReport()
    with _progress(len(jobs), desc) as bar:
        for job in jobs:
            epochs = _progress(spec.epochs * len(spec.seeds), job.cell.id) if job.stage == TRAIN else None
            on_epoch = (lambda *_: epochs.update()) if epochs is not None else None
            try:
                report.add(job, attempt(job.id, lambda job=job: run_job(spec, layout, job, device, log=_write,
                                                                        on_epoch=on_epoch)))
            finally:
                if epochs is not None:
                    epochs.close()
            bar.update()
    return report


_worker_device = "cpu"  # in a pool worker: the device its jobs run on (`_pool_init`)


def _pool_init(owner: int, slots: list[tuple[str, int]], started) -> None:
    """A pool worker: the next entry (device, threads) of `slots` (`started`: a shared count of the
    workers started so far), its torch threads and, on a GPU, that GPU made the current device; torch
    and this package, imported by now, frozen (`freeze_alive`); it ends when the pool's owner, process
    `owner`, ends (`exit_with`), even if the owner was SIGKILLed; Ctrl-C interrupts its tasks only
    (`interrupt_tasks_only`)."""
    global _worker_device
    with started.get_lock():
        index = started.value
        started.value += 1
    _worker_device, threads = slots[index % len(slots)]
    configure_worker(threads)
    if _worker_device != "cpu":
        torch.cuda.set_device(_worker_device)
    exit_with(owner)
    interrupt_tasks_only()
    freeze_alive()


def _pool_ready() -> None:
    """A task that does nothing: submitting it makes the pool start a worker process."""


def start_pool(workers: int | None = None, device: str = "cpu", workers_per_gpu: int = 1) -> ProcessPoolExecutor:
    """A pool of worker processes whose imports start now, while the caller goes on (the CLI checks the
    dataset meanwhile): on the CPU `workers` one-thread workers (default: one per core); on CUDA
    `workers_per_gpu` workers per GPU ("cuda": every visible one; "cuda:N": that one), each pinned to
    its GPU with its share of the cores (`runtime.pool_slots`). Shut it down with `shutdown` (or use
    it as a context manager).

    CPU pools: where the platform has a fork server, that one process imports torch, this package and
    torch._dynamo (`pool_preload`) once, and the workers are forks of it; else each worker is spawned
    and imports torch and this package itself, side by side with the caller's own work, and
    torch._dynamo at its first optimizer (bench/bench_start.py compares them). Every worker starts
    here, with the caller's main script withheld (`runtime.main_script_withheld`), so a script
    without a main guard is not run again in the workers.
    The fork server serves every pool of this process and ends with it; it starts with this process's
    environment and standard streams at its first pool; it ignores Ctrl-C, and so does every worker
    until it is ready (`runtime.interrupts_ignored`); Ctrl-C while the workers start takes effect once
    they have (`runtime.interrupts_deferred`). CUDA pools are always spawned: a fresh
    interpreter has initialised no CUDA whatever its parent did (a fork of a process that has is
    unusable for CUDA), and the import time is small beside GPU jobs. Each worker takes the device
    named by its start order and makes it its current CUDA device before it runs a job."""
    gpus = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    slots = pool_slots(device, workers, workers_per_gpu, os.cpu_count() or 1, gpus)
    forks = gpus == 0 and "forkserver" in multiprocessing.get_all_start_methods()
    context = get_context("forkserver" if forks else "spawn")
    if forks:
        context.set_forkserver_preload([f"{__package__}.pool_preload"])
        with interrupts_ignored():
            multiprocessing.forkserver.ensure_running()
    pool = ProcessPoolExecutor(len(slots), mp_context=context, initializer=_pool_init,
                               initargs=(os.getpid(), slots, context.Value("i", 0)))
    try:
        with main_script_withheld(), interrupts_deferred() if forks else interrupts_ignored():
            for _ in slots:  # each submit with no idle worker starts one
                pool.submit(_pool_ready)
    except KeyboardInterrupt:
        pool.shutdown()  # waits for the workers to start and end: none is left to start without its owner
        raise
    return pool


def _pool_task(spec_json: str, root: str, name: str, stages: list[str], cell: dict) -> dict[str, str | Exception]:
    """In a pool worker: the train job (stages == ["train"]) or a cell's metric jobs; {stage: outcome}."""
    import json

    spec = ExperimentSpec.from_dict(json.loads(spec_json))
    layout, cell_ = Layout(Path(root), name), Cell(**cell)
    with interruptible_task():
        if stages == [TRAIN]:
            return {TRAIN: run_job(spec, layout, Job(TRAIN, cell_), _worker_device, log=print)}
        return run_cell_metrics(spec, layout, stages, cell_, _worker_device, log=print)


def run_pool(spec: ExperimentSpec, layout: Layout, stages: list[str], workers: int | None = None,
             pool: ProcessPoolExecutor | None = None, device: str = "cpu",
             workers_per_gpu: int = 1) -> dict[str, RunReport]:
    """Run the jobs of `stages` in the workers of `start_pool(workers, device, workers_per_gpu)`
    (default: one one-thread process per core), those of `pool` (from `start_pool`; the caller shuts
    it down, and its devices apply) when given.

    Training jobs go first, largest models first; as soon as a cell's training job ends, one task
    runs all that cell's metric jobs (its checkpoints loaded once for all of them), so metrics
    overlap with the rest of the training and the pool starts once for the whole study. Returns
    a report per stage. On Ctrl-C the tasks not yet started are cancelled and KeyboardInterrupt
    propagates (the running ones end by their own, `runtime.interrupt_tasks_only`).
    """
    reports = {stage: RunReport() for stage in stages}
    metric_stages = [s for s in stages if s != TRAIN]
    spec_json = spec.to_json()
    total = sum(len(stage_jobs(spec, s)) for s in stages)
    with (start_pool(workers, device, workers_per_gpu) if pool is None else contextlib.nullcontext(pool)) as pool, \
            _progress(total, "jobs") as bar:
        def submit(task_stages: list[str], cell: Cell):
            return pool.submit(_pool_task, spec_json, str(layout.root), layout.name, task_stages, cell.as_dict())

        futures = {}
        if TRAIN in stages:
            futures.update({submit([TRAIN], j.cell): ([TRAIN], j.cell) for j in cost_order(stage_jobs(spec, TRAIN))})
        elif metric_stages:
            futures.update({submit(metric_stages, c): (metric_stages, c) for c in spec.cells()})
        while futures:
            try:
                fut = next(as_completed(futures))
            except KeyboardInterrupt:
                for fut in futures:
                    fut.cancel()
                raise
            task_stages, cell = futures.pop(fut)
            outcome = attempt(cell.id, fut.result, fatal=())  # the task itself failed: each of its jobs did
            outcomes = ({s: JobFailure(Job(s, cell).id, outcome.cause, outcome.trace) for s in task_stages}
                        if isinstance(outcome, JobFailure) else outcome)
            for stage, outcome in outcomes.items():
                reports[stage].add(Job(stage, cell), outcome)
                bar.update()
            if task_stages == [TRAIN] and metric_stages:
                futures[submit(metric_stages, cell)] = (metric_stages, cell)
    return reports
