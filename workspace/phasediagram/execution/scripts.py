"""Generated job scripts: a bash script (one line per job) and a Slurm job-array script per stage.

`bash_script` writes one `python -m phasediagram.execution.worker ...` line per job; it runs from the study's
root folder wherever it is started from. `slurm_script` writes a job array whose task i runs jobs
[i*K, (i+1)*K) of the stage (K = `SlurmOptions.jobs_per_task`):

    #SBATCH --job-name=<experiment>-<stage>
    #SBATCH --array=0-<tasks-1>[%<parallelism>]
    #SBATCH --chdir=<absolute root of the study>       (Slurm runs a copy of the script from its spool)
    #SBATCH --output=bash_scripts/<experiment>/slurm_logs/<stage>_%A_%a.out   (relative to --chdir)
    #SBATCH --error=bash_scripts/<experiment>/slurm_logs/<stage>_%A_%a.err
    #SBATCH --time / --cpus-per-task / --mem / --gpus / --partition / --account / --qos  (only when given)

Both pass the jobs' device to the worker (`--device`) unless it is the CPU: the device given, else,
for an array with `--gpus`, "cuda" (the GPUs Slurm gives the task).

Every value is quoted with `shlex.quote`, which both bash and sbatch's own #SBATCH parser read back
as one word, so a path or option holding spaces or shell metacharacters cannot inject a command.
Values holding control characters (a newline would end the #SBATCH comment and start a command)
are refused, and so is a root folder holding '%' (Slurm expands '%' patterns in log file paths).
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass

from phasediagram.errors import SpecError
from phasediagram.execution.runtime import parse_device
from phasediagram.storage.layout import Layout

WORKER = "phasediagram.execution.worker"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# sbatch's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds (`time_seconds`); --mem: a size in megabytes, or with a K, M, G or T suffix;
# --partition: a comma-separated list of partition names
_TIME = re.compile(r"^(?:(\d+)-(\d{1,2})(?::(\d{1,2}))?(?::(\d{1,2}))?|(\d+)(?::(\d{1,2}))?(?::(\d{1,2}))?)$", re.ASCII)
_MEM = re.compile(r"^0*[1-9]\d*[KMGT]?$", re.IGNORECASE | re.ASCII)
_PARTITION = re.compile(r"^[^\s,]+(,[^\s,]+)*$")
NO_LIMIT = ("UNLIMITED", "INFINITE")
SLURM_MAX_SECONDS = 2**31 - 1  # Slurm reads a time limit into a C int of seconds
TIME_FORMS = "minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes or " \
             "days-hours:minutes:seconds, hours < 24 after days, minutes and seconds < 60 after another field"


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of the array job; None leaves the line out (the cluster's default applies)."""

    jobs_per_task: int = 1
    parallelism: int | None = None  # the %P of --array=0-N%P
    time: str | None = None  # e.g. "02:00:00", "1-00:00:00", "90" (minutes)
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "8G"
    gpus: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    env_setup: str | None = None  # a line run before the worker, e.g. "source .venv/bin/activate"
    python: str = "python"
    device: str | None = None  # the tasks' torch device (cpu, cuda, cuda:N); None: cuda with gpus, else cpu

    def __post_init__(self):
        for name in ("jobs_per_task", "parallelism", "cpus_per_task", "gpus"):
            value = getattr(self, name)
            low = 0 if name == "gpus" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise SpecError(name, f"{value!r} must be an integer >= {low}")
        for name in ("time", "mem", "partition", "account", "qos", "env_setup", "python"):
            value = getattr(self, name)
            if value is not None:
                check_text(name, value)
        if self.time is not None and self.time not in NO_LIMIT:
            time_seconds(self.time)
        if self.mem is not None and not _MEM.match(self.mem):
            raise SpecError("mem", f"{self.mem!r} is not a Slurm memory size: a positive integer of megabytes, or "
                                   "with a K, M, G or T suffix (e.g. 8G, 500M, 16000)")
        if self.partition is not None and not _PARTITION.match(self.partition):
            raise SpecError("partition", f"{self.partition!r} is not a Slurm partition list: names without spaces, "
                                         "separated by commas (e.g. gpu or gpu,long)")
        if not self.python:
            raise SpecError("python", "must not be empty")
        if self.device is not None:
            device = parse_device(check_text("device", self.device))
            if device.type == "cuda" and not self.gpus:
                raise SpecError("device", f"{self.device!r} needs GPUs in each task: give --gpus N (the tasks see "
                                          "only the GPUs they are given)")
            if device.index is not None and device.index >= (self.gpus or 0):
                raise SpecError("device", f"{self.device!r}: each task is given {self.gpus} GPU(s), visible to it "
                                          f"as cuda:0 .. cuda:{self.gpus - 1}")

    @property
    def run_device(self) -> str:
        """The device the tasks run their jobs on: `device`, else cuda where they have GPUs, else cpu."""
        return self.device or ("cuda" if self.gpus else "cpu")


