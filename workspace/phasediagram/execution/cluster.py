"""Clusters: a stage's job list through submitit (Slurm or local processes), and `sbatch` of the generated arrays.

`run_submitit` packs the jobs of a stage into tasks of `SlurmOptions.jobs_per_task` jobs, submits
them as one Slurm job array (`submitit.SlurmExecutor`, at most `parallelism` tasks at once) or as
local processes (`submitit.LocalExecutor`, at most `parallelism` at once, default one per core),
waits with a progress bar and returns a `RunReport` whose failures carry the tail of their logs.
The executor is always named explicitly: submitit's AutoExecutor picks Slurm whenever `srun` is on
PATH, even with no controller running.

Every task is a `StageTask`: a checkpointable callable that holds only the job identity (experiment
folder, stage, cells). On timeout or preemption Slurm signals it, submitit calls `checkpoint()`,
which requeues the same callable; the requeued task reads spec.json again and every job resumes
from what is on disk (training from `last.pt` of each seed, finished jobs are skipped), never from
state kept in the pickled submission.

`submit_chain` submits the generated `<stage>.sbatch` arrays with `sbatch`, the metric stages
chained with `--dependency=afterany:<training array>`, so metrics start when training has ended,
whether or not every training task succeeded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from phasediagram.errors import CorruptFile, JobsFailed, SpecError, SubmitError
from phasediagram.execution.failures import JobFailure
from phasediagram.execution.jobs import (
    TRAIN,
    Job,
    RunReport,
    cost_order,
    is_done,
    progress,
    run_jobs,
    stage_jobs,
    write_line,
)
from phasediagram.execution.runtime import configure_worker, freeze_alive
from phasediagram.execution.scripts import SlurmOptions, check_text, log_dir, time_minutes
from phasediagram.resolve import load_spec
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.training.train import RESUMABLE

DEFAULT_SLURM_MINUTES = 60  # asked of Slurm per task when --time is not given (tasks requeue on timeout)
DEFAULT_LOCAL_MINUTES = 7 * 24 * 60  # LocalExecutor kills tasks after 2 minutes unless told otherwise
MAX_TIMEOUT_REQUEUES = 10  # requeues after a timeout (preemptions do not count)
MAX_ARRAY_TASKS = 1000  # Slurm's default MaxArraySize is 1001: larger job lists go out as several arrays
LOG_TAIL_LINES = 30
EXECUTOR_NAMES = ("slurm", "submitit-local")


# --------------------------------------------------------------------------- one task
class StageTask(submitit.helpers.Checkpointable):
    """Run jobs `stage` x `cells` of the experiment in `experiment_dir`; requeued as is on preemption."""

    def __init__(self, experiment_dir: str, stage: str, cells: list[dict], device: str = "cpu", threads: int = 1):
        self.experiment_dir = str(experiment_dir)
        self.stage = stage
        self.cells = [dict(c) for c in cells]
        self.device = device
        self.threads = threads

    def __repr__(self) -> str:
        return f"StageTask({self.experiment_dir!r}, {self.stage!r}, {len(self.cells)} cell(s))"

    def jobs(self) -> list[Job]:
        return [Job(self.stage, Cell(**c)) for c in self.cells]

    def __call__(self) -> list[tuple[str, str]]:
        configure_worker(self.threads)
        freeze_alive()  # a submitit job process: torch and this package live until it exits
        layout = Layout.from_experiment_dir(self.experiment_dir)
        spec = load_spec(layout.spec_path)  # the spec on disk, not a pickled copy
        known = {c.id for c in spec.cells()}
        jobs = self.jobs()
        for job in jobs:
            if job.cell.id not in known:
                raise SpecError("cell", f"{job.cell.id} is not a cell of {layout.spec_path}")
            if job.stage == TRAIN:
                self._say_resume(spec, layout, job.cell)
        outcomes, failures = [], []
        for job, outcome in run_jobs(spec, layout, jobs, self.device, fatal=()):
            if isinstance(outcome, JobFailure):  # report it and go on with the task's other jobs
                print(outcome.trace, file=sys.stderr, end="", flush=True)
                failures.append(str(outcome))
                outcome = "FAILED"
            print(f"{job.id}: {outcome}", flush=True)
            outcomes.append((job.id, outcome))
        if failures:  # the task fails (Slurm state FAILED); the jobs that ran keep their results
            raise JobsFailed(f"{len(failures)} of {len(self.cells)} job(s) failed:\n" + "\n".join(failures))
        return outcomes

    @staticmethod
    def _say_resume(spec, layout, cell) -> None:
        """One line per unfinished run of `cell` with a training state on disk: the latest epoch of its
        `last.pt` and `prev.pt` (a run stopped while saving an epoch holds only `prev.pt`)."""
        for seed in spec.seeds:
            if layout.checkpoint(cell, seed, "final").exists():
                continue
            states = []
            for kind in RESUMABLE:
                path = layout.checkpoint(cell, seed, kind)
                try:
                    states.append((checkpoints.load(path)["epoch"], str(path)))
                except (FileNotFoundError, CorruptFile):
                    continue  # train.py reports a corrupt one and resumes from the other or starts over
            if states:
                epoch, path = max(states)
                print(f"train:{cell.id} seed {seed}: resumes after epoch {epoch} from {path}", flush=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on timeout/preemption: requeue the same jobs; they resume from disk."""
        print(f"{self!r}: interrupted, requeued; it resumes from the checkpoints on disk", flush=True)
        return submitit.helpers.DelayedSubmission(
            StageTask(self.experiment_dir, self.stage, self.cells, self.device, self.threads))


