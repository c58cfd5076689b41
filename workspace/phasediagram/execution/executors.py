"""One executor interface, several backends (submitit's shape): `executor.run(spec, layout, stages)`.

Every backend runs the jobs of each stage (`jobs.stage_jobs`), skips those whose valid result is on
disk, and returns one `RunReport` per stage (done, skipped, failed with the exception):

- `InProcess`: here, one job after another; the debug backend (breakpoints and tracebacks work).
- `LocalPool`: worker processes on this machine (`jobs.run_pool`), a cell's stages on one worker.
- `Submitit`: Slurm arrays ("slurm") or local submitit processes ("submitit-local"), waited for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from phasediagram.execution.jobs import RunReport, run_inprocess, run_pool, stage_jobs
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
        return {stage: run_inprocess(spec, layout, stage_jobs(spec, stage), self.device, desc=stage)
                for stage in stages}


@dataclass
class LocalPool:
    """`workers` processes (None: one per CPU core); `pool`: a pool already started (`jobs.start_pool`)."""

    workers: int | None = None
    pool: object | None = None

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        return run_pool(spec, layout, stages, self.workers, self.pool)


@dataclass
class Submitit:
    kind: str = "slurm"  # or "submitit-local"
    options: SlurmOptions = field(default_factory=SlurmOptions)

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        from phasediagram.execution.cluster import run_submitit

        return {stage: run_submitit(spec, layout, stage_jobs(spec, stage), self.kind, self.options, desc=stage)
                for stage in stages}


def default_executor(workers: int | None = None, device: str = "cpu") -> Executor:
    """A local pool where there are several cores (and a CPU device), else the in-process backend."""
    if device == "cpu" and (workers or os.cpu_count() or 1) > 1:
        return LocalPool(workers)
    return InProcess(device)
