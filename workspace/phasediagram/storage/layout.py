"""Where every file of an experiment lives (one place, so no path is spelled twice).

`OUTPUTS` lists what a study's folders hold, each path under the root with what it is (README's
"Where outputs go" is rendered from it by `scripts/readme_tables.py`); a figure or table the study
draws is written only under a name `FIGURES` declares (`Layout.figure_path`).

Every path handed out is checked to stay inside its experiment folder (no '..', absolute
components or symlinks leading out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phasediagram.errors import SpecError
from phasediagram.spec.experiment import Cell

CHECKPOINT_KINDS = ("last", "prev", "final", "best")
DIRECTIONS_FILE = "directions.npz"  # the `loss_slice` metric's saved directions, in its state folder
EIGENVECTORS_FILE = "eigenvectors.npz"  # the `hessian` metric's saved Ritz vectors, in its state folder

# The figures and tables `Study.save_figures` writes into the study's folder: {stem: (formats, what)}.
FIGURES = {
    "phase_plot": ("png|pdf", "the phase diagram: one panel per quantity over the grid, phase boundaries drawn"),
    "phases": ("csv", "each cell's phase and the values it was decided from"),
    "phase_map": ("png|pdf", "the phase map alone (when a cell has a phase)"),
    "correlations": ("csv|md|png|pdf", "rank correlations of every metric with test accuracy and the "
                                       "generalisation gap"),
    "hessian_density": ("png", "Hessian spectral densities per cell (when `hessian` ran)"),
    "loss_slice": ("png", "1D loss slices per cell (when `loss_slice` ran)"),
    "loss_slice_plane": ("png", "2D loss planes per cell (when `loss_slice` ran)"),
}

# What a study's folders hold, each path under the root: (path, what).
OUTPUTS = (
    ("data/", "dataset caches (.npz), shared by the studies under one root"),
    ("checkpoint/<name>/spec.json", "the recorded spec (`.spec.lock` beside it serialises its recording)"),
    ("checkpoint/<name>/runs/<cell>/seed<s>/{final,best,last,prev}.pt",
     "one run's checkpoints: trained, lowest training loss, latest epoch and the one before"),
    ("checkpoint/<name>/runs/<cell>/seed<s>/trajectory.json",
     "one run's tracked quantities (spec `track`): rows step, epoch, quantity, value"),
    ("checkpoint/<name>/results/<stage>/<cell>.json", "one result file per job"),
    ("checkpoint/<name>/failures/<stage>/<cell>.json", "the last failed attempt of a job, until it succeeds"),
    ("checkpoint/<name>/state/<stage>/<cell>/seed<s>/",
     "a metric's own files: curve states, slice directions, Hessian eigenvectors"),
    ("checkpoint/<name>/results.csv", "the table: one row per cell, seed[, seed_b], split, metric[, coord]"),
    *((f"checkpoint/<name>/{stem}.{formats}", what) for stem, (formats, what) in FIGURES.items()),
    ("bash_scripts/<name>/<stage>.sh|sbatch", "the job scripts: one line per job, and the Slurm arrays"),
    ("bash_scripts/<name>/slurm_logs/", "the array tasks' logs (and submitit's folder)"),
    ("bash_scripts/<name>/submitted.json", "the Slurm job id of each array `--submit` sent"),
)


@dataclass(frozen=True)
class Layout:
    root: Path
    name: str

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).absolute())

    @classmethod
    def from_experiment_dir(cls, exp_dir: str | Path) -> "Layout":
        exp_dir = Path(exp_dir).absolute()
        if exp_dir.parent.name != "checkpoint":
            raise SpecError("experiment_dir", f"{exp_dir} is not of the form <root>/checkpoint/<name>")
        return cls(exp_dir.parent.parent, exp_dir.name)

    @property
    def exp_dir(self) -> Path:
        return self.root / "checkpoint" / self.name

    @property
    def scripts_dir(self) -> Path:
        return self.root / "bash_scripts" / self.name

    def inside(self, base: Path, relative: str | Path) -> Path:
        """`base / relative`, refusing anything that resolves outside `base`."""
        rel = Path(relative)
        if rel.is_absolute() or ".." in rel.parts:
            raise SpecError("path", f"{relative!s} must be a relative path inside {base} (no '..', not absolute)")
        target = base / rel
        resolved_base = base.resolve()
        resolved = target.resolve()
        if resolved != resolved_base and resolved_base not in resolved.parents:
            raise SpecError("path", f"{target} leads outside {base} (through a symlink)")
        return target

    def check_writable_tree(self) -> None:
        """Refuse a root that is not a folder, and an experiment or scripts folder that is a symlink
        leading outside the root."""
        if self.root.exists() and not self.root.is_dir():
            raise SpecError("root", f"{self.root} is a file, not a folder")
        for base, sub in ((self.root, Path("checkpoint") / self.name), (self.root, Path("bash_scripts") / self.name)):
            self.inside(base, sub)

    @property
    def spec_path(self) -> Path:
        return self.exp_dir / "spec.json"

    @property
    def spec_lock_path(self) -> Path:
        """The lock file that serialises the recording of spec.json (`storage.locks.exclusive`)."""
        return self.exp_dir / ".spec.lock"

    @property
    def data_dir(self) -> Path:
        """Dataset caches, shared by the experiments under one root."""
        return self.root / "data"

    def run_dir(self, cell: Cell, seed: int) -> Path:
        return self.exp_dir / "runs" / cell.id / f"seed{seed}"

    def checkpoint(self, cell: Cell, seed: int, kind: str = "final") -> Path:
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind must be one of {CHECKPOINT_KINDS}")
        return self.run_dir(cell, seed) / f"{kind}.pt"

    def trajectory_path(self, cell: Cell, seed: int) -> Path:
        """The rows (step, epoch, quantity, value) tracked during run (cell, seed) (`training.tracking`)."""
        return self.run_dir(cell, seed) / "trajectory.json"

    def result_path(self, stage: str, cell: Cell) -> Path:
        return self.exp_dir / "results" / stage / f"{cell.id}.json"

    def state_dir(self, stage: str, cell: Cell, seeds: tuple[int, ...]) -> Path:
        """The folder private to metric `stage` on `seeds` (one seed, or a pair) of `cell` (`MetricData.state_dir`)."""
        return self.exp_dir / "state" / stage / cell.id / "_".join(f"seed{s}" for s in seeds)

    def directions_path(self, cell: Cell, seed: int) -> Path:
        """The directions the `loss_slice` metric saved for one seed of `cell` (numpy .npz, no pickle)."""
        return self.state_dir("loss_slice", cell, (seed,)) / DIRECTIONS_FILE

    def eigenvectors_path(self, cell: Cell, seed: int) -> Path:
        """The top Hessian eigenvectors the `hessian` metric saved for one seed of `cell` (numpy .npz, no pickle)."""
        return self.state_dir("hessian", cell, (seed,)) / EIGENVECTORS_FILE

    def failure_path(self, stage: str, cell: Cell) -> Path:
        """The record of the last failed attempt of job (stage, cell), removed when the job succeeds."""
        return self.exp_dir / "failures" / stage / f"{cell.id}.json"

    @property
    def submitted_path(self) -> Path:
        """{stage: Slurm job id} of the arrays `--submit` sent."""
        return self.scripts_dir / "submitted.json"

    @property
    def results_dir(self) -> Path:
        return self.exp_dir / "results"

    @property
    def table_path(self) -> Path:
        return self.exp_dir / "results.csv"

    def figure_path(self, stem: str = "phase_plot", suffix: str = ".png") -> Path:
        """Where figure or table `stem` (one of `FIGURES`) is written, in format `suffix`."""
        if stem not in FIGURES:
            raise ValueError(f"{stem!r} is not one of the declared figures {', '.join(FIGURES)}")
        return self.inside(self.exp_dir, f"{stem}{suffix}")

    def script_path(self, stage: str, suffix: str) -> Path:
        return self.scripts_dir / f"{stage}{suffix}"
