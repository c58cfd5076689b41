"""The experiment spec: one frozen, validated object describing a whole phase-diagram study.

A spec is the product grid  width x batch_size x lr x weight_decay x train_fraction x label_noise
(each axis a tuple; the load axis and the temperature axis are the two the plots use, every
other axis holds one value) times a tuple of seeds. Invalid specs fail at construction with a
`SpecError` naming the field and the allowed values.
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

import yaml

PRESET_WIDTHS = {
    "reference": (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128),
    "demo": (2, 4, 8, 16, 32),
}
PRESET_BATCH_SIZES = {
    "efficient_fine": (16, 24, 32, 44, 64, 92, 128, 180, 256, 364, 512, 724, 1024),
    "demo": (16, 32, 64, 128, 256),
}
# Log-spaced temperature lists of our own (the reference repository's lists are not published
# with its results); coarse: half a decade apart, fine: a quarter of a decade apart.
PRESET_LRS = {
    "coarse": (0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316),
    "fine": (0.001, 0.00178, 0.00316, 0.00562, 0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.178, 0.316),
}
PRESET_WEIGHT_DECAYS = {
    "coarse": (1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3),
    "fine": (1e-5, 1.78e-5, 3.16e-5, 5.62e-5, 1e-4, 1.78e-4, 3.16e-4, 5.62e-4, 1e-3, 1.78e-3, 3.16e-3),
}
PRESETS = {
    "widths": PRESET_WIDTHS,
    "batch_sizes": PRESET_BATCH_SIZES,
    "lrs": PRESET_LRS,
    "weight_decays": PRESET_WEIGHT_DECAYS,
}

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
SCHEDULES = ("constant", "step")
METRIC_CHECKPOINTS = ("final", "best")
DTYPES = ("float32", "float64")
ENSEMBLE_CHOICES = ("auto", "on", "off")
MAX_SEED = 2**31 - 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecError(ValueError):
    """An invalid spec or option: the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def _known(kind: str) -> tuple[str, ...]:
    """Names registered for `kind`, imported lazily to keep this module import-light."""
    if kind == "arch":
        from .models import MODELS

        return tuple(MODELS)
    if kind == "dataset":
        from .data import DATASETS

        return tuple(DATASETS)
    if kind == "metric":
        from .metrics import METRICS

        return tuple(METRICS)
    if kind == "optimizer":
        from .methods import OPTIMIZERS

        return tuple(OPTIMIZERS)
    if kind == "regularizer":
        from .methods import REGULARIZERS

        return tuple(REGULARIZERS)
    raise KeyError(kind)


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

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise SpecError("name", f"{self.name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                            "starting with a letter or digit")
        _choice("arch", self.arch, _known("arch"))
        _choice("dataset", self.dataset, _known("dataset"))
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
        from .data import max_train_size

        for fraction in self.train_fractions:
            n_train = max_train_size(self.dataset, fraction)
            too_big = [b for b in self.batch_sizes if b > n_train]
            if too_big:
                raise SpecError("batch_sizes", f"{too_big} exceed the training set ({n_train} examples of "
                                f"{self.dataset} at train_fraction {fraction}); allowed: 1..{n_train}")
        set_("seeds", _int_tuple("seeds", self.seeds, 0, MAX_SEED))
        set_("epochs", _positive_int("epochs", self.epochs, 100_000))
        _choice("schedule", self.schedule, SCHEDULES)
        set_("lr_decay_at", _float_tuple("lr_decay_at", [self.lr_decay_at], 0.0, 1.0)[0])
        set_("lr_decay_factor", _float_tuple("lr_decay_factor", [self.lr_decay_factor], 0.0, 1.0, low_open=True)[0])
        set_("momentum", _float_tuple("momentum", [self.momentum], 0.0, 0.999)[0])
        _choice("optimizer", self.optimizer, _known("optimizer"))
        _choice("regularizer", self.regularizer, _known("regularizer"))
        if isinstance(self.metrics, str) or not hasattr(self.metrics, "__iter__"):
            raise SpecError("metrics", f"expected a list of metric names, got {self.metrics!r}")
        set_("metrics", tuple(_choice("metrics", m, _known("metric")) for m in self.metrics))
        _nonempty_unique("metrics", self.metrics) if self.metrics else None
        _choice("ensemble", self.ensemble, ENSEMBLE_CHOICES)
        _choice("metric_checkpoint", self.metric_checkpoint, METRIC_CHECKPOINTS)
        _choice("dtype", self.dtype, DTYPES)
        set_("optimizer_options", _options_dict("optimizer_options", self.optimizer_options))
        set_("regularizer_options", _options_dict("regularizer_options", self.regularizer_options))
        set_("metric_options", _metric_options(self.metric_options))
        from .methods import method_options

        method_options(self)  # validates optimizer/regularizer options (raises SpecError)
        for m in dict.fromkeys([*self.metrics, *self.metric_options]):
            self.options_for(m)  # validates metric options (raises SpecError)
        if len(self.seeds) < 2 and any(_metric_kind(m) == "pair" for m in self.metrics):
            raise SpecError("seeds", "pairwise metrics (" + ", ".join(m for m in self.metrics if _metric_kind(m) == "pair")
                            + ") need at least two seeds")

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

    def options_for(self, metric: str):
        """The validated options object of `metric` (defaults overridden by `metric_options`)."""
        from .metrics import METRICS

        spec_metric = METRICS[metric]
        given = dict(self.metric_options.get(metric, {}))
        allowed = {f.name for f in dataclasses.fields(spec_metric.options)}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise SpecError(f"metric_options.{metric}", f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        try:
            return spec_metric.options(**given)
        except SpecError:
            raise
        except (TypeError, ValueError) as exc:
            raise SpecError(f"metric_options.{metric}", str(exc)) from None

    # ------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["optimizer_options"] = dict(self.optimizer_options)
        d["regularizer_options"] = dict(self.regularizer_options)
        d["metric_options"] = {k: dict(v) for k, v in self.metric_options.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def training_identity(self) -> dict[str, Any]:
        """The fields that determine the trained checkpoints (everything but the metrics)."""
        d = self.to_dict()
        for name in ("metrics", "metric_options", "metric_checkpoint"):
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
            if key in ("widths", "batch_sizes", "lrs", "weight_decays") and isinstance(value, str):
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
        """Load a spec from a .json, .yaml or .yml file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError("spec file", f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise SpecError("spec file", f"{path} is not a text file (expected JSON or YAML)") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            kind = "JSON" if path.suffix == ".json" else "YAML"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SpecError("spec file", f"{path} is not valid {kind}: {first}") from None
        return cls.from_dict(data)


def preset(field_name: str, name: str) -> tuple:
    """A named list from PRESETS, e.g. preset('batch_sizes', 'efficient_fine')."""
    table = PRESETS[field_name]
    if name not in table:
        raise SpecError(field_name, f"{name!r} is neither a list of numbers nor a preset; presets: {', '.join(table)}")
    return table[name]


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
    known = _known("metric")
    out = {}
    for k, v in value.items():
        if k not in known:
            raise SpecError("metric_options", f"{k!r} is not one of {', '.join(known)}")
        out[k] = _options_dict(f"metric_options.{k}", v)
    return out


def _metric_kind(name: str) -> str:
    from .metrics import METRICS

    return METRICS[name].kind


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed derived from `parts` by SHA-256 (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
