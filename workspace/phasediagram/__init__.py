"""Load-temperature phase diagrams of neural-network loss landscapes (Yang et al., NeurIPS 2021).

    import phasediagram
    spec = phasediagram.ExperimentSpec(name="tiny", arch="mlp", widths=(4, 16), batch_sizes=(32, 128))
    study = phasediagram.Study(spec, root=".")
    study.run()                      # train, then every metric of the spec
    table = study.table()            # one row per (cell, seed or pair, metric quantity)
    figure = study.figure(table)     # a matplotlib Figure: one panel per metric over the grid

The names below are the public API; each is imported on first use, so `import phasediagram` is
cheap and importing one submodule loads only the layers under it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_HOMES = {
    "PhaseDiagramError": "phasediagram.errors",
    "SpecError": "phasediagram.errors",
    "CorruptFile": "phasediagram.errors",
    "ExperimentSpec": "phasediagram.spec.experiment",
    "Cell": "phasediagram.spec.experiment",
    "PRESET_SPECS": "phasediagram.spec.presets",
    "TrackOptions": "phasediagram.spec.tracking",
    "load_spec": "phasediagram.resolve",
    "check_spec": "phasediagram.resolve",
    "MODELS": "phasediagram.models.families",
    "DATASETS": "phasediagram.data.datasets",
    "METRICS": "phasediagram.metrics",
    "OPTIMIZERS": "phasediagram.methods",
    "REGULARIZERS": "phasediagram.methods",
    "PhaseRule": "phasediagram.analysis.phases",
    "classify": "phasediagram.analysis.phases",
    "load_table": "phasediagram.analysis.table",
    "load_model_diagnosis": "phasediagram.analysis.model_diagnosis",
    "fit_diagnoser": "phasediagram.analysis.diagnoser",
    "phase_figure": "phasediagram.analysis.plots",
    "phase_map": "phasediagram.analysis.plots",
    "save_figure": "phasediagram.analysis.plots",
    "TrajectoryRule": "phasediagram.analysis.dynamics",
    "trajectory_figure": "phasediagram.analysis.trajectory_plots",
    "trajectory_grid": "phasediagram.analysis.trajectory_plots",
    "Study": "phasediagram.study",
    "diagnose": "phasediagram.diagnosis",
    "top_eigenvectors": "phasediagram.metrics.hessian",
    "Executor": "phasediagram.execution.executors",
    "InProcess": "phasediagram.execution.executors",
    "LocalPool": "phasediagram.execution.executors",
    "Submitit": "phasediagram.execution.executors",
}
_ALIASES = {"check_spec": "check", "load_table": "read", "trajectory_figure": "cell_figure",
            "trajectory_grid": "grid_figure"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'phasediagram' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
