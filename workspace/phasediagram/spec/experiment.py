"""The experiment spec: one frozen object describing a whole phase-diagram study.

A spec is the product grid  width x batch_size x lr x weight_decay x train_fraction x label_noise
(each axis a tuple; the load axis and the temperature axis are the two the plots use, every
other axis holds one value) times a tuple of seeds. Construction checks the structure (types,
ranges, axes) and raises `SpecError` naming the field and the allowed values; whether the names
it holds (arch, dataset, metrics, methods) and their options exist is `phasediagram.resolve`'s
check, which needs the registries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from phasediagram.errors import SpecError
from phasediagram.plugins import is_import_path
from phasediagram.spec.files import read_spec_file
from phasediagram.spec.presets import PRESET_BATCH_SIZES, PRESET_WIDTHS, PRESETS, preset
from phasediagram.spec.tracking import TrackOptions, track_options

LOAD_AXES = ("width", "train_fraction", "label_noise")
TEMPERATURE_AXES = ("batch_size", "lr", "weight_decay")
AXIS_FIELDS = {
    "width": "widths",
    "batch_size": "batch_sizes",
    "lr": "lrs",
    "weight_decay": "weight_decays",
    "train_fraction": "train_fractions",
    "label_noise": "label_noises",
}
SCHEDULES = ("constant", "step", "cosine")
METRIC_CHECKPOINTS = ("final", "best")
DTYPES = ("float32", "float64")
ENSEMBLE_CHOICES = ("auto", "on", "off")
AUTOCAST_CHOICES = ("off", "bf16")
IDENTITY_DEFAULTS = {"autocast": "off", "deterministic": False, "track": None}  # training fields that joined later
MAX_SEED = 2**31 - 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _name(field_name: str, value: Any) -> str:
    """A registry name (arch, dataset, metric, method): its spelling here, its existence in `resolve`."""
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise SpecError(field_name, f"{value!r} is not a name (letters, digits, '_', '.', '-')")
    return value


def _name_or_import_path(field_name: str, value: Any) -> str:
    """A registered name, or an import path `module:function` of a user's builder or loader."""
    if is_import_path(value):
        return value
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise SpecError(field_name, f"{value!r} is not a name (letters, digits, '_', '.', '-') nor an import "
                                    "path (module:function)")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise SpecError(name, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _int_tuple(name: str, values: Any, low: int = 1, high: int | None = None) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise SpecError(name, f"expected a list of integers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise SpecError(name, f"{v!r} is not an integer")
        v = int(v)
        if v < low or (high is not None and v > high):
            bound = f"{low} <= value" + (f" <= {high}" if high is not None else "")
            raise SpecError(name, f"{v} is out of range (allowed: {bound})")
        out.append(v)
    return _nonempty_unique(name, tuple(out))


def _float_tuple(name: str, values: Any, low: float, high: float, low_open: bool = False) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise SpecError(name, f"expected a list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpecError(name, f"{v!r} is not a finite number")
        v = float(v)
        if v < low or v > high or (low_open and v == low):
            raise SpecError(name, f"{v} is out of range (allowed: {low} {'<' if low_open else '<='} value <= {high})")
        out.append(v)
    return _nonempty_unique(name, tuple(out))


def _nonempty_unique(name: str, values: tuple) -> tuple:
    if not values:
        raise SpecError(name, "must not be empty")
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise SpecError(name, f"duplicated values {dup}")
    return values


def _positive_int(name: str, value: Any, high: int | None = None) -> int:
    return _int_tuple(name, [value], 1, high)[0]


def _fmt(x: float) -> str:
    """A short, stable text for a number in ids and file names: 0.1 -> '0.1', 5e-4 -> '0.0005'."""
    return f"{x:.6g}"


@dataclass(frozen=True)
class Cell:
    """One point of the grid. Its `id` is stable across runs and safe as a folder name."""

    width: int
    batch_size: int
    lr: float
    weight_decay: float
    train_fraction: float = 1.0
    label_noise: float = 0.0

    @property
    def id(self) -> str:
        return (
            f"w{self.width}_bs{self.batch_size}_lr{_fmt(self.lr)}_wd{_fmt(self.weight_decay)}"
            f"_f{_fmt(self.train_fraction)}_n{_fmt(self.label_noise)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def axis(self, name: str) -> float:
        return getattr(self, name)


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything that defines a study; see the module docstring for the grid it spans.

    Training-relevant fields are immutable once `spec.json` is written; `metrics`,
    `metric_options` and `metric_checkpoint` may change later (results record the options and the
    checkpoint they were made with). `metric_checkpoint` "best" makes the metrics read each run's
    checkpoint of lowest mean training loss (over an epoch's SGD steps), as the reference study's
    metric scripts read its `_best` files; "final" the last epoch's.
    """

    name: str = "demo"
    arch: str = "resnet1d"
    dataset: str = "mnist1d"
    data_root: str | None = None
    widths: tuple[int, ...] = PRESET_WIDTHS["demo"]
    batch_sizes: tuple[int, ...] = PRESET_BATCH_SIZES["demo"]
    lrs: tuple[float, ...] = (0.1,)
    weight_decays: tuple[float, ...] = (5e-4,)
    train_fractions: tuple[float, ...] = (1.0,)
    label_noises: tuple[float, ...] = (0.0,)
    load_axis: str = "width"
    temperature_axis: str = "batch_size"
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30
    schedule: str = "step"
    lr_decay_at: float = 0.75
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    optimizer: str = "sgd"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    regularizer: str = "none"
    regularizer_options: Mapping[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = ("loss_acc", "dist")
    metric_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metric_checkpoint: str = "final"  # which trained checkpoint the metrics read: "final" or "best" (lowest training loss)
    ensemble: str = "auto"
    dtype: str = "float32"
    max_runs: int = 100_000  # the most (cell, seed) runs the grid may have: a guard against a typo's huge grid
    autocast: str = "off"  # "bf16": the training forward and loss under torch.autocast to bfloat16 (dtype float32)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) in every job (docs/gpu.md)
    track: TrackOptions | None = None  # quantities measured during training (`spec.tracking`); None: none

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise SpecError("name", f"{self.name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                            "starting with a letter or digit")
        _name_or_import_path("arch", self.arch)
        _name_or_import_path("dataset", self.dataset)
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise SpecError("data_root", f"expected a folder path, got {self.data_root!r}")
        set_("widths", _int_tuple("widths", self.widths, 1, 4096))
        set_("batch_sizes", _int_tuple("batch_sizes", self.batch_sizes, 1, 1 << 20))
        set_("lrs", _float_tuple("lrs", self.lrs, 0.0, 100.0, low_open=True))
        set_("weight_decays", _float_tuple("weight_decays", self.weight_decays, 0.0, 1.0))
        set_("train_fractions", _float_tuple("train_fractions", self.train_fractions, 0.0, 1.0, low_open=True))
        set_("label_noises", _float_tuple("label_noises", self.label_noises, 0.0, 1.0))
        _choice("load_axis", self.load_axis, LOAD_AXES)
        _choice("temperature_axis", self.temperature_axis, TEMPERATURE_AXES)
        for axis, fname in AXIS_FIELDS.items():
            if axis not in (self.load_axis, self.temperature_axis) and len(getattr(self, fname)) != 1:
                raise SpecError(fname, f"holds {len(getattr(self, fname))} values but is neither the load axis "
                                f"({self.load_axis}) nor the temperature axis ({self.temperature_axis}); "
                                "give it exactly one value or make it an axis")
        set_("seeds", _int_tuple("seeds", self.seeds, 0, MAX_SEED))
        set_("epochs", _positive_int("epochs", self.epochs, 100_000))
        _choice("schedule", self.schedule, SCHEDULES)
        set_("lr_decay_at", _float_tuple("lr_decay_at", [self.lr_decay_at], 0.0, 1.0)[0])
        set_("lr_decay_factor", _float_tuple("lr_decay_factor", [self.lr_decay_factor], 0.0, 1.0, low_open=True)[0])
        set_("momentum", _float_tuple("momentum", [self.momentum], 0.0, 0.999)[0])
        _name("optimizer", self.optimizer)
        _name("regularizer", self.regularizer)
        if isinstance(self.metrics, str) or not hasattr(self.metrics, "__iter__"):
            raise SpecError("metrics", f"expected a list of metric names, got {self.metrics!r}")
        set_("metrics", tuple(_name("metrics", m) for m in self.metrics))
        _nonempty_unique("metrics", self.metrics) if self.metrics else None
        _choice("ensemble", self.ensemble, ENSEMBLE_CHOICES)
        _choice("metric_checkpoint", self.metric_checkpoint, METRIC_CHECKPOINTS)
        _choice("dtype", self.dtype, DTYPES)
        set_("optimizer_options", _options_dict("optimizer_options", self.optimizer_options))
        set_("regularizer_options", _options_dict("regularizer_options", self.regularizer_options))
        set_("metric_options", _metric_options(self.metric_options))
        set_("max_runs", _positive_int("max_runs", self.max_runs, 1 << 40))
        n_cells = math.prod(len(getattr(self, f)) for f in AXIS_FIELDS.values())
        if n_cells * len(self.seeds) > self.max_runs:
            raise SpecError("max_runs", f"the grid has {n_cells} cells x {len(self.seeds)} seeds = "
                            f"{n_cells * len(self.seeds)} runs, more than max_runs = {self.max_runs}; "
                            "raise max_runs (--max-runs) if that is what you mean")
        _choice("autocast", self.autocast, AUTOCAST_CHOICES)
        if self.autocast != "off" and self.dtype != "float32":
            raise SpecError("autocast", f"{self.autocast} autocasts float32 operations; it needs dtype float32, "
                                        f"not {self.dtype}")
        if not isinstance(self.deterministic, bool):
            raise SpecError("deterministic", f"expected true or false, got {self.deterministic!r}")
        set_("track", track_options(self.track))
        if self.track is not None and self.autocast != "off":
            raise SpecError("track", f"measures the model as the metrics do, without autocast; it needs autocast off, "
                                     f"not {self.autocast}")

    # ------------------------------------------------------------------ the grid
    def cells(self) -> list[Cell]:
        """All cells, ordered by load then temperature (deterministic: array indices map to cells)."""
        return [
            Cell(w, b, lr, wd, f, n)
            for w in self.widths
            for b in self.batch_sizes
            for lr in self.lrs
            for wd in self.weight_decays
            for f in self.train_fractions
            for n in self.label_noises
        ]

    # ------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["optimizer_options"] = dict(self.optimizer_options)
        d["regularizer_options"] = dict(self.regularizer_options)
        d["metric_options"] = {k: dict(v) for k, v in self.metric_options.items()}
        d["track"] = None if self.track is None else self.track.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def training_identity(self) -> dict[str, Any]:
        """The fields that determine the trained checkpoints (everything but the metrics and max_runs);
        a field of `IDENTITY_DEFAULTS` only where it differs from its default there, so the specs written
        before it existed keep their `training_hash`."""
        d = self.to_dict()
        for name in ("metrics", "metric_options", "metric_checkpoint", "max_runs"):
            d.pop(name)
        for name, default in IDENTITY_DEFAULTS.items():
            if d[name] == default:
                d.pop(name)
        return d

    def training_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.training_identity(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Any) -> "ExperimentSpec":
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"expected a mapping of fields, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise SpecError("spec", f"unknown key(s) {unknown}; allowed keys: {', '.join(allowed)}")
        values = {}
        for key, value in data.items():
            if key in PRESETS and isinstance(value, str):
                value = preset(key, value)
            values[key] = value
        try:
            return cls(**values)
        except SpecError:
            raise
        except TypeError as exc:
            raise SpecError("spec", str(exc)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ExperimentSpec":
        """Load a spec from a .json, .yaml or .yml file (`spec.files.read_spec_file`: its size, depth,
        aliases and duplicate keys checked)."""
        data = read_spec_file(path)
        return cls.from_dict(data)


def _options_dict(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SpecError(name, f"expected a mapping of option names to values, got {value!r}")
    return dict(value)


def _metric_options(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError("metric_options", f"expected a mapping metric -> options, got {value!r}")
    out = {}
    for k, v in value.items():
        out[_name("metric_options", k)] = _options_dict(f"metric_options.{k}", v)
    return out