def check_text(field: str, value: str) -> str:
    """Refuse values that no quoting keeps on one line of a script (newlines, other control chars)."""
    if not isinstance(value, str):
        raise SpecError(field, f"expected text, got {value!r}")
    if _CONTROL.search(value):
        raise SpecError(field, f"{value!r} holds a control character (newline, tab, ...); not allowed in a script")
    return value


def time_seconds(text: str) -> int:
    """A Slurm time in seconds: "M", "M:S", "H:M:S", "D-H", "D-H:M" or "D-H:M:S" (sbatch's --time forms).

    The first field is any count; a later one is bounded by the next unit: hours after days below 24,
    minutes and seconds after another field below 60. Slurm's own reader adds the fields without
    such checks (99:99:99 would be 100:40:39), so a field out of range is a typo refused here, as is
    a total past Slurm's 2^31 - 1 seconds. `SpecError("time", ...)` otherwise; 0 means no limit.
    """
    match = _TIME.match(text) if isinstance(text, str) else None
    if match is None:
        raise SpecError("time", f"{text!r} is not a Slurm time ({TIME_FORMS})")
    d, dh, dm, ds, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if d is not None:  # days-hours[:minutes[:seconds]]
        days, hours, minutes, seconds, bounded = d, dh, dm or 0, ds or 0, [(dh, 24), (dm, 60), (ds, 60)]
    elif third is not None:  # hours:minutes:seconds
        days, hours, minutes, seconds, bounded = 0, first, second, third, [(second, 60), (third, 60)]
    else:  # minutes[:seconds]
        days, hours, minutes, seconds, bounded = 0, 0, first, second or 0, [(second, 60)]
    if any(value is not None and value >= limit for value, limit in bounded):
        raise SpecError("time", f"{text!r} has a field out of range ({TIME_FORMS})")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total > SLURM_MAX_SECONDS:
        raise SpecError("time", f"{text!r} is longer than Slurm's largest time limit ({SLURM_MAX_SECONDS} seconds)")
    return total


def time_minutes(text: str) -> int:
    """A Slurm time (`time_seconds`) in whole minutes, rounded up, as Slurm does; 0 means no limit."""
    return math.ceil(time_seconds(text) / 60)


def worker_argv(layout: Layout, stage: str, index: int | str, jobs_per_task: int = 1, python: str = "python",
                device: str = "cpu") -> list[str]:
    """The worker's command line for array task `index`; `--device` only for a device other than the CPU."""
    argv = [python, "-m", WORKER, "--experiment-dir", f"checkpoint/{layout.name}", "--stage", stage,
            "--index", str(index)]
    if jobs_per_task != 1:
        argv += ["--jobs-per-task", str(jobs_per_task)]
    if parse_device(check_text("device", device)).type != "cpu":
        argv += ["--device", device]
    return argv


def _check_layout(layout: Layout, stage: str) -> None:
    check_text("name", layout.name)
    check_text("stage", stage)
    check_text("root", str(layout.root))


