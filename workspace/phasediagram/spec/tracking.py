"""What the `track:` field of a spec asks for: quantities of the training loss measured during training.

`track: true` takes the defaults below; a mapping sets some of them; null or false (the default)
tracks nothing. The quantities and how they are computed are `training.tracking`'s; this module
only says which, where (a fixed subset of the training set) and when:

- at step 0 (the initial model), at `log_points` steps log-spaced over 1..T (T = the run's total
  steps, rounded to integers, duplicates merged), at the end of every epoch (`every_epoch`) and
  every `every_steps` steps (when given); a step k means "after k optimizer steps".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from phasediagram.errors import SpecError
from phasediagram.options import flag, integer, out_of_range, real, subset, validate

GROUP = "track"
QUANTITIES = ("loss", "accuracy", "lambda_max", "trace", "grad_norm", "noise_scale", "weight_norm", "distance")
DEFAULT_QUANTITIES = ("loss", "accuracy", "lambda_max", "weight_norm", "distance")


@dataclass(frozen=True)
class TrackOptions:
    quantities: tuple[str, ...] = subset(DEFAULT_QUANTITIES, QUANTITIES)
    log_points: int = integer(20, low=0)  # steps log-spaced over 1..T (0: none)
    every_epoch: bool = flag(True)  # the end of every epoch
    every_steps: int | None = integer(None, low=1, optional=True)  # every this many steps (null: none)
    subset: int | None = integer(128, low=1, optional=True)  # examples of the training set (null: all)
    lanczos_iters: int = integer(20, low=1)  # most Lanczos steps (Hessian-vector products) for lambda_max
    tol: float = real(1e-3, low=0, high=1, open_low=True)  # lambda_max's tolerance (gap rule), relative
    trace_probes: int = integer(10, low=1)  # Hutchinson probes for `trace`
    noise_batch: int = integer(8, low=1)  # the small batch of the gradient-noise scale's two sizes

    def __post_init__(self):
        if isinstance(self.quantities, list):
            object.__setattr__(self, "quantities", tuple(self.quantities))
        validate(self, GROUP)
        if self.subset is not None and 2 * self.noise_batch > self.subset:
            raise out_of_range(f"{GROUP}.noise_batch", self.noise_batch,
                               f"an integer <= subset / 2 = {self.subset // 2} (two batch sizes of the subset)")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def track_options(value: Any) -> TrackOptions | None:
    """The spec's `track` field: None (null, false), the defaults (true), or a mapping of some fields."""
    if value is None or value is False:
        return None
    if value is True:
        return TrackOptions()
    if isinstance(value, TrackOptions):
        return value
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SpecError(GROUP, f"expected true, false or a mapping of tracking options, got {value!r}")
    allowed = [f.name for f in dataclasses.fields(TrackOptions)]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise SpecError(GROUP, f"unknown option(s) {unknown}; allowed: {', '.join(allowed)}")
    return TrackOptions(**value)
