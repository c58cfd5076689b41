"""One executor interface, several backends (submitit's shape): `executor.run(spec, layout, stages)`.

Every backend runs the jobs of each stage (`jobs.stage_jobs`) with the one loop of `jobs.run_jobs`,
skips those whose valid result is on disk, and returns one `RunReport` per stage (done, skipped,
failed with the exception). Each lives in its own module:

- `inprocess.InProcess`: here, one job after another; the debug backend (breakpoints and tracebacks work).
- `local_pool.LocalPool`: worker processes on this machine, a cell's stages on one worker:
  one-thread CPU workers, or `workers_per_gpu` workers pinned to each GPU (`runtime.pool_slots`).
- `cluster.Submitit`: Slurm arrays ("slurm") or local submitit processes ("submitit-local"), waited
  for; their device is `SlurmOptions.device`.

Every job of every backend runs on the device it is given (cpu, cuda, cuda:N): models, data and
batches move there once.
"""

from __future__ import annotations

from typing import Protocol

from phasediagram.execution.cluster import Submitit
from phasediagram.execution.inprocess import InProcess
from phasediagram.execution.jobs import RunReport
from phasediagram.execution.local_pool import LocalPool, pool_size
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout

__all__ = ["Executor", "InProcess", "LocalPool", "Submitit", "default_executor", "pool_size"]


class Executor(Protocol):
    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        """Run every job of `stages`, in order; one report per stage."""


def default_executor(workers: int | None = None, device: str = "cpu", workers_per_gpu: int = 1) -> Executor:
    """A local pool where it has several workers (`pool_size`), else the in-process backend on `device`."""
    if pool_size(workers, device, workers_per_gpu) > 1:
        return LocalPool(workers, None, device, workers_per_gpu)
    return InProcess(device)
