"""From names to objects: a spec checked against the registries, and the option objects it names.

`ExperimentSpec` checks only its own structure; this module, above the model, dataset, metric and
method registries, checks what needs them:

- `arch` and `dataset` are registered or import paths (a plugged-in dataset is loaded and checked,
  and a plugged-in family, or a family on a plugged-in dataset, is built at the smallest width and
  must map the dataset's inputs to logits of its class count);
- a token family (`transformer`, `transformer_seq`) and a token dataset (`modular_addition`,
  `reversal`) go together, the family's logits fitting the dataset's labels;
- `optimizer`, `regularizer` and every metric name are registered, and each metric can measure
  the family (it names the family, if it names any, and its `check_model` accepts the family's
  model at the smallest width);
- every batch size fits the training set at every train fraction;
- optimizer, regularizer and metric options build their option objects (`SpecError` otherwise), and
  those whose options name parts of the model (a `check_model(model)` method: CKA's layers) check
  them on the family's model at the smallest width;
- pairwise metrics have at least two seeds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from phasediagram.data import datasets
from phasediagram.data.datasets import DATASETS
from phasediagram.data.sequences import LABELS as DATASET_LABELS
from phasediagram.errors import SpecError
from phasediagram.methods import OPTIMIZERS, REGULARIZERS, method_options
from phasediagram.metrics import METRICS
from phasediagram.models import families
from phasediagram.models.families import MODELS
from phasediagram.models.transformer import LABELS as FAMILY_LABELS
from phasediagram.plugins import is_import_path
from phasediagram.spec.experiment import ExperimentSpec


def _registered(field_name: str, value: str, registry: Mapping) -> None:
    if value not in registry:
        raise SpecError(field_name, f"{value!r} is not one of {', '.join(registry)}")


def _registered_or_plugged(field_name: str, value: str, registry: Mapping) -> None:
    if not is_import_path(value):
        _registered(field_name, value, registry)


def _tokens_fit(arch: str, dataset: str) -> None:
    """`SpecError` unless a token family's logits fit a token dataset's labels (a plugged-in side is the user's)."""
    fits, has = FAMILY_LABELS.get(arch), DATASET_LABELS.get(dataset)
    if fits == has or (is_import_path(arch) or is_import_path(dataset)):
        return
    if fits is None:
        raise SpecError("arch", f"dataset {dataset} is token sequences with {has}: it needs arch "
                                f"{' or '.join(a for a, f in FAMILY_LABELS.items() if f == has)}, not {arch}")
    raise SpecError("arch", f"{arch} takes token sequences with {fits}: a dataset of them "
                            f"({', '.join(d for d, h in DATASET_LABELS.items() if h == fits)}), not {dataset}")


def check(spec: ExperimentSpec) -> ExperimentSpec:
    """`spec` itself once every name it holds is registered and every option it sets is valid."""
    _registered_or_plugged("arch", spec.arch, MODELS)
    _registered_or_plugged("dataset", spec.dataset, DATASETS)
    _tokens_fit(spec.arch, spec.dataset)
    facts = datasets.info(spec.dataset, spec.data_root)
    model = None
    if is_import_path(spec.arch) or is_import_path(spec.dataset):
        model = families.check_outputs(spec.arch, min(spec.widths), facts.input_shape, facts.n_classes)
    for fraction in spec.train_fractions:
        n_train = int(facts.train_size * fraction)
        too_big = [b for b in spec.batch_sizes if b > n_train]
        if too_big:
            raise SpecError("batch_sizes", f"{too_big} exceed the training set ({n_train} examples of "
                            f"{spec.dataset} at train_fraction {fraction}); allowed: 1..{n_train}")
    _registered("optimizer", spec.optimizer, OPTIMIZERS)
    _registered("regularizer", spec.regularizer, REGULARIZERS)
    for name in spec.metrics:
        _registered("metrics", name, METRICS)
    for name in spec.metric_options:
        _registered("metric_options", name, METRICS)
    for name in spec.metrics:
        measured = METRICS[name].families
        if measured is not None and spec.arch not in measured:
            raise SpecError("metrics", f"{name} measures only {', '.join(measured)} models, not arch {spec.arch}")
        if METRICS[name].check_model is not None:
            if model is None:
                with torch.random.fork_rng(devices=[]):
                    model = families.create(spec.arch, min(spec.widths), facts.input_shape, facts.n_classes).eval()
            p = next(model.parameters())
            try:
                METRICS[name].check_model(model, torch.zeros((2, *facts.input_shape), dtype=p.dtype, device=p.device))
            except SpecError as exc:
                raise SpecError("metrics", f"{name} cannot measure arch {spec.arch}: "
                                           f"{str(exc).removeprefix(f'{exc.field}: ')}") from None
    method_options(spec)
    for name in dict.fromkeys([*spec.metrics, *spec.metric_options]):
        options = metric_options(spec, name)
        if hasattr(options, "check_model"):  # options naming parts of the model, e.g. CKA's layers
            if model is None:
                with torch.random.fork_rng(devices=[]):
                    model = families.create(spec.arch, min(spec.widths), facts.input_shape, facts.n_classes)
            options.check_model(model)
    pairwise = [m for m in spec.metrics if METRICS[m].kind == "pair"]
    if len(spec.seeds) < 2 and pairwise:
        raise SpecError("seeds", f"pairwise metrics ({', '.join(pairwise)}) need at least two seeds")
    return spec


def metric_options(spec: ExperimentSpec, metric: str):
    """The options object of `metric`: its defaults overridden by `spec.metric_options[metric]`."""
    _registered("metrics", metric, METRICS)
    entry = METRICS[metric]
    given = dict(spec.metric_options.get(metric, {}))
    allowed = {f.name for f in dataclasses.fields(entry.options)}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SpecError(f"metric_options.{metric}", f"unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    try:
        return entry.options(**given)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"metric_options.{metric}", str(exc)) from None


def load_spec(source: ExperimentSpec | Mapping[str, Any] | str | Path) -> ExperimentSpec:
    """A checked spec from a spec, a mapping of fields or a .json/.yaml file."""
    if isinstance(source, ExperimentSpec):
        spec = source
    elif isinstance(source, (str, Path)):
        spec = ExperimentSpec.from_file(source)
    else:
        spec = ExperimentSpec.from_dict(source)
    return check(spec)
