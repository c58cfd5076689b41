"""The local-pool backend: the jobs in worker processes on this machine, a cell's stages on one worker.

`LocalPool` runs on one-thread CPU workers (one per core by default), or on `workers_per_gpu`
workers pinned to each GPU (`runtime.pool_slots`); `start_pool` starts them (the command line does
it first, so the workers import torch while it checks the dataset), `run_pool` hands them the jobs:
training first, each cell's metric jobs as one task as soon as its training ends.
"""

from __future__ import annotations

import contextlib
import multiprocessing.forkserver
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from phasediagram.execution.failures import JobFailure, attempt
from phasediagram.execution.jobs import TRAIN, Job, RunReport, cost_order, progress, run_jobs, stage_jobs
from phasediagram.execution.runtime import (
    check_device,
    configure_worker,
    exit_with,
    freeze_alive,
    interrupt_tasks_only,
    interruptible_task,
    interrupts_deferred,
    interrupts_ignored,
    main_script_withheld,
    pool_slots,
)
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage.layout import Layout


@dataclass
class LocalPool:
    """On "cpu", `workers` one-thread processes (None: one per CPU core); on "cuda", `workers_per_gpu`
    processes per visible GPU, on "cuda:N" that many on GPU N; `pool`: a pool already started
    (`start_pool`), whose devices apply."""

    workers: int | None = None
    pool: object | None = None
    device: str = "cpu"
    workers_per_gpu: int = 1

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        if self.pool is None:
            check_device(self.device)
        return run_pool(spec, layout, stages, self.workers, self.pool, self.device, self.workers_per_gpu)


def pool_size(workers: int | None = None, device: str = "cpu", workers_per_gpu: int = 1) -> int:
    """The number of workers of `LocalPool(workers, None, device, workers_per_gpu)` on this machine."""
    gpus = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    return len(pool_slots(device, workers, workers_per_gpu, os.cpu_count() or 1, gpus))


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
        return {job.stage: outcome for job, outcome in run_jobs(spec, layout, [Job(s, cell_) for s in stages],
                                                                _worker_device)}


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
            progress(total, "jobs") as bar:
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
