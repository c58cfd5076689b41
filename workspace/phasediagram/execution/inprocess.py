"""The in-process backend: every job here, one after another; the debug backend (breakpoints and
tracebacks work), and the one a single core gets by default."""

from __future__ import annotations

from dataclasses import dataclass

from phasediagram.execution.jobs import TRAIN, Job, NoProgress, RunReport, progress, run_jobs, stage_jobs, write_line
from phasediagram.execution.runtime import check_device
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout


@dataclass
class InProcess:
    device: str = "cpu"

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        device = check_device(self.device)
        return {stage: run_inprocess(spec, layout, stage_jobs(spec, stage), device, desc=stage)
                for stage in stages}


def run_inprocess(spec: ExperimentSpec, layout: Layout, jobs: list[Job], device="cpu", desc="jobs") -> RunReport:
    """Run `jobs` one after another here (`jobs.run_jobs`): a bar for the jobs and, for training, one
    for the epochs."""
    report = RunReport()
    epochs = spec.epochs * len(spec.seeds) * sum(job.stage == TRAIN for job in jobs)
    with progress(len(jobs), desc) as bar, (progress(epochs, "epochs") if epochs else NoProgress()) as epoch_bar:
        for job, outcome in run_jobs(spec, layout, jobs, device, log=write_line, on_epoch=lambda *_: epoch_bar.update()):
            report.add(job, outcome)
            bar.update()
    return report
