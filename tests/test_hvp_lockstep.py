"""Hessian-vector products of a cell's seeds computed together (`hvp_lockstep`, `hessian_seeds`).

References in float64: each model's dense Hessian on its own batch (`test_hessian.reference_hessian`),
and the `hessian` metric run on one model after another with the same generators.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from torch import nn

from phasediagram.accel import policy
from phasediagram.accel.hvp_lockstep import LockstepHessians
from phasediagram.data.datasets import Dataset, Split
from phasediagram.execution import jobs
from phasediagram.metrics import METRICS, MetricData
from phasediagram.metrics.hessian import HessianOptions, density_curve, hessian, hessian_seeds
from phasediagram.models import families as models
from phasediagram.numerics.hvp import HessianOperator
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout
from phasediagram.training import ensemble

from .test_hessian import reference_hessian

DT = torch.float64
# torch.func.hessian (the dense reference) loads TorchScript decompositions on first use and warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
SMALL = HessianOptions(lanczos_iters=30, trace_probes=6, hutchpp_sketch=2, density_iters=12, density_points=20)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cell_models(arch: str, width: int, n: int = 3) -> list[nn.Module]:
    """n models of one arch (own initialisations), BatchNorm with non-trivial running statistics."""
    out = []
    for s in range(n):
        torch.manual_seed(s)
        model = models.create(arch, width, (40,), 10).to(DT)
        g = seeded(10 + s)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=DT))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=DT))
        out.append(model.train())
    return out


def data(n: int = 96) -> MetricData:
    g = seeded(5)
    x, y = torch.randn(n + 32, 40, generator=g, dtype=DT), torch.randint(0, 10, (n + 32,), generator=g)
    return MetricData(Split(x[:n], y[:n]), Split(x[n:], y[n:]), 10)


def batches(n: int = 3, size: int = 24):
    g = seeded(7)
    return ([torch.randn(size, 40, generator=g, dtype=DT) for _ in range(n)],
            [torch.randint(0, 10, (size,), generator=g) for _ in range(n)])


@pytest.mark.parametrize("arch,width", [("resnet1d", 2), ("mlp", 4)])
def test_member_products_equal_each_models_dense_hessian(arch, width):
    ms = cell_models(arch, width)
    xs, ys = batches()
    for m in ms:
        m.eval()
    lockstep = LockstepHessians(ms, xs, ys)
    dense = [reference_hessian(m, x, y) for m, x, y in zip(ms, xs, ys)]
    vectors = [[torch.randn(lockstep.member(s).dim, generator=seeded(20 + 10 * s + k), dtype=DT) for k in range(s + 1)]
               for s in range(3)]  # members ask for 1, 2 and 3 products: the early ones leave the lockstep

    def task(s):
        return lambda op: [op(v) for v in vectors[s]]

    got = lockstep.run([task(s) for s in range(3)])
    for s in range(3):
        assert lockstep.member(s).n_products == s + 1
        for v, hv in zip(vectors[s], got[s]):
            assert torch.allclose(hv, dense[s] @ v, rtol=1e-10, atol=1e-12)
        assert torch.allclose(lockstep.member(s).gradient(), HessianOperator(ms[s], xs[s], ys[s]).gradient(),
                              rtol=1e-12, atol=1e-14)
    assert all(m.training is False for m in ms)


def test_a_failing_task_raises_and_the_others_finish():
    ms = [m.eval() for m in cell_models("resnet1d", 2)]
    xs, ys = batches()
    lockstep = LockstepHessians(ms, xs, ys)
    done = []

    def fails(op):
        op(torch.ones(op.dim, dtype=DT))
        raise ValueError("task 1 failed")

    def works(op):
        for _ in range(4):
            op(torch.ones(op.dim, dtype=DT))
        done.append(op)
        return op.n_products

    outcome = {}

    def call():
        try:
            lockstep.run([works, fails, works])
        except ValueError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the lockstep deadlocked"
    assert "task 1 failed" in str(outcome["error"]) and len(done) == 2


def assert_same_values(got: dict, ref: dict, rel: float) -> None:
    scalars = {k for k in ref if "density@" not in k}
    assert scalars <= set(got)
    for k in scalars:
        assert got[k] == pytest.approx(ref[k], rel=rel, abs=1e-12, nan_ok=True), k
    t_got, phi_got = density_curve(got)
    t_ref, phi_ref = density_curve(ref)
    assert len(t_ref) == SMALL.density_points
    assert torch.allclose(torch.tensor(t_got), torch.tensor(t_ref), rtol=rel, atol=1e-12)
    assert torch.allclose(torch.tensor(phi_got), torch.tensor(phi_ref), rtol=1e-6, atol=1e-9 * phi_ref.max())


@pytest.mark.parametrize("arch,width", [("resnet1d", 2), ("mlp", 4)])
@pytest.mark.parametrize("options", [SMALL, dataclasses.replace(SMALL, hutchpp_basis="sketch"),
                                     dataclasses.replace(SMALL, batch_size=None, chunk_size=40)],
                         ids=["krylov", "sketch", "chunks"])
def test_hessian_seeds_equal_hessian_seed_by_seed(arch, width, options):
    ms, d = cell_models(arch, width), data()
    ref = [hessian(m, d, options, seeded(100 + s)) for s, m in enumerate(ms)]
    got = hessian_seeds(ms, [d] * 3, options, [seeded(100 + s) for s in range(3)])
    for g, r in zip(got, ref):
        assert_same_values(g, r, 1e-8)
    assert all(m.training for m in ms)  # left as found


def test_a_diverged_seed_gives_nan_and_the_others_their_values():
    ms, d = cell_models("resnet1d", 2), data()
    with torch.no_grad():
        next(ms[1].parameters()).fill_(math.nan)
    got = hessian_seeds(ms, [d] * 3, SMALL, [seeded(100 + s) for s in range(3)])
    assert math.isnan(got[1]["train/top_eigenvalue"]) and math.isnan(got[1]["train/trace"])
    for s in (0, 2):
        assert_same_values(got[s], hessian(ms[s], d, SMALL, seeded(100 + s)), 1e-8)


def test_metric_group_size_rule():
    def spec(arch, mode):
        return ExperimentSpec(name="t", arch=arch, widths=(2, 8, 16), batch_sizes=(32,), seeds=(0, 1, 2), epochs=1,
                              metrics=(), ensemble=mode)

    def groups(arch, mode):
        s = spec(arch, mode)
        return [policy.metric_group_size(s, c) for c in s.cells()]

    assert groups("resnet1d", "auto") == [3, 3, 1]
    assert groups("resnet1d", "on") == [3, 3, 3]
    assert groups("resnet1d", "off") == [0, 0, 0]
    assert groups("mlp", "auto") == [0, 0, 0]
    assert groups("mlp", "on") == [3, 3, 3]


def job_rows_both_ways(tmp_path, monkeypatch, spec: ExperimentSpec, dataset: Dataset, field: str, group: int) -> tuple[dict[int, list[dict]], list[int]]:
    """Train spec's one cell (ensemble auto) in tmp_path, then run its metric job (spec.metrics[0]) with
    the registry entry's `group_size` forced to `group` and to 0: ({group: rows, 0: rows}, the sizes
    passed to the registry's `field` (compute_seeds / compute_pairs) in the grouped run)."""
    stage, cell, layout = spec.metrics[0], spec.cells()[0], Layout(tmp_path, spec.name)
    monkeypatch.setattr(jobs, "dataset_for", lambda *_: dataset)
    assert ensemble.train_cell_auto(spec, cell, layout, dataset, log=lambda *_: None) == {0: "ok", 1: "ok", 2: "ok"}
    rows, calls = {}, {group: [], 0: []}
    original = getattr(METRICS[stage], field)
    for size in (group, 0):
        counted = dataclasses.replace(METRICS[stage], group_size=lambda *_, size=size: size,
                                      **{field: lambda units, *a, size=size: calls[size].append(len(units))
                                         or original(units, *a)})
        monkeypatch.setitem(jobs.METRICS, stage, counted)
        rows[size] = jobs._metric_job(spec, layout, stage, cell, "cpu", jobs.CellModels(spec, layout, cell, "cpu",
                                                                                         log=lambda *_: None))
        for path in (layout.exp_dir / "state").rglob("*"):  # no resumable state: the other way starts afresh
            if path.is_file():
                path.unlink()
    assert calls[0] == []
    return rows, calls[group]