# --------------------------------------------------------------------------- executors
def submitit_folder(layout: Layout) -> Path:
    return layout.root / log_dir(layout) / "submitit"


def _python(options: SlurmOptions, local: bool = False) -> str | None:
    """The tasks' python: --python if given (or `python` after --env-setup on Slurm), else this interpreter (None)."""
    if options.python != "python" or (options.env_setup and not local):
        return shlex.quote(options.python)
    return None


def _minutes(options: SlurmOptions) -> int | None:
    """--time in minutes; None when not given or unlimited (0, UNLIMITED, INFINITE)."""
    if options.time is None or options.time in ("UNLIMITED", "INFINITE"):
        return None
    return time_minutes(options.time) or None


def make_executor(layout: Layout, stage: str, executor_name: str, options: SlurmOptions):
    """A submitit executor for `stage`, chosen explicitly (never AutoExecutor), with the resources of `options`."""
    if executor_name not in EXECUTOR_NAMES:
        raise SpecError("executor", f"{executor_name!r} is not one of {', '.join(EXECUTOR_NAMES)}")
    check_text("root", str(layout.root))
    if "%" in str(layout.root):
        raise SpecError("root", f"{layout.root} holds '%', which Slurm expands in log file paths; "
                        "move the study to a folder without '%'")
    folder = submitit_folder(layout)
    if executor_name == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES,
                                          python=_python(options, local=True))
        executor.update_parameters(
            timeout_min=_minutes(options) or DEFAULT_LOCAL_MINUTES,
            gpus_per_node=options.gpus or 0)
        return executor
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SubmitError("executor", "--executor slurm needs Slurm's sbatch and srun on PATH (run it on the "
                          "cluster's login node), or use --executor submitit-local or local")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUT_REQUEUES, python=_python(options))
    minutes = _minutes(options)
    if minutes is None:
        print(f"no (finite) --time given: each {stage} task asks Slurm for {DEFAULT_SLURM_MINUTES} minutes and is requeued "
              "(resuming from its checkpoints) when it runs out", file=sys.stderr)
        minutes = DEFAULT_SLURM_MINUTES
    setup = [f"export OMP_NUM_THREADS={options.cpus_per_task or 1} PYTHONUNBUFFERED=1"]
    if options.env_setup:
        setup += ["set +u", options.env_setup, "set -u"]
    params = dict(job_name=f"{layout.name}-{stage}", time=minutes, cpus_per_task=options.cpus_per_task,
                  mem=options.mem, gpus_per_node=options.gpus or None, partition=options.partition,
                  account=options.account, qos=options.qos, setup=setup,
                  additional_parameters={"chdir": str(layout.root)})
    if options.parallelism:
        params["array_parallelism"] = options.parallelism
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def tasks_of(layout: Layout, jobs: list[Job], options: SlurmOptions) -> list[StageTask]:
    """Jobs packed `jobs_per_task` to a task, one stage per task, largest models first."""
    device = options.run_device
    threads = options.cpus_per_task or 1
    out = []
    for stage in dict.fromkeys(j.stage for j in jobs):
        ordered = cost_order([j for j in jobs if j.stage == stage])
        k = options.jobs_per_task
        out += [StageTask(str(layout.exp_dir), stage, [j.cell.as_dict() for j in ordered[i:i + k]], device, threads)
                for i in range(0, len(ordered), k)]
    return out


