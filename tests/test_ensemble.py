"""Ensemble-native training: every member equals its own sequential run.

Reference: `train.train_seed` (sequential, one seed at a time) in a separate experiment folder.
Tolerances: float64, relative Frobenius error per state-dict entry <= 1e-6 (observed ~1e-14);
float32 <= 1e-3 on a well-conditioned problem (observed ~1e-6). Float32 runs may drift further on
chaotic problems (tiny width, random labels, lr 0.1): there torch's own two float32 convolution
backends (oneDNN on/off) already disagree by several percent after 24 steps, so float32
agreement is only tested where the dynamics do not amplify rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from phasediagram.accel import batch_norm, ensemble_models, policy
from phasediagram.data.datasets import Dataset, Split
from phasediagram.metrics.base import evaluate
from phasediagram.models import families as models
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.training import ensemble, train

SEEDS = (0, 1, 2)
# (arch, width, batch norm): an MLP (no BatchNorm) and a residual conv net with BatchNorm, whose
# training-mode BatchNorm is torch's at these sizes, or forced to `batch_norm`'s sums ("sums")
ARCHS = [("mlp", 8, "torch"), ("resnet1d", 4, "torch"), ("resnet1d", 4, "sums")]
TOL = {"float64": 1e-6, "float32": 1e-3}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def make_dataset(dtype: str, n: int = 192) -> Dataset:
    """A learnable MNIST-1D-shaped problem: labels are the argmax of a fixed random linear map."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n + 64, 40, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(40, 10, generator=g, dtype=torch.float64)).argmax(1)
    x = x.to(train.DTYPES[dtype])
    return Dataset("mnist1d", Split(x[:n], y[:n]), Split(x[n:], y[n:]), 10)