@pytest.mark.parametrize("group", [3, 2, 1])
def test_the_hessian_job_gives_the_same_rows_in_groups_or_seed_by_seed(tmp_path, monkeypatch, group):
    """The job's rows (float64 checkpoints of a trained width-2 cell) whichever way the seeds are computed."""
    spec = ExperimentSpec(name="t", arch="resnet1d", widths=(2,), batch_sizes=(32,), seeds=(0, 1, 2), epochs=1,
                          dtype="float64", metrics=("hessian",),
                          metric_options={"hessian": dataclasses.asdict(dataclasses.replace(SMALL, batch_size=48))})
    d = data()
    rows, calls = job_rows_both_ways(tmp_path, monkeypatch, spec, Dataset("mnist1d", d.train, d.test, 10),
                                     "compute_seeds", group)
    assert calls == [group] * (3 // group) + [3 % group] * (3 % group > 0)
    a = {(r["seed"], r["metric"], r["coord"]): r["value"] for r in rows[group] if r["metric"] != "density"}
    b = {(r["seed"], r["metric"], r["coord"]): r["value"] for r in rows[0] if r["metric"] != "density"}
    assert a.keys() == b.keys() and {k[0] for k in a} == {0, 1, 2} and len({k[1] for k in a}) >= 12
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-12), k
