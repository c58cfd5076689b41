"""Training methods of issue 4: SAM/ASAM, Entropy-SGD, Replicated-SGD, InfoMCR and NRS regularizers.

Every reduction and definition is checked against an independent float64 computation (torch.func
on a parameter dict) with explicit tolerances; every method round-trips through a
weights_only state_dict, and trains (and resumes) a tiny spec end to end through train_seed.
"""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from torch.func import functional_call
from torch.func import grad as func_grad
from torch.nn import functional as F

from phasediagram import cli
from phasediagram.analysis import table
from phasediagram.data import datasets as data
from phasediagram.errors import SpecError
from phasediagram.execution.inprocess import run_inprocess
from phasediagram.execution.jobs import stage_jobs
from phasediagram.methods import OPTIMIZERS, REGULARIZERS, build_method
from phasediagram.methods.infomcr import InfoMCR, InfoMCROptions
from phasediagram.methods.nrs import NRS, NRSOptions
from phasediagram.models import families as models
from phasediagram.seeding import stable_seed
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.training import train

from .conftest import tiny_spec

F64 = torch.float64
EXACT = dict(rtol=0, atol=0)
TIGHT = dict(rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- helpers
def make_model(arch: str = "mlp", width: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create(arch, width, (40,), 10).to(F64).train()


def batch(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g, dtype=F64), torch.randint(0, 10, (n,), generator=g)


def build(model, optimizer="sgd", optimizer_options=None, regularizer="none", regularizer_options=None, *,
          lr=0.1, momentum=0.9, weight_decay=5e-4, seed=0):
    spec = ExperimentSpec(name="t", arch="mlp", widths=(4,), batch_sizes=(64,), seeds=(0,), epochs=3,
                          momentum=momentum, optimizer=optimizer, optimizer_options=optimizer_options or {},
                          regularizer=regularizer, regularizer_options=regularizer_options or {},
                          metrics=("loss_acc",))
    return build_method(spec, model, lr=lr, weight_decay=weight_decay, seed=seed)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ce_fn(model, x, y, buffers=None):
    """w (a dict) -> CE(f(x; w), y), through functional_call on copies of the buffers."""
    def loss(w):
        bufs = {n: b.clone() for n, b in (buffers or dict(model.named_buffers())).items()}
        return F.cross_entropy(functional_call(model, {**w, **bufs}, (x,)), y)
    return loss


def assert_state_equal(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or EXACT), msg=lambda m, k=k: f"{k}: {m}")


def sgd_reference(model, steps, *, lr=0.1, momentum=0.9, weight_decay=5e-4, scale=lambda epoch: 1.0):
    """Train `model` with torch.optim.SGD on scale(epoch) * CE over (x, y, epoch) in `steps`."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for x, y, epoch in steps:
        opt.zero_grad(set_to_none=True)
        (scale(epoch) * F.cross_entropy(model(x), y)).backward()
        opt.step()
    return model


STEPS = [(*batch(1), 0), (*batch(2), 0), (*batch(3), 1), (*batch(4), 2)]


# ----------------------------------------------------------------------------- registry and options
def test_registered_with_options_and_descriptions():
    for name in ("sam", "entropy_sgd", "replicated_sgd"):
        assert name in OPTIMIZERS and OPTIMIZERS[name].description and not OPTIMIZERS[name].ensemble_ok
    for name in ("infomcr", "nrs"):
        assert name in REGULARIZERS and REGULARIZERS[name].description and not REGULARIZERS[name].ensemble_ok


@pytest.mark.parametrize("kind, name, options, field", [
    ("optimizer", "sam", {"rho": -0.1}, "optimizer_options.rho"),
    ("optimizer", "sam", {"rho": float("inf")}, "optimizer_options.rho"),
    ("optimizer", "sam", {"adaptive": "yes"}, "optimizer_options.adaptive"),
    ("optimizer", "sam", {"eta": -1}, "optimizer_options.eta"),
    ("optimizer", "sam", {"radius": 0.1}, "optimizer_options"),
    ("optimizer", "entropy_sgd", {"L": 0}, "optimizer_options.L"),
    ("optimizer", "entropy_sgd", {"L": 2.5}, "optimizer_options.L"),
    ("optimizer", "entropy_sgd", {"inner_lr": 0}, "optimizer_options.inner_lr"),
    ("optimizer", "entropy_sgd", {"noise": -1e-4}, "optimizer_options.noise"),
    ("optimizer", "entropy_sgd", {"alpha": 0}, "optimizer_options.alpha"),
    ("optimizer", "entropy_sgd", {"alpha": 1.5}, "optimizer_options.alpha"),
    ("optimizer", "entropy_sgd", {"gamma0": float("nan")}, "optimizer_options.gamma0"),
    ("optimizer", "entropy_sgd", {"gamma1": -0.1}, "optimizer_options.gamma1"),
    ("optimizer", "replicated_sgd", {"y": 0}, "optimizer_options.y"),
    ("optimizer", "replicated_sgd", {"y": True}, "optimizer_options.y"),
    ("optimizer", "replicated_sgd", {"batch": "half"}, "optimizer_options.batch"),
    ("optimizer", "replicated_sgd", {"gamma0": -1}, "optimizer_options.gamma0"),
    ("optimizer", "replicated_sgd", {"init_noise": -0.1}, "optimizer_options.init_noise"),
    ("regularizer", "infomcr", {"alpha": 0}, "regularizer_options.alpha"),
    ("regularizer", "infomcr", {"beta": -1}, "regularizer_options.beta"),
    ("regularizer", "infomcr", {"M": 0}, "regularizer_options.M"),
    ("regularizer", "infomcr", {"start_epoch": -1}, "regularizer_options.start_epoch"),
    ("regularizer", "infomcr", {"start_epoch": "late"}, "regularizer_options.start_epoch"),
    ("regularizer", "nrs", {"rho": -0.1}, "regularizer_options.rho"),
    ("regularizer", "nrs", {"alpha": float("nan")}, "regularizer_options.alpha"),
    ("regularizer", "nrs", {"n_neighbours": 0}, "regularizer_options.n_neighbours"),
    ("regularizer", "nrs", {"k": 3}, "regularizer_options"),
])
def test_bad_options_fail_at_spec_construction(kind, name, options, field):
    with pytest.raises(SpecError) as info:
        tiny_spec(**{kind: name, f"{kind}_options": options})
    assert info.value.field == field


def test_cli_options_reach_spec_json_and_checkpoint_identity():
    argv = ["--name", "m", "--arch", "mlp", "--optimizer", "entropy_sgd", "--optimizer-option", "L=2",
            "--optimizer-option", "noise=0", "--regularizer", "nrs", "--regularizer-option", "rho=0.1"]
    spec = cli.spec_from_args(cli.build_parser().parse_args(argv))
    assert spec.optimizer == "entropy_sgd" and dict(spec.optimizer_options) == {"L": 2, "noise": 0}
    assert spec.regularizer == "nrs" and dict(spec.regularizer_options) == {"rho": 0.1}
    assert ExperimentSpec.from_dict(json.loads(spec.to_json())) == spec
    other = cli.spec_from_args(cli.build_parser().parse_args(argv[:-1] + ["rho=0.2"]))
    assert other.training_hash() != spec.training_hash()
    with pytest.raises(SpecError, match="optimizer_options.L"):
        cli.spec_from_args(cli.build_parser().parse_args(argv[:7] + ["L=two"]))


# ----------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_rho_zero_is_sgd_bit_for_bit(arch, adaptive):
    model = make_model(arch, 2)
    ref = sgd_reference(copy.deepcopy(model), STEPS)
    method = build(model, "sam", {"rho": 0.0, "adaptive": adaptive})
    for x, y, epoch in STEPS:
        method.step(x, y, epoch)
    assert_state_equal(method.model.state_dict(), ref.state_dict())  # parameters and BatchNorm buffers


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_its_definition(adaptive):
    rho, eta, lr, wd = 0.3, 0.01, 0.1, 5e-4
    model = make_model()
    x, y, _ = STEPS[0]
    w = params_of(model)
    loss = ce_fn(model, x, y)
    g = func_grad(loss)(w)
    t = {n: (w[n].abs() + eta) if adaptive else torch.ones_like(w[n]) for n in w}
    norm = math.sqrt(sum(float(((t[n] * g[n]) ** 2).sum()) for n in w))
    e = {n: rho * t[n] ** 2 * g[n] / norm for n in w}
    g_adv = func_grad(loss)({n: w[n] + e[n] for n in w})
    expected = {n: w[n] - lr * (g_adv[n] + wd * w[n]) for n in w}
    method = build(model, "sam", {"rho": rho, "adaptive": adaptive, "eta": eta}, momentum=0.0, lr=lr,
                   weight_decay=wd)
    assert method.step(x, y, 0) == pytest.approx(float(loss(w)), rel=1e-14)
    assert_state_equal(params_of(model), expected, **TIGHT)


# ----------------------------------------------------------------------------- Entropy-SGD
@pytest.mark.parametrize("scale_by_gamma", [False, True])
def test_entropy_sgd_with_one_step_and_no_noise_is_sgd_on_the_scaled_loss(scale_by_gamma):
    """Closed form: L = 1, eps = 0 -> d = alpha eta' grad L(w) (x gamma_t): SGD on alpha eta' [gamma_t] L."""
    o = {"L": 1, "noise": 0.0, "alpha": 0.3, "inner_lr": 0.2, "gamma0": 0.5, "gamma1": 1.0,
         "scale_by_gamma": scale_by_gamma}
    model = make_model()

    def scale(epoch):
        return o["alpha"] * o["inner_lr"] * (o["gamma0"] * (1 + o["gamma1"]) ** epoch if scale_by_gamma else 1.0)

    ref = sgd_reference(copy.deepcopy(model), STEPS, scale=scale)
    method = build(model, "entropy_sgd", o)
    for x, y, epoch in STEPS:
        method.step(x, y, epoch)
    assert_state_equal(model.state_dict(), ref.state_dict(), **TIGHT)


def test_entropy_sgd_step_matches_its_definition():
    L, eta_in, alpha, gamma, lr, wd = 3, 0.5, 0.4, 2.0, 0.1, 5e-4
    model = make_model()
    x, y, _ = STEPS[0]
    w = params_of(model)
    grad_loss = func_grad(ce_fn(model, x, y))
    wp, mu = dict(w), dict(w)
    for _ in range(L):
        g = grad_loss(wp)
        wp = {n: wp[n] - eta_in * (g[n] + gamma * (wp[n] - w[n])) for n in w}
        mu = {n: (1 - alpha) * mu[n] + alpha * wp[n] for n in w}
    expected = {n: w[n] - lr * ((w[n] - mu[n]) + wd * w[n]) for n in w}
    method = build(model, "entropy_sgd", {"L": L, "noise": 0.0, "inner_lr": eta_in, "alpha": alpha,
                                          "gamma0": gamma, "gamma1": 0.0}, momentum=0.0, lr=lr, weight_decay=wd)
    method.step(x, y, 3)
    assert_state_equal(params_of(model), expected, **TIGHT)


def test_entropy_sgd_scoping_and_noise():
    method = build(make_model(), "entropy_sgd", {"gamma0": 0.03, "gamma1": 0.1})
    assert method.gamma(0) == pytest.approx(0.03) and method.gamma(10) == pytest.approx(0.03 * 1.1 ** 10)
    finals = []
    for seed in (0, 0, 1):
        model = make_model()
        method = build(model, "entropy_sgd", {"L": 2, "noise": 1e-2}, seed=seed)
        method.step(*STEPS[0][:2], 0)
        finals.append(params_of(model))
    assert_state_equal(finals[0], finals[1])
    assert not torch.equal(finals[0]["net.1.weight"], finals[2]["net.1.weight"])


# ----------------------------------------------------------------------------- Replicated-SGD
@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
@pytest.mark.parametrize("mode", ["split", "shared"])
def test_replicated_sgd_one_replica_no_coupling_is_sgd_bit_for_bit(arch, mode):
    model = make_model(arch, 2)
    ref = sgd_reference(copy.deepcopy(model), STEPS)
    method = build(model, "replicated_sgd", {"y": 1, "gamma0": 0.0, "batch": mode})
    for x, y, epoch in STEPS:
        method.step(x, y, epoch)
    assert method.model is model
    assert_state_equal(model.state_dict(), ref.state_dict())


def test_replicated_sgd_identical_replicas_on_a_shared_batch_stay_sgd():
    """Two unperturbed replicas on one batch never separate, so the coupling vanishes whatever gamma is."""
    model = make_model()
    ref = sgd_reference(copy.deepcopy(model), STEPS)
    method = build(model, "replicated_sgd", {"y": 2, "gamma0": 5.0, "batch": "shared"})
    for x, y, epoch in STEPS:
        method.step(x, y, epoch)
    assert_state_equal(model.state_dict(), ref.state_dict())


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_replicated_sgd_step_matches_its_definition(arch):
    """w_a <- w_a - lr (grad L_a(w_a) + wd w_a + (2 gamma / y)(w_a - w_c)), shard a for replica a; centre = mean."""
    y_rep, gamma0, gamma1, epoch, lr, wd = 3, 0.5, 1.0, 1, 0.1, 5e-4
    gamma = gamma0 * (1 + gamma1) ** epoch
    model = make_model(arch, 2)
    method = build(model, "replicated_sgd", {"y": y_rep, "gamma0": gamma0, "gamma1": gamma1, "init_noise": 0.1},
                   momentum=0.0, lr=lr, weight_decay=wd)
    ws = [params_of(r) for r in method.replicas]
    bufs = [{n: b.clone() for n, b in r.named_buffers()} for r in method.replicas]
    centre = {n: torch.stack([w[n] for w in ws]).mean(0) for n in ws[0]}
    assert_state_equal(params_of(model), centre, **TIGHT)
    assert not torch.equal(ws[0]["head.weight" if arch == "resnet1d" else "net.1.weight"],
                           ws[1]["head.weight" if arch == "resnet1d" else "net.1.weight"])
    x, y, _ = STEPS[0]
    expected = []
    for w, b, xs, ys in zip(ws, bufs, x.tensor_split(y_rep), y.tensor_split(y_rep)):
        g = func_grad(ce_fn(model, xs, ys, b))(w)
        expected.append({n: w[n] - lr * (g[n] + wd * w[n] + 2 * gamma / y_rep * (w[n] - centre[n])) for n in w})
    method.step(x, y, epoch)
    for replica, exp in zip(method.replicas, expected):
        assert_state_equal(params_of(replica), exp, **TIGHT)
    assert_state_equal(params_of(model), {n: torch.stack([e[n] for e in expected]).mean(0) for n in centre}, **TIGHT)
    for name, buf in model.named_buffers():  # the centre's BatchNorm statistics: the replicas' mean
        reps = torch.stack([dict(r.named_buffers())[name] for r in method.replicas])
        torch.testing.assert_close(buf, reps.mean(0) if buf.is_floating_point() else reps[0], **TIGHT)


def test_replicated_sgd_split_needs_enough_examples():
    method = build(make_model(), "replicated_sgd", {"y": 4})
    with pytest.raises(ValueError, match="at least y=4"):
        method.step(*batch(0, n=3), 0)


# ----------------------------------------------------------------------------- InfoMCR
def infomcr_reference(model, x, y, alpha, beta, M):
    """Value and gradient of beta mean_m [L_m(w) - L_m(w - alpha g_m)], g_m = grad L_m(w) held constant.

    grad = beta mean_m [g_m - grad L_m(w - alpha g_m)] (the stop-gradient makes the shift a constant).
    """
    w = params_of(model)
    value, grads = 0.0, {n: torch.zeros_like(p) for n, p in w.items()}
    parts = list(zip(x.tensor_split(M), y.tensor_split(M)))
    for xm, ym in parts:
        loss = ce_fn(model, xm, ym)
        g = func_grad(loss)(w)
        shifted = {n: w[n] - alpha * g[n] for n in w}
        g_shift = func_grad(loss)(shifted)
        value += float(loss(w) - loss(shifted))
        for n in w:
            grads[n] += g[n] - g_shift[n]
    return beta * value / len(parts), {n: beta * v / len(parts) for n, v in grads.items()}


@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
@pytest.mark.parametrize("alpha, M, n", [(1e-4, 8, 24), (0.05, 4, 26), (0.05, 8, 5)])
def test_infomcr_value_and_gradient_match_the_definition(arch, alpha, M, n):
    beta = 10.0
    model = make_model(arch, 2)
    x, y = batch(5, n)
    ref_value, ref_grad = infomcr_reference(model, x, y, alpha, beta, min(M, n))
    reg = InfoMCR(InfoMCROptions(alpha=alpha, beta=beta, M=M))
    logits = model(x)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    penalty = reg(model, x, y, logits, epoch=0)
    names = [k for k, _ in model.named_parameters()]
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    assert penalty.item() == pytest.approx(ref_value, rel=1e-9, abs=1e-15) and penalty.item() > 0
    for k, g in zip(names, grads):
        torch.testing.assert_close(g, ref_grad[k], rtol=1e-8, atol=1e-13)
    for k, b in model.named_buffers():  # the penalty's forward passes leave the running statistics alone
        torch.testing.assert_close(b, buffers[k], **EXACT)


def test_infomcr_is_off_before_start_epoch():
    model = make_model()
    x, y = batch(0)
    reg = InfoMCR(InfoMCROptions(start_epoch=2))
    assert reg(model, x, y, model(x), 1).item() == 0.0
    assert reg(model, x, y, model(x), 2).item() > 0.0


# ----------------------------------------------------------------------------- NRS
@pytest.mark.parametrize("arch", ["mlp", "resnet1d"])
def test_nrs_is_zero_at_radius_zero(arch):
    model = make_model(arch, 2)
    x, y = batch(0)
    penalty = NRS(NRSOptions(rho=0.0, n_neighbours=3))(model, x, y, model(x), 0)
    assert penalty.item() == 0.0
    for g in torch.autograd.grad(penalty, list(model.parameters())):
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-15)


def test_nrs_matches_its_definition_and_is_reproducible():
    alpha, rho, K, seed, epoch = 2.0, 0.1, 2, 7, 3
    model = make_model("resnet1d", 2)
    x, y = batch(0)
    logits = model(x)
    reg = NRS(NRSOptions(alpha=alpha, rho=rho, n_neighbours=K), seed=seed)
    first, second = reg(model, x, y, logits, epoch).item(), reg(model, x, y, logits, epoch).item()
    gen = torch.Generator().manual_seed(stable_seed("nrs", seed, epoch, 0))
    w, bufs = params_of(model), {n: b.clone() for n, b in model.named_buffers()}
    expected = 0.0
    for _ in range(K):
        neighbour = {}
        for n, p in w.items():
            u = torch.randn(p.shape, generator=gen, dtype=F64)
            neighbour[n] = p + rho * p.norm() * u / u.norm()
        q = functional_call(model, {**neighbour, **{n: b.clone() for n, b in bufs.items()}}, (x,)).softmax(-1)
        pp = logits.detach().softmax(-1)
        expected += float((pp * (pp / q).log()).sum(-1).mean())
    assert first == pytest.approx(alpha * expected / K, rel=1e-10) and first > 0
    assert second != first  # the next call draws new neighbours
    again = NRS(NRSOptions(alpha=alpha, rho=rho, n_neighbours=K), seed=seed)
    assert again(model, x, y, logits, epoch).item() == first
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, bufs[n], **EXACT)


# ----------------------------------------------------------------------------- state_dict round trip
ROUND_TRIP = [
    ("sam", {"rho": 0.1}, "none", {}, "mlp"),
    ("sam", {"rho": 0.5, "adaptive": True}, "nrs", {"rho": 0.1}, "resnet1d"),
    ("entropy_sgd", {"L": 2, "noise": 1e-2}, "none", {}, "mlp"),
    ("entropy_sgd", {"L": 2, "noise": 1e-2}, "nrs", {"rho": 0.1}, "resnet1d"),
    ("replicated_sgd", {"y": 3, "init_noise": 0.05, "gamma0": 0.5}, "none", {}, "resnet1d"),
    ("replicated_sgd", {"y": 2, "batch": "shared", "init_noise": 0.05}, "infomcr", {"M": 2}, "mlp"),
    ("sgd", {}, "infomcr", {"M": 4, "alpha": 0.01}, "resnet1d"),
    ("sgd", {}, "nrs", {"rho": 0.1, "n_neighbours": 2}, "mlp"),
]


@pytest.mark.parametrize("optimizer, opt_options, regularizer, reg_options, arch", ROUND_TRIP)
def test_state_dict_round_trips_through_weights_only(optimizer, opt_options, regularizer, reg_options, arch):
    """Step twice, save (model, trainer) with torch.save, load weights_only into a fresh method, step again.

    The third step is mid-epoch for the new optimizers (which carry the regularizer's state) and
    at the next epoch for plain SGD (train.py resumes at epoch boundaries).
    """
    third_epoch = 1 if optimizer == "sgd" else 0
    model = make_model(arch, 2)
    method = build(model, optimizer, opt_options, regularizer, reg_options, seed=3)
    for x, y, _ in STEPS[:2]:
        method.step(x, y, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "trainer": method.state_dict()}, buf)
    x3, y3, _ = STEPS[2]
    method.step(x3, y3, third_epoch)

    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fresh = make_model(arch, 2)
    resumed = build(fresh, optimizer, opt_options, regularizer, reg_options, seed=3)
    fresh.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["trainer"])
    resumed.step(x3, y3, third_epoch)
    assert_state_equal(resumed.model.state_dict(), method.model.state_dict())


# ----------------------------------------------------------------------------- end to end
E2E = [
    ("sam", {}, "none", {}),
    ("sam", {"adaptive": True, "rho": 0.5}, "none", {}),
    ("entropy_sgd", {"L": 2}, "none", {}),
    ("replicated_sgd", {"y": 2}, "none", {}),
    ("sgd", {}, "infomcr", {"M": 4, "start_epoch": 1}),
    ("sgd", {}, "nrs", {}),
    ("sam", {}, "nrs", {}),
]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer, opt_options, regularizer, reg_options", E2E)
def test_trains_a_tiny_spec_end_to_end_and_resumes_identically(tmp_path, mnist_cache, optimizer, opt_options,
                                                               regularizer, reg_options):
    spec = tiny_spec(name="m", widths=(4,), batch_sizes=(64,), seeds=(0,), epochs=2, metrics=("loss_acc",),
                     optimizer=optimizer, optimizer_options=opt_options, regularizer=regularizer,
                     regularizer_options=reg_options)
    dataset = data.load("mnist1d", cache_dir=mnist_cache, train_fraction=0.25)
    cell = spec.cells()[0]
    quiet = dict(log=lambda *a, **k: None)

    whole = Layout(tmp_path / "a", spec.name)
    assert train.train_seed(spec, cell, 0, whole, dataset, **quiet) == "ok"
    model, ckpt = train.load_model(whole.checkpoint(cell, 0, "final"))
    assert ckpt["status"] == "ok" and ckpt["epoch"] == 2
    assert ckpt["method"] == {"optimizer": optimizer, "optimizer_options": opt_options,
                              "regularizer": regularizer, "regularizer_options": reg_options}
    losses = [h["train_loss"] for h in ckpt["history"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)

    def stop_after_first_epoch(cell_, seed, epoch):
        if epoch == 1:
            raise Interrupt

    parts = Layout(tmp_path / "b", spec.name)
    with pytest.raises(Interrupt):
        train.train_seed(spec, cell, 0, parts, dataset, on_epoch=stop_after_first_epoch, **quiet)
    last = checkpoints.load(parts.checkpoint(cell, 0, "last"))
    assert last["epoch"] == 1 and "trainer" in last
    assert train.train_seed(spec, cell, 0, parts, dataset, **quiet) == "ok"
    resumed = checkpoints.load(parts.checkpoint(cell, 0, "final"))
    assert_state_equal(resumed["model"], ckpt["model"])
    assert resumed["history"] == ckpt["history"]


def test_replicated_sgd_through_the_executor_and_table(root):
    spec = tiny_spec(name="rep", widths=(4,), batch_sizes=(128,), seeds=(0, 1), epochs=1, metrics=("loss_acc",),
                     optimizer="replicated_sgd", optimizer_options={"y": 2}, regularizer="infomcr",
                     regularizer_options={"M": 2})
    layout = Layout(root, spec.name)
    for stage in ("train", "loss_acc"):
        assert not run_inprocess(spec, layout, stage_jobs(spec, stage)).failed
    df = table.collect(layout, spec.name)
    acc = df[(df.source == "loss_acc") & (df.metric == "acc")]
    assert len(acc) == 4 and acc.value.between(0, 100).all() and (df.status == "ok").all()