def make_spec(arch: str, width: int, dtype: str, ensemble_mode: str = "on", epochs: int = 3, lr: float = 0.05):
    return ExperimentSpec(name="t", arch=arch, widths=(width,), batch_sizes=(32,), lrs=(lr,), seeds=SEEDS,
                          epochs=epochs, dtype=dtype, metrics=(), ensemble=ensemble_mode)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_run(path_a: Path, path_b: Path, tol: float) -> None:
    a, b = checkpoints.load(path_a), checkpoints.load(path_b)
    assert a["status"] == b["status"] and a["epoch"] == b["epoch"] and a.get("diverged_at") == b.get("diverged_at")
    assert [h["epoch"] for h in a["history"]] == [h["epoch"] for h in b["history"]]
    assert [h["lr"] for h in a["history"]] == [h["lr"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=tol, nan_ok=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype
        if a["status"] == "diverged":
            assert torch.equal(a["model"][k].isnan(), b["model"][k].isnan()), k
            continue
        assert rel_err(a["model"][k], b["model"][k]) <= tol, k


def sequential(spec, cell, layout, dataset):
    return {seed: train.train_seed(spec, cell, seed, layout, dataset) for seed in SEEDS}


# ---------------------------------------------------------------------------- the layers
def member_models(arch: str, width: int, input_shape, n: int = 3, dtype=torch.float64):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(models.create(arch, width, input_shape, 10).to(dtype))
    return out


CASES = [("mlp", (40,), "auto"), ("resnet1d", (40,), "bmm"), ("resnet1d", (40,), "grouped"),
         ("resnet18", (3, 8, 8), "grouped")]


@pytest.mark.parametrize("arch,shape,conv", CASES)
def test_stack_split_round_trip(arch, shape, conv):
    ms = member_models(arch, 2, shape)
    ens = ensemble_models.from_models(ms, conv)
    parts = ensemble_models.split_state_dict(ens.state_dict(), ms[0].state_dict(), len(ms))
    for m, part in zip(ms, parts):
        ref = m.state_dict()
        assert part.keys() == ref.keys()
        assert all(torch.equal(part[k], ref[k]) for k in ref)
    assert all(torch.equal(v, ens.state_dict()[k])
               for k, v in ensemble_models.stack_state_dicts(parts, ens).items())


def force_batch_norm_sums(monkeypatch) -> None:
    """Member-major BatchNorm through `batch_norm`'s sums at every size (not only large activations)."""
    monkeypatch.setattr(batch_norm, "MIN_ELEMENTS", 0)


@pytest.mark.parametrize("arch,shape,conv,bn", [(*c, "torch") for c in CASES] + [("resnet1d", (40,), "bmm", "sums")])
def test_forward_and_gradients_equal_members(monkeypatch, arch, shape, conv, bn):
    if bn == "sums":
        force_batch_norm_sums(monkeypatch)
    ms = member_models(arch, 2, shape)
    ens = ensemble_models.from_models(ms, conv)
    x = torch.randn(len(ms), 5, *shape, dtype=torch.float64)
    out = ens(x)  # train mode: BatchNorm uses (and updates) each member's own batch statistics
    ref = torch.stack([m(x[i]) for i, m in enumerate(ms)])
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    grads = ensemble_models.split_state_dict({k: p.grad for k, p in ens.named_parameters()},
                                             {k: p for k, p in ms[0].named_parameters()}, len(ms))
    for m, g in zip(ms, grads):
        for k, p in m.named_parameters():
            assert torch.allclose(g[k], p.grad, rtol=1e-10, atol=1e-12), k
    ensemble_models.load_into_models(ens, member_models(arch, 2, shape))  # running stats agree too
    buffers = ensemble_models.split_state_dict(ens.state_dict(), ms[0].state_dict(), len(ms))
    for m, b in zip(ms, buffers):
        for k, v in m.state_dict().items():
            assert torch.allclose(b[k].double(), v.double(), rtol=1e-10, atol=1e-12), k
    ens.eval()
    for m in ms:
        m.eval()
    ref = torch.stack([m(x[i]) for i, m in enumerate(ms)])
    assert torch.allclose(ens(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,stride,padding,length", [(3, 1, 1, 6), (3, 2, 1, 6), (1, 2, 0, 6), (3, 1, 1, 1)])
def test_member_major_conv_equals_conv1d_per_member(k, stride, padding, length):
    s, c, o, b = 2, 3, 4, 5
    conv = ensemble_models.MemberMajorConv1d(s, c, o, k, stride, padding).double()
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(s, b, c, length, dtype=torch.float64)  # member s's batch (B, C, L)
    out = conv(x.permute(0, 2, 3, 1).reshape(1, s * c, length, b))  # member-major (1, S*C, L, B)
    for m in range(s):
        ref = torch.nn.functional.conv1d(x[m], conv.weight[m * o:(m + 1) * o], stride=stride, padding=padding)
        got = out[0, m * o:(m + 1) * o].permute(2, 0, 1)  # (L_out, B) -> (B, C_out, L_out)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [4, 1])
def test_three_taps_first_and_second_derivatives(length):
    """gradcheck and gradgradcheck (float64, finite differences) of the kernel-3 convolution the ensemble's
    double backward (Hessian-vector products) goes through; length 1: the shifted taps fall off."""
    g = torch.Generator().manual_seed(0)
    b = 2
    x = torch.randn(2, 3, length * b, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def taps(x, w0, w1, w2):
        return ensemble_models._ThreeTaps.apply(x, w0, w1, w2, b)

    assert torch.autograd.gradcheck(taps, (x, *ws))
    assert torch.autograd.gradgradcheck(taps, (x, *ws))


def test_evaluate_members_equals_evaluate():
    ms = member_models("resnet1d", 4, (40,), dtype=torch.float32)
    data = make_dataset("float32").test
    got = ensemble_models.evaluate_members(ms, data.x, data.y, batch_size=25)
    for m, (loss, acc) in zip(ms, got):
        ref_loss, ref_acc = evaluate(m, data, 25)
        assert loss == pytest.approx(ref_loss, rel=1e-5) and acc == ref_acc
        assert m.training  # left as found


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch,width,bn", ARCHS)
def test_members_equal_sequential_runs(tmp_path, monkeypatch, arch, width, bn, dtype):
    if bn == "sums":
        force_batch_norm_sums(monkeypatch)
    spec = make_spec(arch, width, dtype)
    cell = spec.cells()[0]
    data = make_dataset(dtype)
    ens_layout, seq_layout = Layout(tmp_path / "ens", "t"), Layout(tmp_path / "seq", "t")
    assert ensemble.ensemble_choice(spec, cell)[0]
    assert ensemble.train_cell_auto(spec, cell, ens_layout, data) == {s: "ok" for s in SEEDS}
    assert sequential(spec, cell, seq_layout, data) == {s: "ok" for s in SEEDS}
    for seed in SEEDS:
        for kind in ("final", "best"):
            assert_same_run(ens_layout.checkpoint(cell, seed, kind), seq_layout.checkpoint(cell, seed, kind),
                            TOL[dtype])
        assert not ens_layout.checkpoint(cell, seed, "last").exists()


@pytest.mark.parametrize("budget_groups", [1, 2])
def test_auto_groups_equal_sequential_runs(tmp_path, monkeypatch, budget_groups):
    """auto with a group budget of 1 or 2 members: seeds (0, 1, 2) train as 1 + 1 + 1 or 2 + 1
    one-member / two-member ensembles, each member equal to its sequential run (float64)."""
    spec = make_spec("resnet1d", 4, "float64", "auto")
    cell = spec.cells()[0]
    monkeypatch.setattr(policy, "RESNET1D_GROUP_BUDGET", budget_groups * cell.width * cell.batch_size)
    assert ensemble.ensemble_choice(spec, cell)[0] == budget_groups
    seen = []
    real = ensemble.train_members
    monkeypatch.setattr(ensemble, "train_members",
                        lambda *a, **k: seen.append(list(a[2])) or real(*a, **k))
    data = make_dataset("float64")
    ens_layout, seq_layout = Layout(tmp_path / "ens", "t"), Layout(tmp_path / "seq", "t")
    assert ensemble.train_cell_auto(spec, cell, ens_layout, data) == {s: "ok" for s in SEEDS}
    assert seen == ([[0], [1], [2]] if budget_groups == 1 else [[0, 1], [2]])
    assert sequential(spec, cell, seq_layout, data) == {s: "ok" for s in SEEDS}
    for seed in SEEDS:
        assert_same_run(ens_layout.checkpoint(cell, seed, "final"), seq_layout.checkpoint(cell, seed, "final"),
                        TOL["float64"])


def test_ensemble_training_is_deterministic(tmp_path):
    """Same spec and seeds, same mode: the same weights bit for bit (float32)."""
    spec = make_spec("mlp", 8, "float32", epochs=2)
    cell = spec.cells()[0]
    data = make_dataset("float32")
    runs = [Layout(tmp_path / name, "t") for name in ("a", "b")]
    for layout in runs:
        ensemble.train_cell_auto(spec, cell, layout, data)
    for seed in SEEDS:
        a, b = (checkpoints.load(layout.checkpoint(cell, seed, "final"))["model"] for layout in runs)
        assert all(torch.equal(a[k], b[k]) for k in a)


class Killed(Exception):
    pass


def kill_after(seed_epochs: set, trained: list):
    """on_epoch callback: record (seed, epoch); raise Killed once (seed, epoch) is in `seed_epochs`."""

    def on_epoch(cell, seed, epoch):
        trained.append((seed, epoch))
        if (seed, epoch) in seed_epochs:
            raise Killed

    return on_epoch


@pytest.mark.parametrize("resume_with", ["ensemble", "sequential"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, resume_with):
    spec = make_spec("resnet1d", 4, "float64")
    cell = spec.cells()[0]
    data = make_dataset("float64")
    ref, run = Layout(tmp_path / "ref", "t"), Layout(tmp_path / "run", "t")
    ensemble.train_cell_auto(spec, cell, ref, data)
    trained: list = []
    # killed after seed 0 wrote epoch 2 but before seeds 1 and 2 did: members resume at different epochs
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_after({(0, 2)}, trained))
    assert checkpoints.load(run.checkpoint(cell, 0, "last"))["epoch"] == 2
    assert checkpoints.load(run.checkpoint(cell, 1, "last"))["epoch"] == 1
    if resume_with == "ensemble":
        statuses = ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_after(set(), trained))
    else:
        statuses = {s: train.train_seed(spec, cell, s, run, data, on_epoch=kill_after(set(), trained)) for s in SEEDS}
    assert statuses == {s: "ok" for s in SEEDS}
    # each epoch once; the ensemble goes back to the epoch all members reached, so seed 0 trains epoch 2 again
    again = [(0, 2)] if resume_with == "ensemble" else []
    assert sorted(trained) == sorted([(s, e) for s in SEEDS for e in range(1, spec.epochs + 1)] + again)
    for seed in SEEDS:
        assert_same_run(run.checkpoint(cell, seed, "final"), ref.checkpoint(cell, seed, "final"), 1e-6)
    assert ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_after(set(), trained)) == statuses
    assert len(trained) == len(SEEDS) * spec.epochs + len(again)  # nothing retrained once final


@pytest.mark.parametrize("arch,width,poison", [("mlp", 8, "net.1.weight"), ("resnet1d", 4, "stem.0.weight")])
def test_diverging_member_does_not_touch_the_others(tmp_path, arch, width, poison):
    """Seed 1's last.pt gets a NaN weight: it must diverge at the first step of the resumed epoch as its
    sequential run does, and seeds 0 and 2 must still equal their sequential runs."""
    spec = make_spec(arch, width, "float64")
    cell = spec.cells()[0]
    data = make_dataset("float64")
    ens_layout, seq_layout = Layout(tmp_path / "ens", "t"), Layout(tmp_path / "seq", "t")
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, ens_layout, data, on_epoch=kill_after({(SEEDS[-1], 1)}, []))
    last = ens_layout.checkpoint(cell, 1, "last")
    ckpt = checkpoints.load(last)
    ckpt["model"][poison].view(-1)[0] = float("nan")
    checkpoints.save(last, ckpt)
    shutil.copytree(ens_layout.exp_dir, seq_layout.exp_dir)
    logs: list = []
    statuses = ensemble.train_cell_auto(spec, cell, ens_layout, data, log=logs.append)
    assert statuses == {0: "ok", 1: "diverged", 2: "ok"}
    assert sequential(spec, cell, seq_layout, data) == statuses
    for seed in SEEDS:
        assert_same_run(ens_layout.checkpoint(cell, seed, "final"), seq_layout.checkpoint(cell, seed, "final"), 1e-6)
    diverged = checkpoints.load(ens_layout.checkpoint(cell, 1, "final"))
    assert diverged["diverged_at"] == {"epoch": 1, "step": 0}
    assert any("diverged" in line for line in logs)
    for seed in (0, 2):
        weights = checkpoints.load(ens_layout.checkpoint(cell, seed, "final"))["model"]
        assert all(torch.isfinite(v).all() for v in weights.values())


def test_sequential_resume_of_an_ensemble_checkpoint(tmp_path):
    """last.pt written by the ensemble (weights and momentum of one member) continues sequentially."""
    spec = make_spec("mlp", 8, "float64")
    cell = spec.cells()[0]
    data = make_dataset("float64")
    ref, run = Layout(tmp_path / "ref", "t"), Layout(tmp_path / "run", "t")
    sequential(spec, cell, ref, data)
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_after({(SEEDS[-1], 2)}, []))
    trainer = checkpoints.load(run.checkpoint(cell, 0, "last"))["trainer"]["opt"]
    assert len(trainer["state"]) == len(list(models.create("mlp", 8, (40,), 10).parameters()))
    sequential(spec, cell, run, data)
    for seed in SEEDS:
        assert_same_run(run.checkpoint(cell, seed, "final"), ref.checkpoint(cell, seed, "final"), 1e-6)


def test_ensemble_choice():
    on, off, auto = (make_spec("resnet1d", 4, "float32", mode) for mode in ("on", "off", "auto"))
    cell = on.cells()[0]
    assert ensemble.ensemble_choice(on, cell)[0] == len(on.seeds) and ensemble.ensemble_choice(off, cell)[0] == 0
    assert ensemble.ensemble_choice(auto, cell)[0] == len(auto.seeds)  # width 4, batch 32: all seeds together
    assert policy.group_size("resnet1d", 64, 512, 5) == 1  # still the faster form, one member at a time
    assert policy.group_size("resnet1d", 128, 128, 5) == 0 and policy.group_size("resnet1d", 128, 16, 5) == 5
    assert policy.group_size("resnet1d", 32, 16, 1) == 1
    assert policy.group_size("resnet1d", 32, 256, 5) == 2 and policy.group_size("resnet1d", 8, 16, 5) == 5
    assert policy.group_size("mlp", 32, 128, 3) == 3 and policy.group_size("mlp", 1024, 512, 3) == 0
    assert policy.group_size("resnet18", 8, 16, 3) == 0