def bash_script(layout: Layout, stage: str, n_jobs: int, python: str = "python", device: str = "cpu") -> str:
    """One line per job, run from the study's root folder (two levels above this script), on `device`."""
    _check_layout(layout, stage)
    check_text("python", python)
    lines = [
        "#!/usr/bin/env bash",
        f"# {stage} jobs of experiment {layout.name}: {n_jobs} job(s), one per line; rerunning skips finished jobs.",
        "set -euo pipefail",
        'cd "$(dirname "$0")/../.."',
    ]
    lines += [shlex.join(worker_argv(layout, stage, i, python=python, device=device)) for i in range(n_jobs)]
    return "\n".join(lines) + "\n"


def n_tasks(n_jobs: int, jobs_per_task: int) -> int:
    return math.ceil(n_jobs / jobs_per_task)


def log_dir(layout: Layout) -> str:
    """The Slurm log folder, relative to the study's root (where the array tasks run)."""
    return f"bash_scripts/{layout.name}/slurm_logs"


def sbatch_flags(layout: Layout, stage: str, n_jobs: int, options: SlurmOptions = SlurmOptions()) -> list[str]:
    """The #SBATCH options of a stage's job array, unquoted (one list item per option)."""
    _check_layout(layout, stage)
    if n_jobs < 1:
        raise SpecError("jobs", f"stage {stage} has no jobs")
    if "%" in str(layout.root):
        raise SpecError("root", f"{layout.root} holds '%', which Slurm expands in log file paths; "
                        "move the study to a folder without '%'")
    last = n_tasks(n_jobs, options.jobs_per_task) - 1
    array = f"0-{last}" + (f"%{options.parallelism}" if options.parallelism else "")
    logs = log_dir(layout)
    flags = [
        f"--job-name={layout.name}-{stage}",
        f"--array={array}",
        f"--chdir={layout.root}",
        f"--output={logs}/{stage}_%A_%a.out",
        f"--error={logs}/{stage}_%A_%a.err",
    ]
    optional = [("time", options.time), ("cpus-per-task", options.cpus_per_task), ("mem", options.mem),
                ("gpus", options.gpus or None), ("partition", options.partition), ("account", options.account),
                ("qos", options.qos)]
    flags += [f"--{flag}={value}" for flag, value in optional if value is not None]
    return flags


def slurm_script(layout: Layout, stage: str, n_jobs: int, options: SlurmOptions = SlurmOptions()) -> str:
    """A job-array script: task i runs jobs [i*K, (i+1)*K) of the stage, K = jobs_per_task."""
    flags = sbatch_flags(layout, stage, n_jobs, options)
    lines = ["#!/usr/bin/env bash"] + [f"#SBATCH {shlex.quote(f)}" for f in flags]
    lines += [
        f"# {stage} jobs of experiment {layout.name}: {n_jobs} job(s), {options.jobs_per_task} per array task.",
        "# Submit with `sbatch` from anywhere; a task skips the jobs whose results exist, so resubmitting",
        "# the script (or one task: sbatch --array=I ...) redoes only what is missing.",
        "set -euo pipefail",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" PYTHONUNBUFFERED=1',
    ]
    if options.env_setup:  # activation scripts (conda's among them) often trip over `set -u`
        lines += ["set +u", options.env_setup, "set -u"]
    # two words are shell expansions, left unquoted on purpose; every other word is quoted
    expansions = {_TASK_ID: '"$SLURM_ARRAY_TASK_ID"', _THREADS: '"$OMP_NUM_THREADS"'}
    argv: list = worker_argv(layout, stage, 0, options.jobs_per_task, options.python) + ["--threads", _THREADS]
    argv[argv.index("--index") + 1] = _TASK_ID
    if options.run_device != "cpu":
        argv += ["--device", options.run_device]
    lines.append(" ".join(expansions[a] if a in expansions else shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


_TASK_ID, _THREADS = object(), object()  # placeholders (never equal to any text)
