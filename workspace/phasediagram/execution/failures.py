"""One rule for a job that raises, used by every executor: bad input stops the run, anything else
fails that job alone (the others run, and the failure is reported with its traceback).

Bad input is a `SpecError` or a `CorruptFile` that could not be repaired: rerunning would fail
the same way, so it leaves through the command line's one error path (exit status 2).
"""

from __future__ import annotations

import traceback
from typing import Callable, TypeVar

from phasediagram.errors import CorruptFile, PhaseDiagramError, SpecError

T = TypeVar("T")
FATAL = (SpecError, CorruptFile)


class JobFailure(PhaseDiagramError, RuntimeError):
    """A job that raised: `job_id`, the exception (`cause`) and its formatted traceback (`trace`)."""

    def __init__(self, job_id: str, cause: BaseException, trace: str = ""):
        self.job_id, self.cause, self.trace = job_id, cause, trace
        super().__init__(f"{job_id}: {type(cause).__name__}: {cause}")

    def __reduce__(self):
        """Pickled (a pool worker's result) with the cause as text: the cause itself may not pickle."""
        return _rebuilt, (self.job_id, str(self), self.trace)


def _rebuilt(job_id: str, message: str, trace: str) -> JobFailure:
    failure = JobFailure.__new__(JobFailure)
    RuntimeError.__init__(failure, message)
    failure.job_id, failure.cause, failure.trace = job_id, RuntimeError(message.partition(": ")[2]), trace
    return failure


def attempt(job_id: str, run: Callable[[], T], fatal: tuple[type[BaseException], ...] = FATAL) -> T | JobFailure:
    """`run()`'s value, or the `JobFailure` it raised; an exception of a `fatal` type propagates."""
    try:
        return run()
    except fatal:
        raise
    except Exception as exc:
        return JobFailure(job_id, exc, traceback.format_exc())
