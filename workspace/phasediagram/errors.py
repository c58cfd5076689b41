"""Every error the toolkit raises on purpose, under one base class.

`PhaseDiagramError` is the base; a caller that wants to tell a bad input or a damaged file from a
bug catches it. `SpecError` (a bad spec, option or argument) and `SubmitError` (the cluster
refused a submission) are `ValueError`s and end the command line with exit status 2;
`CorruptFile` names a checkpoint or result file that fails validation; `MissingCheckpoint` and
`JobsFailed` report jobs that could not run or did not finish. A command ended by Ctrl-C prints
`INTERRUPTED` (exit status 130).
"""

from __future__ import annotations

from pathlib import Path

MAX_MESSAGE = 2000  # characters of a SpecError's message kept (a value in it may be huge)
INTERRUPTED = "interrupted: rerun the same command to resume"  # every job resumes where it stopped


class PhaseDiagramError(Exception):
    """Base class of the toolkit's own errors."""


class SpecError(PhaseDiagramError, ValueError):
    """An invalid spec or option: the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}... ({len(message)} characters in all)"
        super().__init__(f"{field_name}: {message}")


class SubmitError(SpecError):
    """Submission to the cluster failed (no Slurm here, sbatch refused a script, ...)."""


class CorruptFile(PhaseDiagramError):
    """A checkpoint or result file that fails validation; `path` says which."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class MissingCheckpoint(PhaseDiagramError, RuntimeError):
    """A metric job found no trained checkpoint for a seed: the train stage must run first."""


class JobsFailed(PhaseDiagramError, RuntimeError):
    """Some jobs of a task failed (the others ran); their errors are in the message and the log."""
