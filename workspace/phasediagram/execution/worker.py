"""One array task: `python -m phasediagram.execution.worker --experiment-dir checkpoint/<name> --stage S --index I`.

Runs jobs [I*K, (I+1)*K) of stage S (K = --jobs-per-task) of the experiment whose spec.json lies
in the experiment folder, skipping jobs whose valid result exists. Exit status: 0 when every job
ended well, 1 when a job failed, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys

from phasediagram.errors import CorruptFile, SpecError
from phasediagram.execution.failures import JobFailure
from phasediagram.execution.jobs import run_jobs, stage_jobs
from phasediagram.execution.runtime import check_device, configure_worker, freeze_alive
from phasediagram.resolve import load_spec
from phasediagram.storage.layout import Layout


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m phasediagram.execution.worker", description=__doc__.splitlines()[0])
    p.add_argument("--experiment-dir", required=True, help="the experiment folder <root>/checkpoint/<name>")
    p.add_argument("--stage", required=True, help="'train' or a metric name")
    p.add_argument("--index", required=True, type=int, help="array task index (0-based)")
    p.add_argument("--jobs-per-task", type=int, default=1, help="jobs run by each array task (default 1)")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    configure_worker(args.threads)
    freeze_alive()  # torch and this package live until this process exits
    try:
        device = check_device(args.device)
        layout = Layout.from_experiment_dir(args.experiment_dir)
        if not layout.spec_path.is_file():
            raise SpecError("experiment_dir", f"{layout.spec_path} does not exist; generate the jobs first")
        spec = load_spec(layout.spec_path)
        jobs = stage_jobs(spec, args.stage)
        if args.jobs_per_task < 1:
            raise SpecError("jobs_per_task", f"{args.jobs_per_task} must be >= 1")
        first = args.index * args.jobs_per_task
        if not 0 <= first < len(jobs):
            raise SpecError("index", f"{args.index} is out of range: stage {args.stage} has {len(jobs)} job(s), "
                            f"{args.jobs_per_task} per task")
        failed = 0
        for job, outcome in run_jobs(spec, layout, jobs[first:first + args.jobs_per_task], device):
            if isinstance(outcome, JobFailure):  # report it and go on with the task's other jobs
                failed += 1
                print(f"{job.id}: FAILED: {type(outcome.cause).__name__}: {outcome.cause}", file=sys.stderr,
                      flush=True)
                print(outcome.trace, file=sys.stderr, end="", flush=True)
            else:
                print(f"{job.id}: {outcome}", flush=True)
        return 1 if failed else 0
    except (SpecError, CorruptFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
