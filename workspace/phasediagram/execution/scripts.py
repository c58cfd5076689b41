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
_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$")
_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)


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
        if self.time is not None and not _TIME.match(self.time):
            raise SpecError("time", f"{self.time!r} is not a Slurm time (minutes, HH:MM:SS, D-HH[:MM[:SS]])")
        if self.mem is not None and not _MEM.match(self.mem):
            raise SpecError("mem", f"{self.mem!r} is not a Slurm memory size (e.g. 8G, 500M, 16000)")
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


def time_minutes(text: str) -> int:
    """A Slurm time ("90", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") in whole minutes, rounded up.

    0 means no limit, as for Slurm.
    """
    if not _TIME.match(text) or text in ("UNLIMITED", "INFINITE"):
        raise SpecError("time", f"{text!r} is not a Slurm time (minutes, HH:MM:SS, D-HH[:MM[:SS]])")
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        h, m, s = parts
        seconds = ((int(days) * 24 + h) * 60 + m) * 60 + s
    elif len(parts) == 1:  # minutes
        seconds = parts[0] * 60
    elif len(parts) == 2:  # MM:SS
        seconds = parts[0] * 60 + parts[1]
    else:  # HH:MM:SS
        seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return math.ceil(seconds / 60)


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
