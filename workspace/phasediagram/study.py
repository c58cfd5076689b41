"""A study: one spec, one folder, and its lifecycle (record, train, measure, table, phases, figures).

    study = Study(spec, root=".")          # checks the spec against the registries
    study.run()                            # records spec.json, trains, then runs every metric
    df = study.table()                     # collects every result file into results.csv
    fig = study.figure(df)                 # a matplotlib Figure; saving is the caller's choice
    study.status()                         # per stage: jobs done and missing

The study's files live under `<root>/checkpoint/<spec.name>/` (`storage.layout.Layout`). A second
`Study` with the same name may add metrics or change their options, never the training settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from phasediagram.analysis import correlations, phases, plots, table
from phasediagram.errors import SpecError
from phasediagram.execution.executors import Executor, default_executor
from phasediagram.execution.jobs import TRAIN, RunReport, is_done, stage_jobs
from phasediagram.resolve import check, load_spec
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.checkpoints import atomic_write_bytes
from phasediagram.storage.layout import Layout


def record_spec(spec: ExperimentSpec, layout: Layout) -> ExperimentSpec:
    """Write spec.json once; later calls may add metrics and metric options but not change training.

    Returns the spec on disk afterwards: the union of the recorded metrics and `spec`'s, with
    `spec`'s metric options overriding the recorded ones.
    """
    if layout.spec_path.exists():
        try:
            old = load_spec(layout.spec_path)
        except SpecError as exc:
            raise SpecError("spec.json", f"{layout.spec_path} is unreadable ({exc}); move it aside") from None
        if old.training_identity() != spec.training_identity():
            diff = sorted(k for k, v in spec.training_identity().items() if old.training_identity().get(k) != v)
            raise SpecError("name", f"experiment {spec.name!r} already exists in {layout.exp_dir} with different "
                            f"training settings ({', '.join(diff)}); choose another --name")
        merged = old.to_dict()
        merged["metrics"] = list(dict.fromkeys([*old.metrics, *spec.metrics]))
        merged["metric_options"] = {**old.metric_options, **spec.metric_options}
        spec = check(ExperimentSpec.from_dict(merged))
    atomic_write_bytes(layout.spec_path, (spec.to_json() + "\n").encode())
    return spec


class Study:
    """The study of `spec` (an `ExperimentSpec`, a mapping of its fields, or a .json/.yaml file) under `root`."""

    def __init__(self, spec: ExperimentSpec | Mapping[str, Any] | str | Path, root: str | Path = "."):
        self.spec = load_spec(spec)
        self.layout = Layout(Path(root), self.spec.name)
        self._recorded = False  # whether this study has written its spec.json

    def __repr__(self) -> str:
        return f"Study({self.spec.name!r}, root={str(self.layout.root)!r})"

    @property
    def stages(self) -> list[str]:
        """Training, then the spec's metrics in order."""
        return [TRAIN, *self.spec.metrics]

    def record(self) -> ExperimentSpec:
        """Write (or extend) spec.json; the study then uses the spec on disk (`record_spec`)."""
        self.layout.check_writable_tree()
        self.spec = record_spec(self.spec, self.layout)
        self._recorded = True
        return self.spec

    def run(self, stages: list[str] | None = None, executor: Executor | None = None) -> dict[str, RunReport]:
        """Run `stages` (default: all) with `executor` (default: a local pool on a multi-core CPU).

        Jobs whose valid result is on disk are skipped, so a rerun continues where one stopped. The
        spec is recorded first unless this study has recorded it already.
        """
        if not self._recorded:
            self.record()
        stages = list(dict.fromkeys(stages or self.stages))
        for stage in stages:
            stage_jobs(self.spec, stage)  # an unknown stage fails here, before any job runs
        return (executor or default_executor()).run(self.spec, self.layout, stages)

    def train(self, executor: Executor | None = None) -> RunReport:
        """Train every (cell, seed) of the grid."""
        return self.run([TRAIN], executor)[TRAIN]

    def measure(self, metrics: list[str] | None = None, executor: Executor | None = None) -> dict[str, RunReport]:
        """Run the metric jobs of `metrics` (default: the spec's) on the trained checkpoints."""
        return self.run(list(metrics or self.spec.metrics), executor)

    def status(self) -> pd.DataFrame:
        """One row per stage: how many jobs it has, how many are done (a valid, current result on disk)."""
        rows = []
        for stage in self.stages:
            jobs = stage_jobs(self.spec, stage)
            done = sum(is_done(self.spec, self.layout, job, log=lambda *_: None) for job in jobs)
            rows.append({"stage": stage, "jobs": len(jobs), "done": done, "missing": len(jobs) - done})
        return pd.DataFrame(rows)

    def table(self, write: bool = True) -> pd.DataFrame:
        """Every result file's rows plus each cell's phase rows; written to results.csv when `write`."""
        df = phases.with_phases(table.collect(self.layout, self.spec.name, log=lambda *_: None))
        if write:
            table.write(df, self.layout.table_path)
        return df

    def _table(self, df: pd.DataFrame | None) -> pd.DataFrame:
        return self.table(write=False) if df is None else df

    def phases(self, df: pd.DataFrame | None = None, rule: phases.PhaseRule | None = None) -> pd.DataFrame:
        """The phase of every cell (`analysis.phases.classify`)."""
        df = self._table(df)
        return phases.classify(df[df["source"] != phases.PHASE_SOURCE], rule)

    def correlations(self, df: pd.DataFrame | None = None) -> pd.DataFrame:
        """Rank correlations of every metric with test accuracy and the generalisation gap."""
        df = self._table(df)
        return correlations.correlations(df, phases=self.phases(df))

    def figure(self, df: pd.DataFrame | None = None, **options) -> plots.PhaseFigure:
        """The multi-panel phase-diagram figure (`analysis.plots.phase_figure`; `options` go to it)."""
        return plots.phase_figure(self._table(df), self.spec.load_axis, self.spec.temperature_axis, **options)

    def phase_map(self, df: pd.DataFrame | None = None, rule: phases.PhaseRule | None = None):
        """The phase map alone, a matplotlib Figure."""
        return plots.phase_map(self._table(df), self.spec.load_axis, self.spec.temperature_axis, rule)

    def density_figure(self, df: pd.DataFrame | None = None):
        """The Hessian spectral densities per cell, or None when the table holds none."""
        df = self._table(df)
        if not ((df["source"] == "hessian") & (df["metric"] == "density")).any():
            return None
        from phasediagram.metrics.hessian import density_figure

        return density_figure(df, self.spec.load_axis, self.spec.temperature_axis)

    def save_figures(self, df: pd.DataFrame | None = None, log: Callable[[str], None] = print,
                     side: Callable[[Callable, Any], Callable[[], list[Path]]] | None = None) -> list[Path]:
        """Write the study's figures and tables into its folder; return the paths.

        phase_plot.png|pdf, phases.csv, phase_map.png|pdf (when a cell has a phase), the
        correlations (csv, md, png, pdf) and hessian_density.png (when the Hessian ran). `side(fn,
        df)` may run the correlations and densities elsewhere (e.g. `runtime.in_forked_process`)
        and return a callable giving their paths; by default they are drawn here. `log` gets one
        line naming the figure, one per note, and one naming the rest.
        """
        df = self._table(df)
        pending = side(self._side_outputs, df) if side else None
        figures, written = [], []
        try:
            fig = self.figure(df)
            figures = plots.save_figure(fig, self.layout.figure_path("phase_plot", ".png"))
            log(f"figure: {', '.join(os.path.relpath(p) for p in figures)}")
            for note in fig.notes:
                log(f"note: {note}")
            per_cell = self.layout.figure_path("phases", ".csv")
            atomic_write_bytes(per_cell, fig.phases.to_csv(index=False).encode())
            written.append(per_cell)
            if fig.phases["phase"].astype(bool).any():
                written += plots.save_figure(self.phase_map(df), self.layout.figure_path("phase_map", ".png"))
        finally:
            written += pending() if pending else self._side_outputs(df)
        log(f"phases and correlations: {', '.join(os.path.relpath(p) for p in written)}")
        return figures + written

    def _side_outputs(self, df: pd.DataFrame) -> list[Path]:
        written = correlations.write(self.correlations(df), self.layout.figure_path("correlations", ".csv")
                                     .with_suffix(""))
        density = self.density_figure(df)
        if density is not None:
            written += plots.save_figure(density, self.layout.figure_path("hessian_density", ".png"), ("png",), 120)
        return written
