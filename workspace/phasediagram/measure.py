"""A metric applied to one cell's trained models: the rows its jobs write, and `diagnose` computes.

`metric_rows` runs metric `stage` with a spec's options on the models of a cell's seeds, one model
or one seed pair at a time (or in groups, where the metric computes several at once), each with
its own generator seeded by (stage, cell, seeds): the same numbers wherever it runs. Loading the
checkpoints is the caller's (the jobs check them against the spec; `diagnose` against the study).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import replace

import torch

from phasediagram.data import datasets as data_mod
from phasediagram.metrics import METRICS, MetricData, parse_key
from phasediagram.resolve import metric_options
from phasediagram.seeding import stable_seed
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.storage import results


def pairs_of(seeds: tuple[int, ...], how: str) -> list[tuple[int, int]]:
    """Seed pairs i < j: all of them, consecutive ones, or only the first."""
    every = list(itertools.combinations(seeds, 2))
    if how == "all":
        return every
    if how == "adjacent":
        return list(zip(seeds[:-1], seeds[1:]))
    if how == "first":
        return every[:1]
    raise ValueError(f"pairs must be 'all', 'adjacent' or 'first', got {how!r}")


def metric_rows(spec: ExperimentSpec, stage: str, cell: Cell, loaded: dict[int, tuple[torch.nn.Module | None, str]],
                ds: data_mod.Dataset, state_dir) -> list[dict]:
    """Per-seed (single) or per-pair (pair) values of metric `stage` with the spec's options, on the
    models `loaded` ({seed: (model, status)}, seeds in order) and dataset `ds` (on their device); unit
    u's generator is seeded with stable_seed(stage, cell.id, *u) and its state folder is `state_dir(u)`
    (None: no state kept). Runs that diverged give a row with value NaN and status 'diverged'."""
    metric = METRICS[stage]
    options = metric_options(spec, stage)
    mdata = MetricData(ds.train, ds.test, ds.n_classes)
    seeds = tuple(loaded)
    row = functools.partial(results.make_row, spec.name, cell)
    units = ([(s,) for s in seeds] if metric.kind == "single"
             else pairs_of(seeds, options.pairs if metric.selects_pairs else "all"))

    def generator(unit):
        return torch.Generator().manual_seed(stable_seed(stage, cell.id, *unit))

    together: dict[tuple, dict[str, float]] = {}
    ok = [u for u in units if all(loaded[s][1] == "ok" for s in u)]
    group = metric.group_size(spec, cell, options, len(ok)) if metric.group_size is not None else 0
    if metric.compute_seeds is not None and group:
        for chunk in (ok[i:i + group] for i in range(0, len(ok), group)):  # seeds in groups
            together.update(zip(chunk, metric.compute_seeds(
                [loaded[u[0]][0] for u in chunk], [replace(mdata, state_dir=state_dir(u)) for u in chunk], options,
                [generator(u) for u in chunk])))
    if metric.compute_pairs is not None and group:
        for chunk in (ok[i:i + group] for i in range(0, len(ok), group)):  # pairs in groups
            together.update(zip(chunk, metric.compute_pairs(
                [(loaded[a][0], loaded[b][0]) for a, b in chunk],
                [replace(mdata, state_dir=state_dir(u)) for u in chunk], options, [generator(u) for u in chunk])))
    rows = []
    for unit in units:
        seed, seed_b = unit[0], (unit[1] if len(unit) > 1 else None)
        bad = next((loaded[s][1] for s in unit if loaded[s][1] != "ok"), None)
        if bad is not None:
            rows.append(row(seed, seed_b, "-", stage, None, math.nan, bad, stage))
            continue
        if unit in together:
            values = together[unit]
        else:
            values = metric.compute(*(loaded[s][0] for s in unit), replace(mdata, state_dir=state_dir(unit)), options,
                                    generator(unit))
        for k, v in values.items():
            split, quantity, coord = parse_key(k)
            rows.append(row(seed, seed_b, split, quantity, coord, float(v), "ok", stage))
    return rows
