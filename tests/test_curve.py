"""Mode connectivity: the Bezier curve's endpoints, BatchNorm recomputation, mc, resumable training."""

from __future__ import annotations

import copy
import importlib
import io
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from phasediagram.accel import policy
from phasediagram.data.datasets import Dataset, Split
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS, MetricData, key
from phasediagram.metrics.curve import (
    STATE_FILE,
    CurveOptions,
    bezier,
    curve,
    curve_pairs,
    line,
    lr_factor,
    mode_connectivity,
    model_at,
    recompute_bn,
    train_bend,
    train_bends,
)
from phasediagram.models import families as models
from phasediagram.numerics.sgd import sgd
from phasediagram.resolve import check, metric_options
from phasediagram.spec.experiment import ExperimentSpec

from .test_hvp_lockstep import job_rows_both_ways

curve_mod = importlib.import_module("phasediagram.metrics.curve")  # the package's `curve` is the function
N_TRAIN, N_TEST, LENGTH, CLASSES = 240, 60, 16, 3
# a tiny but real curve: 4 epochs of at most 3 SGD steps, 5 evaluation points
TINY = CurveOptions(epochs=4, batch_size=32, max_batches_per_epoch=3, eval_batch_size=128)


def make_data(state_dir=None) -> MetricData:
    """A learnable 3-class problem: the class is the sign pattern of two input coordinates, plus noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, LENGTH, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return MetricData(Split(x[:N_TRAIN], y[:N_TRAIN]), Split(x[N_TRAIN:], y[N_TRAIN:]), CLASSES, state_dir)


def make_model(arch, seed, width=4):
    torch.manual_seed(seed)
    return models.create(arch, width, (LENGTH,), CLASSES).double()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def random_like(theta, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in theta.items()}


class Interrupt(Exception):
    """A job killed after an epoch."""


def stop_after_two(epoch):
    if epoch == 2:
        raise Interrupt


# ------------------------------------------------------------------------------- the curve itself
def test_bezier_and_line_reproduce_endpoints_bit_for_bit():
    a, b = params(make_model("resnet1d", 0)), params(make_model("resnet1d", 1))
    m = random_like(a, 2)
    for path in (lambda t: bezier(a, m, b, t), lambda t: line(a, b, t)):
        assert all(torch.equal(path(0.0)[n], a[n]) for n in a)
        assert all(torch.equal(path(1.0)[n], b[n]) for n in a)
    mid = bezier(a, m, b, 0.5)
    assert all(torch.allclose(mid[n], 0.25 * a[n] + 0.5 * m[n] + 0.25 * b[n], rtol=0, atol=1e-15) for n in a)
    t = 0.3  # a general point: (1-t)^2, 2t(1-t), t^2
    assert all(torch.allclose(bezier(a, m, b, t)[n], 0.49 * a[n] + 0.42 * m[n] + 0.09 * b[n], rtol=0, atol=1e-14)
               for n in a)


def test_curve_endpoints_give_the_endpoint_models_outputs_mlp():
    """No BatchNorm: the model at t=0 / t=1 computes exactly model_a / model_b, in both code paths."""
    data = make_data()
    a, b = make_model("mlp", 0, 8), make_model("mlp", 1, 8)
    m = random_like(params(a), 3)
    x = data.train.x
    with torch.no_grad():
        for t, end in ((0.0, a), (1.0, b)):
            theta = bezier(params(a), m, params(b), t)
            assert torch.equal(model_at(a, theta, data.train)(x), end(x))
            assert torch.equal(functional_call(copy.deepcopy(a), theta, (x,)), end(x))  # the training path


def test_curve_endpoints_give_the_endpoint_models_outputs_batchnorm():
    """With BatchNorm: batch-statistics (train-mode) outputs are exactly the endpoint's; eval outputs
    equal the endpoint model's after recomputing its statistics the same way."""
    data = make_data()
    a, b = make_model("resnet1d", 0), make_model("resnet1d", 1)
    m = random_like(params(a), 4)
    x = data.train.x[:64]
    with torch.no_grad():
        for t, end in ((0.0, a), (1.0, b)):
            at_t = model_at(a, bezier(params(a), m, params(b), t), data.train, 32)
            reference = copy.deepcopy(end)
            recompute_bn(reference, data.train, 32)
            reference.eval()
            assert not at_t.training and not reference.training
            assert torch.equal(at_t(x), reference(x))
            assert torch.equal(at_t.train()(x), copy.deepcopy(end).train()(x))
            net = copy.deepcopy(a).train()
            assert torch.equal(functional_call(net, bezier(params(a), m, params(b), t), (x,)),
                               copy.deepcopy(end).train()(x))


