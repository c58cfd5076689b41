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

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from phasediagram.analysis import correlations, dynamics, phases, plots, slice_plots, table, trajectories
from phasediagram.errors import CorruptFile, SpecError
from phasediagram.execution.executors import Executor, default_executor
from phasediagram.execution.jobs import TRAIN, RunReport, is_done, stage_jobs
from phasediagram.execution.runtime import process_alive
from phasediagram.execution.scripts import SlurmOptions
from phasediagram.resolve import check, load_spec
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage import locks
from phasediagram.storage.checkpoints import HOST, TEMP_SUFFIX, atomic_write_bytes, current_umask, temp_writer
from phasediagram.storage.layout import Layout


def record_spec(spec: ExperimentSpec, layout: Layout) -> ExperimentSpec:
    """Write spec.json once; later calls may add metrics and metric options but not change training.

    Reading, merging and writing happen under the study's lock (`storage.locks.exclusive`), so of
    two processes recording different training settings at the same moment the second is refused,
    and two recording the same settings both go on (the union of their metrics is kept).
    Returns the spec on disk afterwards (`merged_spec`).
    """
    with locks.exclusive(layout.spec_lock_path):
        spec = merged_spec(spec, layout)
        atomic_write_bytes(layout.spec_path, (spec.to_json() + "\n").encode())
    return spec


def merged_spec(spec: ExperimentSpec, layout: Layout) -> ExperimentSpec:
    """`spec` joined with the study's recorded spec.json, if there is one (nothing is written): the
    union of the recorded metrics and `spec`'s, `spec`'s metric options overriding the recorded ones.
    Refuses a spec whose training settings differ from the recorded ones."""
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
    return spec


STALE_AFTER_S = 3600  # a temporary file of another host untouched this long belongs to a killed write


