"""Place trained models on a finished study's phase map: their phase metrics, phase and what it suggests.

    d = diagnose(["runs/.../seed0/final.pt", "runs/.../seed1/final.pt"], Study(spec, root))
    d.phase, d.advice          # e.g. "IV-B", "the well-trained phase ..."
    d.figure()                 # the study's phase map with a marker at the models' (load, temperature)

The checkpoints are seeds of one setting (one cell, one family). The metrics the phase rule reads
(training loss from `loss_acc`, mode connectivity from `curve`, CKA, and the top Hessian eigenvalue
when the rule uses it), as far as the study ran them, are computed with the study's own options by
the jobs' code (`measure.metric_rows`: the same generators, seeded by metric, cell and seeds, on the
study's dataset at the checkpoints' cell), so models of a study's cell reproduce that cell's rows.
The rows are classified by the study's phase rule (`phases.classify` on the one-cell table). Pair
metrics need two seeds: one checkpoint gets its single-model metrics and no phase (no mc).

Marker position: the model's load and temperature values themselves, on the map's axes (log where
the grid values are positive, else linear); a value on the grid sits in its cell, between the cell's
edges e_k <= v <= e_{k+1} (`plots.edges`), and one off the grid lies between the edges of the cell it
falls in. A value beyond the grid's outer edges is clamped onto the border and named in `notes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from phasediagram.analysis import phases as phases_mod
from phasediagram.analysis import plots
from phasediagram.analysis.table import COLUMNS, normalise
from phasediagram.errors import CorruptFile, SpecError
from phasediagram.execution.jobs import TRAIN, dataset_for
from phasediagram.execution.runtime import torch_threads
from phasediagram.measure import metric_rows
from phasediagram.metrics import METRICS
from phasediagram.spec.experiment import Cell
from phasediagram.storage import results
from phasediagram.storage.layout import Layout
from phasediagram.study import Study
from phasediagram.training import train

PHASE_METRICS = ("loss_acc", "curve", "CKA", "hessian")  # what the phase rule reads, in the order they run
MARKER_ID = "diagnosis-marker"

ADVICE = {
    "I": "poorly connected and sharp (under-parameterised, cold): more width or more data, or train longer",
    "II": "hot (the seeds are not at minima: mc above the endpoints, or well connected yet sharp): a larger batch "
          "or a lower learning rate",
    "III": "poorly connected and flat: more width",
    "IV-A": "well connected and flat, the seeds' functions dissimilar: near the best; a little cooler (larger "
            "batch or lower learning rate) or wider",
    "IV-B": "the well-trained phase: well connected, flat and similar, where the best test accuracy lies",
    "IV": "well connected and flat; IV-A or IV-B needs CKA (the study's CKA metric)",
    "I/III": "poorly connected; sharp (I) or flat (III) needs the training loss (loss_acc) or the Hessian",
    "II/IV": "well connected; sharp (II) or flat (IV) needs the training loss (loss_acc) or the Hessian",
}
ONE_SEED = ("not classified: connectivity (mc) and CKA compare two models, so they need a second seed of this "
            "setting; the single-model metrics are listed")
DIVERGED = "not classified: every run diverged (far too hot): a much larger batch or a lower learning rate"
NO_MC = "not classified: no mode connectivity (mc): the study has no `curve` metric rows for it"


def advice_for(phase: str, seeds: int, diverged: bool) -> str:
    """The reading of Yang et al. (2021) of a phase label ('' when unclassified, then why)."""
    if phase:
        return ADVICE[phase]
    if diverged:
        return DIVERGED
    return ONE_SEED if seeds < 2 else NO_MC


def marker_position(value: float, grid_values) -> tuple[float, bool]:
    """(position, inside): `value` where it lies within the outer edges [e_0, e_n] of the grid's cells
    (`plots.edges(grid_values)`), else the nearer outer edge; `inside` says whether it lay within."""
    e = plots.edges(grid_values)
    lo, hi = float(e[0]), float(e[-1])
    return min(max(float(value), lo), hi), lo <= value <= hi


@dataclass
class Diagnosis:
    """What `diagnose` found for the checkpoints of one setting.

    `rows`: the computed metric rows (the tidy table's columns; with the training status rows);
    `classified`: the one-cell row of `phases.classify` (inputs, connectivity, sharpness, phase, note);
    `phase` ('' if unclassified) and `advice`; `study_phase`: the study's own phase at this cell
    (None when the cell is not on its grid); `notes`: where the models differ from the study's grid.
    """

    checkpoints: tuple[Path, ...]
    cell: Cell
    seeds: tuple[int, ...]
    rows: pd.DataFrame
    classified: dict
    phase: str
    advice: str
    study_phase: str | None
    load: str
    temperature: str
    notes: list[str] = field(default_factory=list)
    study_table: pd.DataFrame = field(default=None, repr=False)
    rule: phases_mod.PhaseRule | None = field(default=None, repr=False)

    def position(self) -> tuple[float, float]:
        """(x, y) of the marker on the study's phase map (module docstring)."""
        xs, ys = plots.axes_values(self.study_table[self.study_table["source"] != phases_mod.PHASE_SOURCE],
                                   self.load, self.temperature)
        return (marker_position(self.cell.axis(self.load), xs)[0],
                marker_position(self.cell.axis(self.temperature), ys)[0])

    def figure(self) -> Figure:
        """The study's phase map (`plots.phase_map`) with a star at the models' (load, temperature)."""
        fig = plots.phase_map(self.study_table, self.load, self.temperature, self.rule)
        ax = fig.axes[0]
        x, y = self.position()
        label = self.phase or "unclassified"
        ax.plot([x], [y], marker="*", markersize=16, markerfacecolor="white", markeredgecolor="black",
                markeredgewidth=1.2, linestyle="none", zorder=6, clip_on=False, gid=MARKER_ID)
        ax.annotate(f"this model: {label}", (x, y), xytext=(0, 11), textcoords="offset points", ha="center",
                    va="bottom", fontsize=7, fontweight="bold", zorder=7,
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="black", lw=0.6, alpha=0.9))
        ax.set_title(f"phases; star: {self.cell.id}", fontsize=8, loc="left")
        fig.tight_layout()
        return fig

    def summary(self) -> str:
        """Lines for a terminal: the cell, each quantity's mean over seeds (or pairs), the phase and advice."""
        ok = self.rows[(self.rows["status"] == "ok") & self.rows["coord"].isna() & (self.rows["kind"] == "value")
                       & (self.rows["source"] != TRAIN)]
        means = ok.groupby(["source", "metric", "split"], sort=False)["value"].mean()
        lines = [f"models: {len(self.seeds)} seed(s) {list(self.seeds)} at {self.cell.id}"]
        lines += [f"  {source}.{metric} ({split}): {value:.6g}" for (source, metric, split), value in means.items()]
        where = "" if self.study_phase is None else f" (the study's phase at this cell: {self.study_phase or '-'})"
        c = self.classified
        if c["connectivity"] or c["sharpness"]:
            lines.append(f"connectivity: {c['connectivity'] or '?'} (mc {c['mc']:.4g}), sharpness: "
                         f"{c['sharpness'] or '?'} (training loss {c['train_loss']:.4g}), CKA {c['cka']:.4g}")
        lines.append(f"phase: {self.phase or 'unclassified'}{where}")
        lines.append(f"suggests: {self.advice}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def as_study(study: Study | str | Path) -> Study:
    """`study`, or the study whose folder `<root>/checkpoint/<name>` is given (its spec.json)."""
    if isinstance(study, Study):
        return study
    layout = Layout.from_experiment_dir(study)
    if not layout.spec_path.is_file():
        raise SpecError("study", f"no study at {layout.exp_dir} (no {layout.spec_path.name})")
    return Study(layout.spec_path, layout.root)


def load_checkpoints(paths, study: Study, device) -> tuple[Cell, dict[int, tuple], dict[int, dict]]:
    """(cell, {seed: (model or None, status)}, {seed: checkpoint dict}) of checkpoints of one setting
    of the study's family; `SpecError` for a missing file, another family, mixed settings or repeated
    seeds, `CorruptFile` for a damaged checkpoint."""
    if not paths:
        raise SpecError("checkpoints", "give at least one checkpoint")
    cell, args, loaded, ckpts = None, None, {}, {}
    for path in map(Path, paths):
        if not path.is_file():
            raise SpecError("checkpoints", f"{path}: no such checkpoint file")
        model, ckpt = train.load_model(path, device)
        arch = ckpt["model_args"].get("arch")
        if arch != study.spec.arch:
            raise SpecError("checkpoints", f"{path} holds a {arch} model, the study {study.spec.name!r} "
                                           f"{study.spec.arch} models")
        try:
            this = Cell(**ckpt["cell"])
        except TypeError:
            raise CorruptFile(path, "its cell is not a grid cell") from None
        if cell is not None and (this != cell or ckpt["model_args"] != args):
            raise SpecError("checkpoints", f"{path} is of {this.id}, the first checkpoint of {cell.id}: give seeds of "
                                           "one setting")
        seed = int(ckpt["seed"])
        if seed in loaded:
            raise SpecError("checkpoints", f"{path}: seed {seed} given twice")
        cell, args = this, ckpt["model_args"]
        loaded[seed] = (model if ckpt["status"] == "ok" else None, ckpt["status"])
        ckpts[seed] = ckpt
    return cell, dict(sorted(loaded.items())), dict(sorted(ckpts.items()))


def grid_notes(study: Study, cell: Cell, load: str, temperature: str, xs, ys) -> list[str]:
    """Where `cell` is off the study's grid: each coordinate whose value the grid lacks."""
    notes = []
    spec = study.spec
    values = {"width": spec.widths, "batch_size": spec.batch_sizes, "lr": spec.lrs, "weight_decay": spec.weight_decays,
              "train_fraction": spec.train_fractions, "label_noise": spec.label_noises}
    for name, grid in values.items():
        if not any(abs(float(v) - float(cell.axis(name))) <= 1e-12 * max(1.0, abs(float(v))) for v in grid):
            notes.append(f"{name} {cell.axis(name):g} is not on the study's grid ({', '.join(f'{v:g}' for v in grid)})")
    for name, grid in ((load, xs), (temperature, ys)):
        if grid and not marker_position(cell.axis(name), grid)[1]:
            notes.append(f"{name} {cell.axis(name):g} lies beyond the map: the marker sits on its border")
    return notes


def study_table(study: Study) -> pd.DataFrame:
    """The study's table (with phase rows); `SpecError` when it has no results or no classified cell."""
    if not study.layout.spec_path.is_file():
        raise SpecError("study", f"no study at {study.layout.exp_dir} (no {study.layout.spec_path.name})")
    df = study.table(write=False)
    if df.empty:
        raise SpecError("study", f"the study {study.spec.name!r} has no results yet: run it first")
    if not study.phases(df)["phase"].astype(bool).any():
        raise SpecError("study", f"the study {study.spec.name!r} has no phase map (no cell classified: the phase "
                                 "rule needs mc and the training loss)")
    return df


def measure_models(spec, layout: Layout, cell: Cell, loaded: dict[int, tuple], ckpts: dict[int, dict], stages,
                   device) -> pd.DataFrame:
    """The training status rows of the models `loaded` (seeds of `cell`; `ckpts` their checkpoints),
    then the rows of each of `stages` with `spec`'s options on its dataset at `cell` (`measure.metric_rows`;
    a pair metric only with two seeds or more); `SpecError` when the models do not fit the dataset."""
    ds = dataset_for(spec, cell, layout)
    first = next(iter(ckpts.values()))["model_args"]
    if tuple(first["input_shape"]) != ds.input_shape or int(first["n_classes"]) != ds.n_classes:
        raise SpecError("checkpoints", f"the models take inputs {tuple(first['input_shape'])} into "
                                       f"{first['n_classes']} classes, the study's {spec.dataset} is "
                                       f"{ds.input_shape} into {ds.n_classes}")
    ds = ds.to(device)
    rows = [results.make_row(spec.name, cell, seed, None, "train", "epochs", None, float(c["epoch"]), c["status"],
                             TRAIN) for seed, c in ckpts.items()]
    for stage in stages:
        if METRICS[stage].kind == "pair" and len(loaded) < 2:
            continue
        rows += metric_rows(spec, stage, cell, loaded, ds, lambda unit: None)
    return normalise(pd.DataFrame(rows, columns=list(results.ROW_KEYS)))[COLUMNS]


def diagnose(checkpoints, study: Study | str | Path, device="cpu",
             rule: phases_mod.PhaseRule | None = None, threads: int | None = 1) -> Diagnosis:
    """The phase metrics, phase and advice of `checkpoints` (seeds of one setting) on `study`'s map.

    `study`: a `Study` or its folder `<root>/checkpoint/<name>`; `rule`: the phase rule (default
    `PhaseRule()`, as `Study.phases`); `threads`: torch threads while the metrics run (restored after;
    None: as set). A study's own float32 checkpoints get its values exactly at the thread count its jobs
    ran with (1 in the default local pool, one worker per core): the bend training of `curve` amplifies
    the rounding of sums split over another number of threads. Everything is checked before any metric
    runs; nothing is written (pair metrics keep no state)."""
    with torch_threads(threads):
        return _diagnose(checkpoints, study, device, rule)


def _diagnose(checkpoints, study: Study | str | Path, device, rule: phases_mod.PhaseRule | None) -> Diagnosis:
    study = as_study(study)
    rule = rule or phases_mod.PhaseRule()
    table = study_table(study)
    spec = study.spec
    paths = tuple(Path(p) for p in ([checkpoints] if isinstance(checkpoints, (str, Path)) else checkpoints))
    cell, loaded, ckpts = load_checkpoints(paths, study, device)
    wanted = [m for m in PHASE_METRICS if m in spec.metrics and (m != "hessian" or rule.hessian_threshold is not None)]
    df = measure_models(spec, study.layout, cell, loaded, ckpts, wanted, device)
    classified = phases_mod.classify(df, rule).iloc[0].to_dict()
    phase = str(classified["phase"])
    diverged = all(status == "diverged" for _, status in loaded.values())
    load, temperature = spec.load_axis, spec.temperature_axis
    xs, ys = plots.axes_values(table[table["source"] != phases_mod.PHASE_SOURCE], load, temperature)
    own = study.phases(table, rule)
    at = own[own["cell"] == cell.id]
    notes = grid_notes(study, cell, load, temperature, xs, ys)
    missing = [m for m in ("loss_acc", "curve", "CKA") if m not in spec.metrics]
    if missing:
        notes.append(f"the study ran no {', '.join(missing)}: not computed")
    return Diagnosis(checkpoints=paths, cell=cell, seeds=tuple(loaded), rows=df, classified=classified, phase=phase,
                     advice=advice_for(phase, len(loaded), diverged),
                     study_phase=None if at.empty else str(at["phase"].iloc[0]), load=load, temperature=temperature,
                     notes=notes, study_table=table, rule=rule)