def submit(executor, tasks: list[StageTask]) -> list:
    """Submit `tasks`: Slurm job arrays of at most MAX_ARRAY_TASKS tasks; local tasks one by one."""
    handles: list = []
    try:
        if isinstance(executor, submitit.SlurmExecutor):
            for i in range(0, len(tasks), MAX_ARRAY_TASKS):
                with executor.batch():
                    array = [executor.submit(t) for t in tasks[i:i + MAX_ARRAY_TASKS]]
                handles += array
            return handles
        return [executor.submit(t) for t in tasks]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError,
            subprocess.CalledProcessError) as exc:
        done = sorted({str(h.job_id).split("_")[0] for h in handles})
        raise SubmitError("executor", f"submission failed: {str(exc).strip()}"
                          + (f" (already submitted: {' '.join(done)})" if done else "")) from None


def log_tail(handle, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a submitit job's stderr and stdout logs."""
    parts = []
    for path in (handle.paths.stderr, handle.paths.stdout):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        kept = [ln for ln in text.splitlines() if ln.strip()][-lines:]
        if kept:
            parts.append(f"--- {path} (last {len(kept)} lines) ---\n" + "\n".join(kept))
    return "\n".join(parts) if parts else f"(no log found under {handle.paths.folder})"


def _error_line(exc: BaseException, job: Job) -> str:
    """The line of a task's error that names `job` (StageTask lists each failed job), else its exception line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    own = [ln for ln in lines if ln.startswith(f"{job.id}: ")]
    if own:
        return own[-1][len(job.id) + 2:]
    # submitit's errors hold the whole remote traceback: keep the exception's own line
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Failed)\b", ln)]
    return errors[-1] if errors else (lines[0] if lines else type(exc).__name__)


_NOT_FINAL = ("RUNNING", "PENDING", "UNKNOWN", "COMPLETING", "REQUEUED", "FINISHED")


def collect(spec, layout, task: StageTask, handle, report: RunReport, vanished: bool = False) -> None:
    """Add the outcome of a finished task's jobs to `report`; failures carry the tail of the task's logs.

    `vanished`: the task left the queue without a result (handle.result() would wait for ever).
    """
    try:
        if vanished:
            raise RuntimeError("left the Slurm queue without a result (cancelled, out of time or memory, killed?)")
        outcomes = dict(handle.result())
    except Exception as exc:  # the task raised, was killed or cancelled
        tail = log_tail(handle)
        state = str(getattr(handle, "state", "")).split(" ")[0]
        where = f"task {handle.job_id}" + (f", {state}" if state and state not in _NOT_FINAL else "")
        for job in task.jobs():
            if is_done(spec, layout, job, log=lambda *_: None):
                report.add(job, "done")
            else:
                report.add(job, RuntimeError(f"{job.id}: {_error_line(exc, job)} ({where})\n{tail}"))
        return
    for job in task.jobs():
        report.add(job, outcomes.get(job.id, "done"))


class _QueueCheck:
    """Slurm tasks that left the queue without a result, found with squeue every `every_s` seconds.

    submitit learns that a task ended from its result file or from `sacct`; where accounting is
    off, a task killed by Slurm (cancelled, out of memory, node failure) would be waited for
    forever. A task missing from squeue at two checks in a row counts as ended.
    """

    def __init__(self, every_s: float = 30.0):
        self.every_s, self.last, self.missing = every_s, time.monotonic(), set()

    def ended(self, handles: list) -> set[str]:
        if time.monotonic() - self.last < self.every_s or not handles:
            return set()
        self.last = time.monotonic()
        arrays = sorted({str(h.job_id).split("_")[0] for h in handles})
        try:
            proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)], capture_output=True,
                                  text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return set()
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
            return set()  # squeue itself failed: learn nothing
        queued = set(proc.stdout.split())
        gone = {str(h.job_id) for h in handles if str(h.job_id) not in queued and not h.paths.result_pickle.exists()}
        ended, self.missing = gone & self.missing, gone
        return ended


def wait(spec, layout, pairs: list[tuple[StageTask, object]], report: RunReport, desc: str,
         poll_s: float = 1.0, submit_more=None, queue_check: _QueueCheck | None = None) -> None:
    """Wait for submitted tasks, with a progress bar over jobs; `submit_more()` refills a throttled queue."""
    total = sum(len(t.cells) for t, _ in pairs) + (submit_more.remaining() if submit_more else 0)
    pending = list(pairs)
    with progress(total, desc) as bar:
        while pending or (submit_more and submit_more.remaining()):
            if submit_more:
                pending += submit_more(len(pending))
            ended = queue_check.ended([h for _, h in pending]) if queue_check else set()
            still = []
            for task, handle in pending:
                vanished = str(handle.job_id) in ended
                if vanished or handle.done():
                    n_failed = len(report.failed)
                    collect(spec, layout, task, handle, report, vanished)
                    bar.update(len(task.cells))
                    for job, _ in report.failed[n_failed:]:
                        write_line(f"{desc}: FAILED {job.id} (task {handle.job_id})", file=sys.stderr)
                else:
                    still.append((task, handle))
            pending = still
            if pending:
                time.sleep(poll_s)


class _Throttle:
    """Local submissions, at most `limit` running at once (LocalExecutor itself starts everything at once)."""

    def __init__(self, executor, tasks: list[StageTask], limit: int):
        self.executor, self.queue, self.limit = executor, list(tasks), max(1, limit)

    def remaining(self) -> int:
        return sum(len(t.cells) for t in self.queue)

    def __call__(self, running: int) -> list:
        out = []
        while self.queue and running + len(out) < self.limit:
            task = self.queue.pop(0)
            out.append((task, self.executor.submit(task)))
        return out


def run_submitit(spec: ExperimentSpec, layout: Layout, jobs: list[Job], executor_name: str,
                 slurm_options: SlurmOptions = SlurmOptions(), desc: str = "jobs", poll_s: float = 1.0) -> RunReport:
    """Run `jobs` through submitit on Slurm ('slurm') or in local processes ('submitit-local'); wait for them.

    Jobs whose valid result exists are skipped without submitting anything. Returns the report;
    each failure carries its task's log tail.
    """
    report = RunReport()
    todo = []
    for job in jobs:
        if is_done(spec, layout, job):
            report.add(job, "skipped")
        else:
            todo.append(job)
    if not todo:
        return report
    stage = todo[0].stage if len({j.stage for j in todo}) == 1 else "jobs"
    executor = make_executor(layout, stage, executor_name, slurm_options)
    tasks = tasks_of(layout, todo, slurm_options)
    pairs: list = []
    throttle = None
    try:
        if executor_name == "slurm":
            handles = submit(executor, tasks)
            pairs = list(zip(tasks, handles))
            arrays = sorted({str(h.job_id).split("_")[0] for h in handles})
            print(f"{desc}: submitted {len(todo)} job(s) in {len(tasks)} Slurm task(s), array job(s) "
                  f"{', '.join(arrays)}; logs in {submitit_folder(layout)}", flush=True)
        else:
            throttle = _Throttle(executor, tasks, slurm_options.parallelism or os.cpu_count() or 1)
        wait(spec, layout, pairs, report, desc, poll_s, throttle, _QueueCheck() if executor_name == "slurm" else None)
    except KeyboardInterrupt:
        if executor_name == "slurm":
            ids = sorted({str(h.job_id).split("_")[0] for _, h in pairs})
            print(f"\ninterrupted: the Slurm jobs {' '.join(ids)} go on (scancel them to stop); rerunning this "
                  "command skips the jobs that have finished", file=sys.stderr)
        raise
    return report


@dataclass
class Submitit:
    """The submitit backend: Slurm job arrays ("slurm") or local submitit processes ("submitit-local"),
    waited for (`run_submitit`); `options` give their resources and device."""

    kind: str = "slurm"
    options: SlurmOptions = field(default_factory=SlurmOptions)

    def run(self, spec: ExperimentSpec, layout: Layout, stages: list[str]) -> dict[str, RunReport]:
        return {stage: run_submitit(spec, layout, stage_jobs(spec, stage), self.kind, self.options, desc=stage)
                for stage in stages}


# --------------------------------------------------------------------------- sbatch chain
def submit_chain(layout: Layout, stages: list[str], sbatch: str = "sbatch") -> dict[str, str]:
    """sbatch the generated `<stage>.sbatch` arrays; metric stages wait for training (afterany).

    Returns {stage: job id} and prints one line per submission.
    """
    ordered = sorted(dict.fromkeys(stages), key=lambda s: s != TRAIN)  # training first, then the rest in order
    ids: dict[str, str] = {}
    for stage in ordered:
        path = layout.script_path(stage, ".sbatch")
        if not path.is_file():
            raise SubmitError("submit", f"{path} does not exist; generate it with --generate-slurm-scripts")
        argv = [sbatch, "--parsable"]
        if stage != TRAIN and TRAIN in ids:
            argv.append(f"--dependency=afterany:{ids[TRAIN]}")
        argv.append(str(path))
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except FileNotFoundError:
            raise SubmitError("submit", f"{sbatch!r} not found: --submit needs Slurm's sbatch on PATH (a login "
                              f"node){_submitted(ids)}") from None
        except subprocess.TimeoutExpired:
            raise SubmitError("submit", f"sbatch {path} did not answer within 120 s{_submitted(ids)}") from None
        job_id = proc.stdout.strip().split(";")[0]
        if proc.returncode != 0 or not re.fullmatch(r"\d+", job_id):
            raise SubmitError("submit", f"sbatch {path} failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}{_submitted(ids)}")
        ids[stage] = job_id
        record_submitted(layout, stage, job_id)
        after = f" (starts after job {ids[TRAIN]} ends)" if stage != TRAIN and TRAIN in ids else ""
        print(f"submitted {stage}: job {job_id}{after}; logs in {layout.root / log_dir(layout)}", flush=True)
    return ids


def submitted_arrays(layout: Layout) -> dict[str, str]:
    """{stage: Slurm job id} of the arrays `--submit` sent for the study (empty if none, or unreadable)."""
    try:
        known = json.loads(layout.submitted_path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): str(v) for k, v in known.items()} if isinstance(known, dict) else {}


def record_submitted(layout: Layout, stage: str, job_id: str) -> None:
    """Add {stage: job id} to the study's record of submitted arrays (`Layout.submitted_path`)."""
    checkpoints.atomic_write_json(layout.submitted_path, {**submitted_arrays(layout), stage: job_id})


def array_tasks(job_id: str, sacct: str = "sacct") -> dict[str, int] | None:
    """{state: number of array tasks} of Slurm job `job_id` from `sacct` (pending ranges such as
    123_[4-9%2] counted task by task), or None where sacct is not there or does not answer."""
    if shutil.which(sacct) is None or not re.fullmatch(r"\d+", job_id):
        return None
    try:
        proc = subprocess.run([sacct, "-n", "-P", "-X", "-j", job_id, "--format=JobID,State"], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    counts: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        task, _, state = line.partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"
        counts[state] = counts.get(state, 0) + _task_count(task)
    return counts


def _task_count(task: str) -> int:
    """Array tasks a sacct JobID names: 123_4 -> 1, 123_[4-9,12%2] -> 7, 123 -> 1."""
    match = re.search(r"_\[([^\]%]*)", task)
    if not match:
        return 1
    total = 0
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        total += int(high) - int(low) + 1 if high else 1
    return total


def _submitted(ids: dict[str, str]) -> str:
    if not ids:
        return ""
    return "; already submitted: " + ", ".join(f"{s} (job {i})" for s, i in ids.items())


# --------------------------------------------------------------------------- what the cluster allows
def _ask(argv: list[str]) -> str | None:
    """stdout of a Slurm query, or None where the command is not there or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def max_array_size() -> int | None:
    """The cluster's MaxArraySize (array indices run 0 .. MaxArraySize - 1), from `scontrol show config`."""
    out = _ask(["scontrol", "show", "config"])
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out or "", re.MULTILINE)
    return int(match.group(1)) if match else None


def partition_resources(partition: str | None) -> tuple[int, int] | None:
    """(most CPUs, most GPUs) of one node of `partition` (the default one when None), from `sinfo`."""
    argv = ["sinfo", "-h", "-o", "%c|%G"] + (["-p", partition] if partition else [])
    out = _ask(argv)
    if not out or not out.strip():
        return None
    cpus, gpus = 0, 0
    for line in out.splitlines():
        c, _, gres = line.partition("|")
        cpus = max(cpus, int(re.sub(r"\D", "", c) or 0))
        for count in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres):
            gpus = max(gpus, int(count))
    return cpus, gpus