def remove_stale_temporaries(layout: Layout, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files `atomic_write_bytes` leaves when killed mid-write under the study's
    folders: those whose writing process (named in the file name) is gone from this host, and those
    of other hosts older than `older_than_s`; return their paths."""
    removed = []
    now = time.time()
    for folder in (layout.exp_dir, layout.scripts_dir, layout.data_dir):
        for path in folder.rglob(f".*{TEMP_SUFFIX}") if folder.is_dir() else ():
            writer = temp_writer(path)
            try:
                if writer is None or not path.is_file():
                    continue
                host, pid = writer
                if (host == HOST and not process_alive(pid)) or (host != HOST and
                                                                   now - path.stat().st_mtime > older_than_s):
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
    return removed


class Study:
    """The study of `spec` (an `ExperimentSpec`, a mapping of its fields, or a .json/.yaml file) under `root`."""

    def __init__(self, spec: ExperimentSpec | Mapping[str, Any] | str | Path, root: str | Path = "."):
        self.spec = load_spec(spec)
        self.layout = Layout(Path(root), self.spec.name)
        self._recorded = False  # whether this study has written its spec.json

    def __repr__(self) -> str:
        return f"Study({self.spec.name!r}, root={str(self.layout.root)!r})"

    @classmethod
    def open(cls, where: str | Path, name: str | None = None) -> "Study":
        """The recorded study at `where`: its folder `<root>/checkpoint/<name>` (the one holding
        spec.json), or a root with `name`, or a root holding exactly one study. Its spec is the one
        on disk, so the study reads, draws and resumes as recorded."""
        where = Path(where)
        if (where / "spec.json").is_file() and name is None:
            layout = Layout.from_experiment_dir(where)
        else:
            found = sorted(p.parent.name for p in (where / "checkpoint").glob("*/spec.json"))
            if name is None and len(found) != 1:
                raise SpecError("study", f"{where} holds {len(found)} studies ({', '.join(found) or 'no spec.json'})"
                                         "; give the study's folder or its name")
            layout = Layout(where, name or found[0])
        if not layout.spec_path.is_file():
            raise SpecError("study", f"no study {layout.name!r} under {layout.root} (no {layout.spec_path})")
        study = cls(layout.spec_path, layout.root)
        study._recorded = True
        return study

    @property
    def stages(self) -> list[str]:
        """Training, then the spec's metrics in order."""
        return [TRAIN, *self.spec.metrics]

    def record(self) -> ExperimentSpec:
        """Write (or extend) spec.json; the study then uses the spec on disk (`record_spec`). Stale
        temporary files of interrupted writes are removed (`remove_stale_temporaries`)."""
        self.layout.check_writable_tree()
        self.spec = record_spec(self.spec, self.layout)
        remove_stale_temporaries(self.layout)
        self._recorded = True
        return self.spec

    def run(self, stages: list[str] | None = None, executor: Executor | None = None) -> dict[str, RunReport]:
        """Run `stages` (default: all) with `executor` (default: a local pool on a multi-core CPU).

        Jobs whose valid result is on disk are skipped, so a rerun continues where one stopped. The
        spec is recorded first unless this study has recorded it already.
        """
        stages = self.checked_stages(stages)
        if not self._recorded:
            self.record()
        return (executor or default_executor()).run(self.spec, self.layout, stages)

    def write_scripts(self, stages: list[str] | None = None, options: SlurmOptions | None = None,
                      device: str = "cpu", slurm: bool = False) -> list[Path]:
        """Record the spec, then write each stage's job script `<stage>.sh` (one line per job, run by
        array index) and, with `slurm`, its `<stage>.sbatch` array (`execution.scripts`) under
        `<root>/bash_scripts/<name>/`; return their paths. With `slurm` the cluster is checked first
        (`check_cluster`), so nothing is written for arrays it cannot take. `options`: the tasks'
        Slurm options (`SlurmOptions`, checked when made)."""
        from phasediagram.execution.scripts import bash_script, slurm_script

        options = options or SlurmOptions()
        stages = self.checked_stages(stages)
        if slurm:
            self.check_cluster(stages, options)
        if not self._recorded:
            self.record()
        written = []
        for stage in stages:
            n = len(stage_jobs(self.spec, stage))
            path = self.layout.script_path(stage, ".sh")
            atomic_write_bytes(path, bash_script(self.layout, stage, n, options.python, device).encode())
            path.chmod(0o777 & ~current_umask())
            written.append(path)
            if slurm:
                (self.layout.scripts_dir / "slurm_logs").mkdir(parents=True, exist_ok=True)
                path = self.layout.script_path(stage, ".sbatch")
                atomic_write_bytes(path, slurm_script(self.layout, stage, n, options).encode())
                written.append(path)
        return written

    def check_cluster(self, stages: list[str] | None = None, options: SlurmOptions | None = None) -> None:
        """Refuse arrays larger than the cluster's MaxArraySize and CPUs or GPUs beyond a node of the
        partition (`execution.cluster.check_cluster_fits`); where Slurm does not answer, nothing is refused."""
        from phasediagram.execution.cluster import check_cluster_fits

        check_cluster_fits(merged_spec(self.spec, self.layout), self.checked_stages(stages),
                           options or SlurmOptions())

    def submit(self, stages: list[str] | None = None) -> dict[str, str]:
        """sbatch the Slurm arrays `write_scripts(..., slurm=True)` wrote for `stages` (default: all):
        training first, each metric array waiting for it; return {stage: Slurm job id}.
        `status()` then follows them through sacct."""
        from phasediagram.execution.cluster import submit_chain

        return submit_chain(self.layout, self.checked_stages(stages))

    def checked_stages(self, stages: list[str] | None = None) -> list[str]:
        """`stages` without repeats, each a known stage (else `SpecError`, before any file is written);
        default: training and every metric of the spec and of the recorded spec.json."""
        stages = list(dict.fromkeys(stages or [TRAIN, *merged_spec(self.spec, self.layout).metrics]))
        for stage in stages:
            stage_jobs(self.spec, stage)
        return stages

    def train(self, executor: Executor | None = None) -> RunReport:
        """Train every (cell, seed) of the grid."""
        return self.run([TRAIN], executor)[TRAIN]

    def measure(self, metrics: list[str] | None = None, executor: Executor | None = None) -> dict[str, RunReport]:
        """Run the metric jobs of `metrics` (default: the spec's) on the trained checkpoints."""
        return self.run(list(metrics or self.spec.metrics), executor)

    def status(self) -> pd.DataFrame:
        """One row per stage, from the files on disk and, for arrays sent with `--submit`, Slurm's
        `sacct`: its jobs; done (a valid, current result); failed (a failure record of the job's last
        attempt, `failures()`); missing (neither); and the array's running and pending tasks (empty
        where there is no submitted array or no sacct)."""
        from phasediagram.execution.cluster import array_tasks, submitted_arrays

        submitted = submitted_arrays(self.layout)
        rows = []
        for stage in self.stages:
            jobs = stage_jobs(self.spec, stage)
            done = [is_done(self.spec, self.layout, job, log=lambda *_: None) for job in jobs]
            failed = sum(not d and self.layout.failure_path(stage, job.cell).exists() for d, job in zip(done, jobs))
            tasks = None
            if stage in submitted:
                tasks = array_tasks(submitted[stage])
            rows.append({"stage": stage, "jobs": len(jobs), "done": sum(done), "failed": failed,
                         "missing": len(jobs) - sum(done) - failed,
                         "running": None if tasks is None else tasks.get("RUNNING", 0),
                         "pending": None if tasks is None else tasks.get("PENDING", 0)})
        return pd.DataFrame(rows).astype({"running": "Int64", "pending": "Int64"})

    def failures(self) -> list[dict]:
        """The failure record of every job whose last attempt failed and that is not done since:
        {"job", "error", "trace" (its last lines), "host", "pid", "time"}."""
        out = []
        for stage in self.stages:
            for job in stage_jobs(self.spec, stage):
                path = self.layout.failure_path(stage, job.cell)
                if path.exists() and not is_done(self.spec, self.layout, job, log=lambda *_: None):
                    try:
                        out.append(json.loads(path.read_text()))
                    except ValueError:
                        out.append({"job": job.id, "error": f"unreadable failure record {path}", "trace": []})
        return out

    def verify(self, log: Callable[[str], None] = print) -> list[str]:
        """Check every file the study keeps: checkpoints (final, best, last, prev), curve states and
        result files; move each damaged one aside and return one line per file. What they held is
        redone by the next run (a run retrained to the same weights, a curve trained from its start,
        a job's result recomputed). Stale temporary files of interrupted writes are removed."""
        from phasediagram.metrics.curve import STATE_FILE, load_state
        from phasediagram.storage import checkpoints, results

        problems = []
        exp = self.layout.exp_dir
        checks = [(exp.glob("runs/*/seed*/*.pt"), checkpoints.load), (exp.glob(f"state/**/{STATE_FILE}"), load_state),
                  (exp.glob("results/*/*.json"), results.read)]
        for paths, load in checks:
            for path in sorted(paths):
                try:
                    load(path)
                except CorruptFile as exc:
                    problems.append(f"{exc}; moved aside to {checkpoints.quarantine(path).name}")
        for path in remove_stale_temporaries(self.layout):
            log(f"removed the temporary file of an interrupted write: {path}")
        return problems
    def table(self, write: bool = True) -> pd.DataFrame:
        """Every result file's rows plus each cell's phase rows and, when training was tracked, its
        trajectory outcome rows (`analysis.dynamics.with_outcomes`); written to results.csv when `write`.
        Result files of other training settings than this study's (`training_hash`) are left out."""
        df = phases.with_phases(table.collect(self.layout, self.spec.name, log=lambda *_: None,
                                              training_hash=self.spec.training_hash()))
        df = dynamics.with_outcomes(df, self.trajectories())
        if write:
            table.write(df, self.layout.table_path)
        return df

    def trajectories(self) -> pd.DataFrame:
        """What was tracked during training (spec `track`): one row per (cell, seed, step, quantity)
        (`analysis.trajectories.collect`); empty when nothing was."""
        return trajectories.collect(self.spec, self.layout)

    def dynamics(self, rule: dynamics.TrajectoryRule | None = None) -> pd.DataFrame:
        """Each cell's trajectory outcome and the fraction of its seeds where each rule holds
        (`analysis.dynamics.classify`)."""
        return dynamics.classify(self.trajectories(), rule)

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

    def slice_figures(self, df: pd.DataFrame | None = None) -> dict:
        """{"loss_slice": 1D slices per cell, "loss_slice_plane": the 2D planes} for the slices the
        table holds (`analysis.slice_plots`); empty when `loss_slice` did not run."""
        df = self._table(df)
        rows = df[df["source"] == "loss_slice"]
        out = {}
        if rows["metric"].isin([f"slice_{k}" for k in slice_plots.LINES]).any():
            out["loss_slice"] = slice_plots.slice_figure(df, load=self.spec.load_axis,
                                                         temperature=self.spec.temperature_axis)
        if rows["metric"].str.startswith("slice_random2d(").any():
            out["loss_slice_plane"] = slice_plots.plane_figure(df, load=self.spec.load_axis,
                                                               temperature=self.spec.temperature_axis)
        return out

    def save_figures(self, df: pd.DataFrame | None = None, log: Callable[[str], None] = print,
                     side: Callable[[Callable, Any], Callable[[], list[Path]]] | None = None) -> list[Path]:
        """Write the study's figures and tables into its folder; return the paths.

        phase_plot.png|pdf, phases.csv, phase_map.png|pdf (when a cell has a phase), the
        correlations (csv, md, png, pdf), hessian_density.png (when the Hessian ran) and
        loss_slice.png, loss_slice_plane.png (when the loss slices ran). `side(fn,
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
        for name, fig in self.slice_figures(df).items():
            written += plots.save_figure(fig, self.layout.figure_path(name, ".png"), ("png",), 120)
        return written
