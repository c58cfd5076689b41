"""One executor interface, several backends (submitit's shape): `executor.run(spec, layout, stages)`.

Every backend runs the jobs of each stage (`jobs.stage_jobs`), skips those whose valid result is on
disk, and returns one `RunReport` per stage (done, skipped, failed with the exception):

- `InProcess`: here, one job after another; the debug backend (breakpoints and tracebacks work).
- `LocalPool`: worker processes on this machine (`jobs.run_pool`), a cell's stages on one worker:
  one-thread CPU workers, or `workers_per_gpu` workers pinned to each GPU (`runtime.pool_slots`).
- `Submitit`: Slurm arrays ("slurm") or local submitit processes ("submitit-local"), waited for;
  their device is `SlurmOptions.device`.

Every job of every backend runs on the device it is given (cpu, cuda, cuda:N): models, data and
batches move there once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from phasediagram.execution.jobs import RunReport, run_inprocess, run_pool, stage_jobs
from phasediagram.execution.runtime import check_device, pool_slots
from phasediagram.execution.scripts import SlurmOptions
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout


class Executor(Protocol):
    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        """Run every job of `stages`, in order; one report per stage."""


@dataclass
class InProcess:
    device: str = "cpu"

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        device = check_device(self.device)
        return {stage: run_inprocess(spec, layout, stage_jobs(spec, stage), device, desc=stage)
                for stage in stages}


@dataclass
class LocalPool:
    """On "cpu", `workers` one-thread processes (None: one per CPU core); on "cuda", `workers_per_gpu`
    processes per visible GPU, on "cuda:N" that many on GPU N; `pool`: a pool already started
    (`jobs.start_pool`), whose devices apply."""

    workers: int | None = None
    pool: object | None = None
    device: str = "cpu"
    workers_per_gpu: int = 1

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        if self.pool is None:
            check_device(self.device)
        return run_pool(spec, layout, stages, self.workers, self.pool, self.device, self.workers_per_gpu)


@dataclass
class Submitit:
    kind: str = "slurm"  # or "submitit-local"
    options: SlurmOptions = field(default_factory=SlurmOptions)

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        from phasediagram.execution.cluster import run_submitit

        return {stage: run_submitit(spec, layout, stage_jobs(spec, stage), self.kind, self.options, desc=stage)
                for stage in stages}


def default_executor(workers: int | None = None, device: str = "cpu", workers_per_gpu: int = 1) -> Executor:
    """A local pool where it has several workers (`pool_size`), else the in-process backend on `device`."""
    if pool_size(workers, device, workers_per_gpu) > 1:
        return LocalPool(workers, None, device, workers_per_gpu)
    return InProcess(device)


def pool_size(workers: int | None = None, device: str = "cpu", workers_per_gpu: int = 1) -> int:
    """The number of workers of `LocalPool(workers, None, device, workers_per_gpu)` on this machine."""
    gpus = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    return len(pool_slots(device, workers, workers_per_gpu, os.cpu_count() or 1, gpus))