def check_cluster_fits(spec: ExperimentSpec, stages: list[str], options: SlurmOptions) -> None:
    """Refuse arrays the cluster would refuse or could never run, where Slurm can be asked: more
    tasks than MaxArraySize, more CPUs or GPUs per task than a node of the partition has."""
    limit = max_array_size()
    for stage in stages:
        tasks = -(-len(stage_jobs(spec, stage)) // options.jobs_per_task)
        if limit is not None and tasks > limit:
            raise SpecError("jobs_per_task", f"stage {stage} needs {tasks} array tasks but the cluster's MaxArraySize "
                            f"is {limit}: pack jobs with --jobs-per-task {-(-tasks * options.jobs_per_task // limit)}"
                            " or more")
    if options.cpus_per_task is None and not options.gpus:
        return
    resources = partition_resources(options.partition)
    if resources is None:
        return
    cpus, gpus = resources
    where = f"partition {options.partition}" if options.partition else "the default partition"
    if options.cpus_per_task is not None and cpus and options.cpus_per_task > cpus:
        raise SpecError("cpus_per_task", f"{options.cpus_per_task} CPUs per task, but a node of {where} has at most "
                                         f"{cpus}")
    if options.gpus and options.gpus > gpus:
        raise SpecError("gpus", f"{options.gpus} GPUs per task, but a node of {where} has at most {gpus}")