def test_recompute_bn_is_the_cumulative_average_of_batch_statistics():
    x = torch.randn(96, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1
    bn = nn.BatchNorm1d(3).double()
    model = nn.Sequential(nn.Identity(), bn)
    bn.running_mean.fill_(7.0)
    model.train()
    model[0].eval()
    recompute_bn(model, Split(x, torch.zeros(96, dtype=torch.long)), 32)
    batches = x.view(3, 32, 3)
    assert torch.allclose(bn.running_mean, x.mean(0), rtol=0, atol=1e-12)  # equal batches: mean of means
    assert torch.allclose(bn.running_var, batches.var(1, unbiased=True).mean(0), rtol=0, atol=1e-12)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    assert model.training and bn.training and not model[0].training


def test_lr_schedule():
    """Epochs counted from 1, as the reference's loop (`for epoch in range(1, epochs + 1)`) calls it."""
    assert [lr_factor(e, 10) for e in (1, 5)] == [1.0, 1.0]
    assert lr_factor(6, 10) == pytest.approx(1 - 0.99 * 0.25, abs=1e-12)
    assert lr_factor(7, 10) == pytest.approx(1 - 0.99 * 0.5, abs=1e-12)
    assert lr_factor(9, 10) == pytest.approx(0.01, abs=1e-12)
    assert lr_factor(90, 100) == pytest.approx(0.01, abs=1e-12)
    factors = [lr_factor(e, 50) for e in range(1, 51)]
    assert factors[24] == 1.0 and factors[25] < 1.0 and factors[-1] == pytest.approx(0.01)
    assert all(x >= y for x, y in zip(factors, factors[1:]))


def reference_bend(model_a, model_b, train, options, generator):
    """The reference's curve training written out independently (the taxonomy repository's
    Mode_connectivity.py on dnn-mode-connectivity's curves.py), with this toolkit's random draws:
    torch.optim.SGD on the middle bend only, momentum, weight_decay=0; loss = CE + 0.5 wd sum ||w(t)||^2
    with w(t) = sum_k binom(2, k) t^k (1 - t)^(2 - k) w_k; lr = base * schedule(epoch) for epoch = 1..E;
    one t ~ U(0, 1) per batch."""
    def schedule(epoch, total):
        alpha = epoch / total
        return 1.0 if alpha <= 0.5 else (1.0 - (alpha - 0.5) / 0.4 * 0.99 if alpha <= 0.9 else 0.01)

    ends = [dict(model_a.named_parameters()), dict(model_b.named_parameters())]
    w0, w2 = ({n: p.detach().clone() for n, p in e.items()} for e in ends)
    w1 = {n: ((w0[n] + w2[n]) / 2).requires_grad_(True) for n in w0}
    opt = torch.optim.SGD(list(w1.values()), lr=options.lr, momentum=options.momentum, weight_decay=0.0)
    net = copy.deepcopy(model_a).train()
    n = len(train)
    for epoch in range(1, options.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = options.lr * schedule(epoch, options.epochs)
        perm = torch.randperm(n, generator=generator)
        steps = -(-n // options.batch_size)
        for b in range(min(steps, options.max_batches_per_epoch or steps)):
            idx = perm[b * options.batch_size:(b + 1) * options.batch_size]
            t = float(torch.rand((), generator=generator))
            coeffs = [(1 - t) ** 2, 2 * t * (1 - t), t ** 2]
            point = {k: coeffs[0] * w0[k] + coeffs[1] * w1[k] + coeffs[2] * w2[k] for k in w0}
            loss = nn.functional.cross_entropy(functional_call(net, point, (train.x[idx],)), train.y[idx])
            loss = loss + 0.5 * options.weight_decay * sum((v ** 2).sum() for v in point.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in w1.items()}


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_bend_training_is_the_reference_step(arch):
    """train_bend and the ensemble's train_bends equal an independent re-implementation of the reference's
    curve training (schedule from epoch 1, L2 on the curve point, optimizer without weight decay) in
    float64, with a weight decay large enough to matter."""
    data = make_data()
    a, b = make_model(arch, 0), make_model(arch, 1)
    options = CurveOptions(epochs=5, lr=0.05, weight_decay=0.05, batch_size=32, max_batches_per_epoch=4)
    expected = reference_bend(a, b, data.train, options, torch.Generator().manual_seed(3))
    alone = train_bend(a, b, data.train, options, torch.Generator().manual_seed(3))
    together = train_bends([(a, b), (b, a)], data.train, options,
                           [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)], [None, None])[0]
    midpoint = {n: (p + q) / 2 for (n, p), q in zip(params(a).items(), params(b).values())}
    assert max(float((expected[n] - midpoint[n]).abs().max()) for n in expected) > 1e-3  # it did train
    for got in (alone, together):
        assert max(float((got[n] - expected[n]).abs().max()) for n in expected) < 1e-10


def test_random_bend_init_is_a_fresh_seeded_initialisation():
    """bend_init="random" (the taxonomy repository's choice): the bend starts at reset_parameters() of the
    architecture, drawn from the metric's generator: reproducible, different per generator, not the midpoint,
    and torch's global generator is left as it was."""
    data, a, b = make_data(), make_model("resnet1d", 0), make_model("resnet1d", 1)
    options = replace(TINY, epochs=0, bend_init="random")
    state = torch.random.get_rng_state()
    first = train_bend(a, b, data.train, options, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    again = train_bend(a, b, data.train, options, torch.Generator().manual_seed(1))
    other = train_bend(a, b, data.train, options, torch.Generator().manual_seed(2))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first if n.endswith("weight"))
    midpoint = {n: (p + q) / 2 for (n, p), q in zip(params(a).items(), params(b).values())}
    assert all(not torch.allclose(first[n], midpoint[n]) for n in first if "conv" in n or "fc" in n)
    fresh = make_model("resnet1d", 7)
    for n, p in fresh.named_parameters():  # the same family of initial values: conv weights within +-1/sqrt(fan_in)
        if p.dim() == 3:
            bound = 1 / (p.shape[1] * p.shape[2]) ** 0.5
            assert float(first[n].abs().max()) <= bound + 1e-12
    with pytest.raises(SpecError, match="bend_init"):
        CurveOptions(bend_init="zero")


@pytest.mark.parametrize("errors, mc, k", [
    ([10.0, 30.0, 12.0], -19.0, 1),       # a barrier
    ([10.0, 5.0, 2.0, 12.0], 9.0, 2),     # lower error inside: endpoints not minima
    ([4.0, 4.0, 4.0, 4.0, 4.0], 0.0, 0),  # flat
    ([2.0, 3.0, 20.0], 9.0, 0),           # no interior point beyond the endpoints: first maximiser, (e1 - e0) / 2
])
def test_mode_connectivity_formula(errors, mc, k):
    assert mode_connectivity(errors) == (mc, k)


# ------------------------------------------------------------------------------- the metric
def test_identical_endpoints_give_zero_mc():
    data, a = make_data(), make_model("resnet1d", 0)
    out = curve(a, copy.deepcopy(a), data, replace(TINY, epochs=0), torch.Generator().manual_seed(0))
    assert out[key("train", "mc")] == 0.0 and out[key("train", "mc_linear")] == 0.0
    errs = {out[key("train", "err", t)] for t in TINY.ts} | {out[key("train", "err_linear", t)] for t in TINY.ts}
    assert len(errs) == 1


def test_training_the_bend_lowers_the_loss_in_the_middle():
    """Two MLPs trained to different minima: the trained curve's midpoint beats the straight line's."""
    data = make_data()
    ends = []
    for seed in (0, 1):
        model = make_model("mlp", seed, 16)
        opt = sgd(model.parameters(), lr=0.2, momentum=0.9)
        for _ in range(150):  # full-batch heavy-ball descent to a near-zero training loss
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(data.train.x), data.train.y).backward()
            opt.step()
        ends.append(model)
    out = curve(*ends, data, CurveOptions(epochs=10, lr=0.05, batch_size=32), torch.Generator().manual_seed(0))
    # the untrained bend (the midpoint) makes the Bezier curve a reparametrised straight line
    for t in (0.25, 0.5, 0.75):
        assert out[key("train", "loss", t)] < 0.6 * out[key("train", "loss_linear", t)]
    assert out[key("train", "mc_linear")] < out[key("train", "mc")] <= 0.0  # a barrier, lowered by training


def test_interrupted_curve_resumes_to_the_uninterrupted_result(tmp_path):
    a, b = make_model("resnet1d", 0), make_model("resnet1d", 1)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731  (the job's generator, same seed each attempt)
    full = curve(a, b, make_data(tmp_path / "full"), TINY, gen())
    assert (tmp_path / "full" / STATE_FILE).is_file()
    assert curve(a, b, make_data(None), TINY, gen()) == full  # writing state does not change the result

    with pytest.raises(Interrupt):
        curve(a, b, make_data(tmp_path / "cut"), TINY, gen(), on_epoch=stop_after_two)
    saved = (tmp_path / "cut" / STATE_FILE).read_bytes()
    assert torch.load(io.BytesIO(saved[8 + 32:]), weights_only=True)["epoch"] == 2  # magic, sha256, payload
    epochs_run = []
    assert curve(a, b, make_data(tmp_path / "cut"), TINY, gen(), on_epoch=epochs_run.append) == full
    assert epochs_run == [3, 4]  # resumed at the third epoch
    epochs_run.clear()
    assert curve(a, b, make_data(tmp_path / "cut"), TINY, gen(), on_epoch=epochs_run.append) == full
    assert epochs_run == []  # finished state: no more training


def test_state_of_other_options_or_corrupt_state_is_not_used(tmp_path):
    a, b = make_model("mlp", 0), make_model("mlp", 1)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    data = make_data(tmp_path)
    curve(a, b, data, TINY, gen())
    other = replace(TINY, lr=0.05)
    assert curve(a, b, data, other, gen()) == curve(a, b, make_data(None), other, gen())
    (tmp_path / STATE_FILE).write_bytes(b"PDCURVE1 truncated")
    with pytest.warns(UserWarning, match="corrupt curve state"):
        assert curve(a, b, data, TINY, gen()) == curve(a, b, make_data(None), TINY, gen())


def test_no_state_is_written_without_a_state_dir(monkeypatch):
    def refuse(*args):
        raise AssertionError("state written")

    monkeypatch.setattr(curve_mod, "_write_state", refuse)
    a, b = make_model("mlp", 0), make_model("mlp", 1)
    bend = train_bend(a, b, make_data().train, TINY, torch.Generator().manual_seed(0), state_dir=None)
    assert set(bend) == {n for n, _ in a.named_parameters()}
    assert all(not v.requires_grad for v in bend.values())


def test_bend_starts_at_the_midpoint():
    a, b = make_model("mlp", 0), make_model("mlp", 1)
    bend = train_bend(a, b, make_data().train, replace(TINY, epochs=0), torch.Generator().manual_seed(0))
    pa, pb = params(a), params(b)
    assert all(torch.equal(bend[n], (pa[n] + pb[n]) / 2) for n in pa)


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_registry_contract(arch):
    """Finite floats with the documented keys; parameters, buffers and per-module train/eval flags
    unchanged; the same seed gives the same result."""
    metric = METRICS["curve"]
    assert metric.kind == "pair" and metric.options is CurveOptions
    data, a, b = make_data(), make_model(arch, 0), make_model(arch, 1)
    a.train()
    b.eval()
    list(b.modules())[2].train()
    flags = [[m.training for m in model.modules()] for model in (a, b)]
    states = [copy.deepcopy(model.state_dict()) for model in (a, b)]
    opts = replace(TINY, epochs=2, points=3)
    out = metric.compute(a, b, data, opts, torch.Generator().manual_seed(1))
    assert out == metric.compute(a, b, data, opts, torch.Generator().manual_seed(1))
    expected = {key(s, q, t) for s in ("train", "test") for q in ("loss", "err", "loss_linear", "err_linear")
                for t in (0.0, 0.5, 1.0)}
    expected |= {key("train", q) for q in ("mc", "mc_t", "mc_linear", "mc_linear_t")}
    assert set(out) == expected
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in out.values())
    assert all(0.0 <= out[k] <= 100.0 for k in out if "/err" in k)
    assert [[m.training for m in model.modules()] for model in (a, b)] == flags
    for model, state in zip((a, b), states):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    without_line = metric.compute(a, b, data, replace(opts, linear=False), torch.Generator().manual_seed(1))
    assert without_line == {k: v for k, v in out.items() if "linear" not in k}
    mc_panel = next(p for p in metric.panels if p.quantity == "mc")
    assert mc_panel.center == 0.0 and mc_panel.split == "train"


def test_eval_examples_caps_the_evaluation():
    data, a, b = make_data(), make_model("mlp", 0), make_model("mlp", 1)
    opts = replace(TINY, epochs=0, linear=False, eval_examples=N_TEST)
    head = MetricData(Split(data.train.x[:N_TEST], data.train.y[:N_TEST]), data.test, CLASSES)
    assert curve(a, b, data, opts, torch.Generator()) == curve(a, b, head, replace(opts, eval_examples=0),
                                                               torch.Generator())


def test_defaults_are_the_reference_setting():
    o = CurveOptions()
    assert (o.epochs, o.lr, o.momentum, o.weight_decay, o.batch_size, o.max_batches_per_epoch) == \
        (50, 0.01, 0.9, 5e-4, 128, 0)
    assert o.ts == [0.0, 0.25, 0.5, 0.75, 1.0] and o.pairs == "adjacent" and o.eval_examples == 0


@pytest.mark.parametrize("bad", [
    dict(epochs=-1), dict(epochs=2.5), dict(lr=0.0), dict(lr=float("nan")), dict(momentum=1.0), dict(momentum=-0.1),
    dict(weight_decay=-1e-4), dict(batch_size=1), dict(max_batches_per_epoch=-1), dict(points=2),
    dict(linear="yes"), dict(eval_examples=-1), dict(eval_batch_size=0), dict(pairs="every"),
])
def test_out_of_range_options_raise(bad):
    with pytest.raises(SpecError, match="metric_options.curve." + next(iter(bad))):
        CurveOptions(**bad)


def test_spec_validates_curve_options():
    spec = ExperimentSpec(metrics=("curve",), metric_options={"curve": {"epochs": 3, "max_batches_per_epoch": 2}})
    assert metric_options(spec, "curve").epochs == 3
    with pytest.raises(SpecError, match="epochs"):
        check(ExperimentSpec(metrics=("curve",), metric_options={"curve": {"epochs": -1}}))


# ------------------------------------------------------------------------------- pairs trained together
def three_pairs(arch):
    ms = [make_model(arch, s) for s in range(4)]
    return [(ms[0], ms[1]), (ms[1], ms[2]), (ms[2], ms[3])]


def pair_generators():
    return [torch.Generator().manual_seed(10 + i) for i in range(3)]


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_bends_trained_together_equal_their_sequential_runs(arch):
    """float64: each pair's bend, and its curve's values, as `train_bend` / `curve` give them alone,
    to rounding (the ensemble sums in another order than nn.Conv1d; observed ~5e-15)."""
    data, pairs = make_data(), three_pairs(arch)
    states = [[copy.deepcopy(m.state_dict()) for m in pair] for pair in pairs]
    alone = [train_bend(a, b, data.train, TINY, g) for (a, b), g in zip(pairs, pair_generators())]
    together = train_bends(pairs, data.train, TINY, pair_generators(), [None] * 3)
    for (a, b), bend_alone, bend in zip(pairs, alone, together):
        assert bend.keys() == bend_alone.keys()
        assert all(torch.allclose(bend[n], bend_alone[n], rtol=1e-12, atol=1e-14) for n in bend)
        midpoint = {n: (params(a)[n] + params(b)[n]) / 2 for n in bend}
        assert any(not torch.allclose(bend[n], midpoint[n]) for n in bend)  # trained, not the start
    values = curve_pairs(pairs, [data] * 3, TINY, pair_generators())
    for v, (a, b), g in zip(values, pairs, pair_generators()):
        ref = curve(a, b, data, TINY, g)
        assert v.keys() == ref.keys()
        assert all(v[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-12) for k in ref)
    for pair, saved in zip(pairs, states):  # the models are left as they were
        for m, state in zip(pair, saved):
            assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_pairs_interrupted_together_resume_to_the_uninterrupted_result(tmp_path):
    data, pairs = make_data(), three_pairs("resnet1d")
    full = train_bends(pairs, data.train, TINY, pair_generators(), [None] * 3)
    dirs = [tmp_path / f"pair{i}" for i in range(3)]

    with pytest.raises(Interrupt):
        train_bends(pairs, data.train, TINY, pair_generators(), dirs, on_epoch=stop_after_two)
    saved = [(d / STATE_FILE).read_bytes() for d in dirs]  # each pair's own state, as `train_bend` writes it
    assert all(torch.load(io.BytesIO(b[8 + 32:]), weights_only=True)["epoch"] == 2 for b in saved)
    epochs_run = []
    resumed = train_bends(pairs, data.train, TINY, pair_generators(), dirs, on_epoch=epochs_run.append)
    assert epochs_run == [3, 4]
    assert all(torch.equal(r[n], f[n]) for r, f in zip(resumed, full) for n in f)

    for d, b in zip(dirs, saved):  # pairs at different epochs: 2, 0 (no state), 2
        (d / STATE_FILE).write_bytes(b)
    (dirs[1] / STATE_FILE).unlink()
    epochs_run.clear()
    mixed = train_bends(pairs, data.train, TINY, pair_generators(), dirs, on_epoch=epochs_run.append)
    assert epochs_run == [3, 4, 1, 2, 3, 4, 3, 4]  # one pair after another
    assert all(torch.allclose(m[n], f[n], rtol=1e-12, atol=1e-14) for m, f in zip(mixed, full) for n in f)


def test_pair_group_size_rule():
    def groups(arch, mode, width=2, batch_size=128):
        spec = ExperimentSpec(name="t", arch=arch, widths=(width,), batch_sizes=(32,), seeds=(0, 1, 2), epochs=1,
                              metrics=(), ensemble=mode)
        return policy.pair_group_size(spec, spec.cells()[0], batch_size, 3)

    assert (groups("resnet1d", "auto"), groups("resnet1d", "on"), groups("resnet1d", "off")) == (3, 3, 0)
    assert groups("resnet1d", "auto", width=64) == 2 and groups("resnet1d", "auto", width=64, batch_size=256) == 1
    assert groups("resnet1d", "auto", width=256) == 0  # beyond RESNET1D_ALONE_MAX_WIDTH: pair by pair
    assert (groups("mlp", "auto", width=16), groups("mlp", "auto", width=256), groups("mlp", "on", width=256)) == (3, 0, 3)
    assert groups("resnet18", "auto") == 0 and groups("resnet18", "on") == 3  # the 2D form exists; auto skips it


@pytest.mark.parametrize("group", [3, 1])
def test_the_curve_job_gives_the_same_rows_in_groups_or_pair_by_pair(tmp_path, monkeypatch, group):
    """The job's rows (float64 checkpoints of a trained width-2 cell, all three pairs) either way."""
    spec = ExperimentSpec(name="t", arch="resnet1d", widths=(2,), batch_sizes=(32,), seeds=(0, 1, 2), epochs=1,
                          dtype="float64", metrics=("curve",),
                          metric_options={"curve": dict(epochs=2, batch_size=32, max_batches_per_epoch=3,
                                                        eval_examples=60, pairs="all")})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 40, generator=g, dtype=torch.float64), torch.randint(0, 10, (300,), generator=g)
    dataset = Dataset("mnist1d", Split(x[:240], y[:240]), Split(x[240:], y[240:]), 10)
    rows, calls = job_rows_both_ways(tmp_path, monkeypatch, spec, dataset, "compute_pairs", group)
    assert calls == [group] * (3 // group)
    a = {(r["seed"], r["seed_b"], r["metric"], r["coord"]): r["value"] for r in rows[group]}
    b = {(r["seed"], r["seed_b"], r["metric"], r["coord"]): r["value"] for r in rows[0]}
    assert a.keys() == b.keys() and {k[:2] for k in a} == {(0, 1), (0, 2), (1, 2)}
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-10, abs=1e-10), k
