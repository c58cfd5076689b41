"""`curve`: mode connectivity of two seeds along a trained quadratic Bezier curve (Garipov et al. 2018).

The curve between the parameters theta_0, theta_1 of two trained seeds is

    theta(t) = (1 - t)^2 theta_0 + 2 t (1 - t) theta_m + t^2 theta_1,   t in [0, 1],

with the endpoints fixed. theta_m minimises

    E_{t ~ U(0, 1)} [ CE(f(x; theta(t)), y) + (wd / 2) ||theta(t)||^2 ]

by SGD with momentum, one t drawn per batch, as the reference's curve code does (the taxonomy
repository's `Mode_connectivity.py` on dnn-mode-connectivity's `curves.py`: the L2 term is its
`l2_regularizer`, 0.5 wd times the squared norm of the curve point's weights, with the optimizer's
own weight decay 0; its gradient on theta_m is wd 2t(1 - t) theta(t)). Reference settings: 50
epochs, lr 0.01, momentum 0.9, wd 5e-4, batch 128, the whole training set each epoch. The lr of
epoch e = 1..epochs (counted from 1, as the reference's loop calls its schedule) is lr times
1 for e / epochs <= 0.5, then 1 - 0.99 (e / epochs - 0.5) / 0.4 down to 0.01 at 0.9, and 0.01
after. The bend starts at the midpoint (theta_0 + theta_1) / 2 (`bend_init="midpoint"`, the
default: dnn-mode-connectivity's `init_linear`), or at a fresh initialisation of the model
(`bend_init="random"`: the taxonomy repository never calls `init_linear`, so its bend starts at the
curve layers' own initialisation; here each layer's `reset_parameters`, drawn from the metric's
generator). The midpoint is the default because a short curve (the demo's) trained from a random
bend is still far from converged. During curve training BatchNorm layers use batch statistics
(train mode); their running statistics are not used.

Evaluation at t_k = k / (points - 1): load theta(t_k) into a copy of the model, recompute every
BatchNorm layer's running statistics on the training set (reset, cumulative average over one
pass in train mode, no gradients), then measure loss and error (percent) on train and test in
eval mode. With e(t) the training error,

    mc = (e(0) + e(1)) / 2 - e(t*),   t* = argmax_{t_k} |e(t_k) - (e(0) + e(1)) / 2|

mc < 0: a barrier (poorly connected); mc ~ 0: well connected; mc > 0: the endpoints are not
minima. `mc_linear` is the same quantity on the straight line theta(t) = (1 - t) theta_0 + t theta_1
(no training, a cheap upper bound on the barrier).

The curve's state (theta_m, the optimizer's momentum, the epoch, the generator state and a
fingerprint of everything that determines the training) is written atomically to
`data.state_dir/curve_state.pt` after every epoch, so an interrupted job resumes at the next epoch
and gives the result of an uninterrupted one. The bends of several pairs of a cell can train
together as one ensemble (`train_bends`, `curve_pairs`): each pair's result is unchanged up to
rounding, and its state is written as above.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from phasediagram.accel import ensemble_models, policy
from phasediagram.data.datasets import Split
from phasediagram.errors import CorruptFile
from phasediagram.metrics.base import PAIR_SELECTIONS, Metric, MetricData, Panel, evaluate, key
from phasediagram.numerics.hvp import gradients
from phasediagram.numerics.sgd import momentum_of, set_lr, set_momentum, sgd
from phasediagram.options import choice, flag, integer, real, validate
from phasediagram.storage.checkpoints import atomic_write_bytes

PAIRS = PAIR_SELECTIONS
BEND_INITS = ("midpoint", "random")
STATE_FILE = "curve_state.pt"
_STATE_MAGIC = b"PDCURVE1"
# options that determine the trained bend (the evaluation options do not)
_TRAINING_OPTIONS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "max_batches_per_epoch", "bend_init")

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CurveOptions:
    """Reference settings of Garipov et al. / Yang et al.

    `max_batches_per_epoch` caps the SGD steps of one epoch (0: a full pass over the training set),
    for cheap demo curves. `points` evenly spaced values of t in [0, 1] are evaluated (5: 0, .25,
    .5, .75, 1). `linear` also evaluates the straight line and reports `mc_linear`.
    `eval_examples` caps the examples of each split used for the BatchNorm statistics and the
    evaluation (the first ones; 0: all, the reference) for cheap demo curves. `eval_batch_size`
    only sets the evaluation batch size (the BatchNorm statistics are recomputed with
    `batch_size`, as in training). `pairs`: which seed pairs of a cell are joined. `bend_init`:
    "midpoint" or "random" (the module docstring says why and what the reference did).
    """

    epochs: int = integer(50, low=0)
    lr: float = real(0.01, low=0, open_low=True)
    momentum: float = real(0.9, low=0, high=1, open_high=True)
    weight_decay: float = real(5e-4, low=0)
    batch_size: int = integer(128, low=2)
    max_batches_per_epoch: int = integer(0, low=0, note="0: a full pass")
    points: int = integer(5, low=3)
    linear: bool = flag(True)
    eval_examples: int = integer(0, low=0, note="0: all")
    eval_batch_size: int = integer(1000, low=1)
    pairs: str = choice("adjacent", PAIRS)
    bend_init: str = choice("midpoint", BEND_INITS)

    def __post_init__(self):
        validate(self, "metric_options.curve")

    @property
    def ts(self) -> list[float]:
        return [k / (self.points - 1) for k in range(self.points)]


# --------------------------------------------------------------------------- the curve
def bezier(theta_0: Mapping[str, torch.Tensor], theta_m: Mapping[str, torch.Tensor],
           theta_1: Mapping[str, torch.Tensor], t: float) -> Params:
    """theta(t) = (1 - t)^2 theta_0 + 2 t (1 - t) theta_m + t^2 theta_1, per named tensor.

    At t = 0 and t = 1 the coefficients are exactly (1, 0, 0) and (0, 0, 1), so the endpoints are
    reproduced bit for bit.
    """
    c0, cm, c1 = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return {n: c0 * theta_0[n] + cm * theta_m[n] + c1 * theta_1[n] for n in theta_0}


def line(theta_0: Mapping[str, torch.Tensor], theta_1: Mapping[str, torch.Tensor], t: float) -> Params:
    """theta(t) = (1 - t) theta_0 + t theta_1 (exact at t = 0 and t = 1)."""
    return {n: (1 - t) * theta_0[n] + t * theta_1[n] for n in theta_0}


def lr_factor(epoch: int, epochs: int) -> float:
    """The curve lr schedule of Garipov et al. for epoch = 1..epochs: with a = epoch / epochs, 1 for
    a <= 0.5, then 1 - 0.99 (a - 0.5) / 0.4 down to 0.01 at a = 0.9, and 0.01 after."""
    a = epoch / epochs
    if a <= 0.5:
        return 1.0
    if a <= 0.9:
        return 1.0 - 0.99 * (a - 0.5) / 0.4
    return 0.01


def mode_connectivity(errors) -> tuple[float, int]:
    """(mc, k*) with mc = (e_0 + e_last) / 2 - e_k*, k* = argmax_k |e_k - (e_0 + e_last) / 2|.

    The first maximiser wins on ties, as `torch.argmax` in the reference code: when no interior
    point deviates more than the endpoints, k* = 0 and mc = (e_last - e_0) / 2.
    """
    errors = [float(e) for e in errors]
    mid = (errors[0] + errors[-1]) / 2
    k = max(range(len(errors)), key=lambda i: abs(errors[i] - mid))
    return mid - errors[k], k


@torch.no_grad()
def recompute_bn(model: nn.Module, split: Split, batch_size: int) -> None:
    """Reset every tracking BatchNorm layer's running mean/variance and set them to the cumulative
    average of the batch statistics over one in-order pass of `split` (momentum=None), BatchNorm
    layers in train mode, everything else in eval mode; train/eval flags and momenta are restored."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    flags = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for batch in split.batches(batch_size):
            model(batch.x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, training in flags:
            m.training = training


@torch.no_grad()
def model_at(template: nn.Module, params: Mapping[str, torch.Tensor], split: Split | None, bn_batch_size: int = 128):
    """A copy of `template` in eval mode holding `params`, its BatchNorm statistics recomputed on `split`
    (if given) with batches of `bn_batch_size`."""
    model = copy.deepcopy(template)
    for n, p in model.named_parameters():
        p.copy_(params[n])
    if split is not None:
        recompute_bn(model, split, bn_batch_size)
    return model.eval()


def _endpoints(model_a: nn.Module, model_b: nn.Module) -> tuple[Params, Params]:
    a = {n: p.detach().clone() for n, p in model_a.named_parameters()}
    b = {n: p.detach().clone() for n, p in model_b.named_parameters()}
    if list(a) != list(b) or any(a[n].shape != b[n].shape for n in a):
        raise ValueError("the two endpoint models have different parameter names or shapes")
    return a, b


# --------------------------------------------------------------------------- resumable state
def _fingerprint(options: CurveOptions, theta_0: Params, theta_1: Params, train: Split, gen_state: torch.Tensor) -> str:
    """SHA-256 of everything that determines the trained bend: training options, endpoints, labels, seed state."""
    h = hashlib.sha256(json.dumps({k: asdict(options)[k] for k in _TRAINING_OPTIONS}, sort_keys=True).encode())
    for theta in (theta_0, theta_1):
        for n, p in theta.items():
            h.update(f"{n}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    h.update(f"{tuple(train.x.shape)}:{train.x.dtype}".encode())
    h.update(train.y.detach().cpu().numpy().tobytes())
    h.update(gen_state.numpy().tobytes())
    return h.hexdigest()


def _write_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, _STATE_MAGIC + hashlib.sha256(payload).digest() + payload)


def load_state(path: Path) -> dict:
    """A saved curve state (header, checksum, payload), validated; raise `CorruptFile` if it is damaged."""
    data = Path(path).read_bytes()
    n = len(_STATE_MAGIC)
    payload = data[n + 32:]
    if not data.startswith(_STATE_MAGIC) or hashlib.sha256(payload).digest() != data[n:n + 32]:
        raise CorruptFile(path, "corrupt curve state (bad header or checksum)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # a checksummed payload torch cannot read
        raise CorruptFile(path, f"unreadable curve state ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CorruptFile(path, "not a curve state")
    return state


def _read_state(path: Path, fingerprint: str) -> dict | None:
    """The saved state if it exists, is intact and belongs to this training run; else None."""
    try:
        state = load_state(path)
    except FileNotFoundError:
        return None
    except CorruptFile as exc:
        warnings.warn(f"{exc}; training the curve from the start")
        return None
    return state if state.get("fingerprint") == fingerprint else None


# --------------------------------------------------------------------------- training
def l2_term(point: Params, weight_decay: float) -> torch.Tensor:
    """(weight_decay / 2) sum_n ||point[n]||^2: the reference's L2 regularizer on a curve point theta(t)."""
    return 0.5 * weight_decay * sum(p.pow(2).sum() for p in point.values())


def descend(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """One step of `opt` (`numerics.sgd`, no weight decay of its own: the L2 term is in the loss,
    `l2_term`) on `params` with gradients `grads`."""
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()


@dataclass
class _BendRun:
    """One pair's bend training: endpoints, bend, momentum, the next epoch, where its state goes."""

    theta_0: Params
    theta_1: Params
    bend: Params
    velocity: Params  # the momentum buffers of the bend's SGD (none before its first step)
    epoch: int
    generator: torch.Generator
    path: Path | None
    fingerprint: str

    def save(self) -> None:
        """Write the state after an epoch (atomically; no-op without a state folder)."""
        if self.path is not None:
            _write_state(self.path, {"fingerprint": self.fingerprint, "epoch": self.epoch,
                                     "bend": {n: v.detach().cpu() for n, v in self.bend.items()},
                                     "velocity": {n: v.cpu() for n, v in self.velocity.items()},
                                     "generator": self.generator.get_state()})


def _start(model_a: nn.Module, model_b: nn.Module, train: Split, options: CurveOptions, generator: torch.Generator,
           state_dir: Path | None) -> _BendRun:
    """The initial bend (`bend_init`), or the saved state of this training run (restoring `generator`'s state)."""
    theta_0, theta_1 = _endpoints(model_a, model_b)
    device = next(iter(theta_0.values())).device
    path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    fingerprint = _fingerprint(options, theta_0, theta_1, train, generator.get_state()) if path else ""
    if options.bend_init == "random":
        bend = _fresh_parameters(model_a, generator)
    else:
        bend = {n: (theta_0[n] + theta_1[n]) / 2 for n in theta_0}
    run = _BendRun(theta_0, theta_1, {n: v.requires_grad_(True) for n, v in bend.items()}, {}, 0, generator, path,
                   fingerprint)
    state = _read_state(path, fingerprint) if path else None
    if state is not None:
        with torch.no_grad():
            for n, v in state["bend"].items():
                run.bend[n].copy_(v)
        run.velocity = {n: v.to(device) for n, v in state["velocity"].items()}
        generator.set_state(state["generator"])
        run.epoch = int(state["epoch"])
    return run


@torch.no_grad()
def _fresh_parameters(model: nn.Module, generator: torch.Generator) -> Params:
    """The parameters of a copy of `model` after every submodule's `reset_parameters()`, drawn under
    torch's global generator seeded from `generator` (which advances by one draw); the global state
    is restored."""
    fresh = copy.deepcopy(model)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters") and m is not fresh:
                m.reset_parameters()
    return {n: p.detach().clone() for n, p in fresh.named_parameters()}


def _batches_per_epoch(n_train: int, options: CurveOptions) -> int:
    n_batches = math.ceil(n_train / options.batch_size)
    return min(n_batches, options.max_batches_per_epoch) if options.max_batches_per_epoch else n_batches


def train_bend(model_a: nn.Module, model_b: nn.Module, train: Split, options: CurveOptions,
               generator: torch.Generator, state_dir: Path | None = None,
               on_epoch: Callable[[int], None] | None = None) -> Params:
    """Train theta_m of the Bezier curve from model_a to model_b; return it (detached tensors).

    Epoch e = 1..epochs: lr = options.lr * lr_factor(e, epochs); a random permutation of the training
    set is cut into batches (at most `max_batches_per_epoch` of them); for each batch draw
    t ~ U(0, 1), evaluate CE(f(x; theta(t)), y) + `l2_term`(theta(t)) by `torch.func.functional_call`
    on a copy of model_a in train mode, and take one SGD step on theta_m (`descend`). With
    `state_dir`, the state is saved after each epoch and a matching saved state is resumed;
    `on_epoch(epoch)` is called after each epoch's state is saved (epoch counted from 1).
    """
    run = _start(model_a, model_b, train, options, generator, state_dir)
    _train_alone(run, model_a, train, options, on_epoch)
    return {n: v.detach() for n, v in run.bend.items()}


def _train_alone(run: _BendRun, model_a: nn.Module, train: Split, options: CurveOptions,
                 on_epoch: Callable[[int], None] | None) -> None:
    """`train_bend`'s epochs from `run.epoch` on, on a train-mode copy of model_a (the pair's first model)."""
    net = copy.deepcopy(model_a).train()
    bend = list(run.bend.values())
    opt = sgd(bend, lr=options.lr, momentum=options.momentum)
    set_momentum(opt, run.bend, run.velocity)
    n_train = len(train)
    for epoch in range(run.epoch, options.epochs):
        set_lr(opt, options.lr * lr_factor(epoch + 1, options.epochs))
        perm = torch.randperm(n_train, generator=run.generator).to(train.y.device)
        for b in range(_batches_per_epoch(n_train, options)):
            idx = perm[b * options.batch_size:(b + 1) * options.batch_size]
            t = float(torch.rand((), generator=run.generator))
            point = bezier(run.theta_0, run.bend, run.theta_1, t)
            out = functional_call(net, point, (train.x[idx],))
            loss = F.cross_entropy(out, train.y[idx]) + l2_term(point, options.weight_decay)
            descend(opt, bend, gradients(loss, bend))
        run.velocity = momentum_of(opt, run.bend)
        run.epoch = epoch + 1
        run.save()
        if on_epoch is not None:
            on_epoch(epoch + 1)


def train_bends(pairs: Sequence[tuple[nn.Module, nn.Module]], train: Split, options: CurveOptions,
                generators: Sequence[torch.Generator], state_dirs: Sequence[Path | None],
                on_epoch: Callable[[int], None] | None = None) -> list[Params]:
    """[`train_bend`(a, b, train, options, generators[i], state_dirs[i]) for (a, b) in pairs], the
    bends of pairs of one architecture trained together as one ensemble (`ensemble_models`).

    Member i draws its permutations and its t_i from its own generator in the order `train_bend`
    does; theta_0, theta_m, theta_1 of the pairs are stacked along a leading member axis, so
    theta_i(t_i) = (1 - t_i)^2 theta_0,i + 2 t_i (1 - t_i) theta_m,i + t_i^2 theta_1,i is one
    expression with per-member coefficients, viewed as the ensemble's parameters (a stack is the
    ensemble's layout: its own for linear weights, member-major concatenation for convolutions and
    BatchNorm). The loss CE_i(f(x_i; theta_i(t_i)), y_i) + `l2_term`(theta_i(t_i)) enters the sum
    L = sum_i (CE_i + L2_i) (the L2 of the stacked point is the sum of the members'), so
    dL/dtheta_m,i is pair i's own gradient and the elementwise SGD step on the stacked tensors is
    each pair's step: pair i's bend equals its sequential one up to rounding (the ensemble's
    operations sum in another order than `nn.Conv1d`). Each pair's state is saved after every epoch
    in its own folder, as `train_bend` saves it; pairs resumed at different epochs are trained one
    after another.
    """
    runs = [_start(a, b, train, options, g, d) for (a, b), g, d in zip(pairs, generators, state_dirs)]
    if len({r.epoch for r in runs}) > 1:
        for run, (model_a, _) in zip(runs, pairs):
            _train_alone(run, model_a, train, options, on_epoch)
        return [{n: v.detach() for n, v in run.bend.items()} for run in runs]
    members = len(runs)
    net = ensemble_models.from_models([pairs[0][0]] * members).train()
    shapes = {n: p.shape for n, p in net.named_parameters()}

    def stacked(field: str) -> Params:  # (members, *shape): viewed as the ensemble's layout when called
        return {n: torch.stack([getattr(r, field)[n].detach() for r in runs]) for n in shapes}

    theta_0, theta_1 = stacked("theta_0"), stacked("theta_1")
    bend = {n: v.requires_grad_(True) for n, v in stacked("bend").items()}
    opt = sgd(bend.values(), lr=options.lr, momentum=options.momentum)
    if runs[0].velocity:
        set_momentum(opt, bend, stacked("velocity"))
    first = next(iter(theta_0.values()))
    device, dtype = first.device, first.dtype
    n_train = len(train)
    for epoch in range(runs[0].epoch, options.epochs):
        set_lr(opt, options.lr * lr_factor(epoch + 1, options.epochs))
        perms = [torch.randperm(n_train, generator=r.generator).to(train.y.device) for r in runs]
        for b in range(_batches_per_epoch(n_train, options)):
            idx = [perm[b * options.batch_size:(b + 1) * options.batch_size] for perm in perms]
            ts = [float(torch.rand((), generator=r.generator)) for r in runs]
            c0, cm, c1 = (torch.tensor(c, dtype=dtype, device=device)
                          for c in zip(*[((1 - t) ** 2, 2 * t * (1 - t), t ** 2) for t in ts]))
            params = {}
            for n, shape in shapes.items():
                k = (-1, *[1] * (theta_0[n].dim() - 1))
                params[n] = (c0.view(k) * theta_0[n] + cm.view(k) * bend[n] + c1.view(k) * theta_1[n]).view(shape)
            out = functional_call(net, params, (torch.stack([train.x[i] for i in idx]),))
            y = torch.stack([train.y[i] for i in idx])
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
            total = loss.view(members, -1).mean(1).sum() + l2_term(params, options.weight_decay)
            descend(opt, list(bend.values()), gradients(total, list(bend.values())))
        velocity = momentum_of(opt, bend)
        for i, r in enumerate(runs):  # copies, so that each pair's state file holds its own tensors only
            r.bend = {n: v[i].detach().clone() for n, v in bend.items()}
            r.velocity = {n: v[i].clone() for n, v in velocity.items()}
            r.epoch = epoch + 1
            r.save()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return [{n: v[i].detach().clone() for n, v in bend.items()} for i in range(members)]


# --------------------------------------------------------------------------- the metric
def _evaluate_path(template: nn.Module, points: list[Params], data: MetricData, options: CurveOptions):
    """[(train loss, train err %, test loss, test err %)] at each parameter point, BN stats recomputed."""
    n = options.eval_examples or None
    train, test = (Split(s.x[:n], s.y[:n]) for s in (data.train, data.test))
    out = []
    for params in points:
        model = model_at(template, params, train, options.batch_size)
        row = []
        for split in (train, test):
            loss, acc = evaluate(model, split, options.eval_batch_size)
            row += [loss, 100.0 - acc]
        out.append(tuple(row))
    return out


def curve(model_a: nn.Module, model_b: nn.Module, data: MetricData, options: CurveOptions,
          generator: torch.Generator, on_epoch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train the Bezier bend between two seeds, evaluate along the curve and report mc.

    Keys: `{train,test}/{loss,err}@t` along the curve, `train/mc` and `train/mc_t` (= t*), and
    with `linear`, `{train,test}/{loss,err}_linear@t`, `train/mc_linear` and `train/mc_linear_t` on the
    straight line.
    """
    theta_m = train_bend(model_a, model_b, data.train, options, generator, data.state_dir, on_epoch)
    return _values(model_a, model_b, theta_m, data, options)


def curve_pairs(pairs: Sequence[tuple[nn.Module, nn.Module]], datas: Sequence[MetricData], options: CurveOptions,
                generators: Sequence[torch.Generator]) -> list[dict[str, float]]:
    """[`curve`(a, b, datas[i], options, generators[i]) for (a, b) in pairs] for pairs of one
    architecture with an ensemble form (a cell's seed pairs), their bends trained together
    (`train_bends`: each pair's values up to rounding, its state in `datas[i].state_dir`); the
    curves are then evaluated pair by pair. `datas` differ only in their state folders."""
    bends = train_bends(pairs, datas[0].train, options, generators, [d.state_dir for d in datas])
    return [_values(a, b, theta_m, data, options) for (a, b), theta_m, data in zip(pairs, bends, datas)]


def _values(model_a: nn.Module, model_b: nn.Module, theta_m: Params, data: MetricData, options: CurveOptions
            ) -> dict[str, float]:
    """`curve`'s keys for the trained bend theta_m between model_a and model_b."""
    theta_0, theta_1 = _endpoints(model_a, model_b)
    ts = options.ts
    results = _evaluate_path(model_a, [bezier(theta_0, theta_m, theta_1, t) for t in ts], data, options)
    out: dict[str, float] = {}
    for t, (trl, tre, tel, tee) in zip(ts, results):
        out[key("train", "loss", t)], out[key("train", "err", t)] = trl, tre
        out[key("test", "loss", t)], out[key("test", "err", t)] = tel, tee
    mc, k = mode_connectivity([r[1] for r in results])
    out[key("train", "mc")], out[key("train", "mc_t")] = mc, ts[k]
    if options.linear:
        # the endpoints of the line are those of the curve (bit for bit), so they are not re-evaluated
        inner = _evaluate_path(model_a, [line(theta_0, theta_1, t) for t in ts[1:-1]], data, options)
        lin = [results[0], *inner, results[-1]]
        for t, (trl, tre, tel, tee) in zip(ts, lin):
            out[key("train", "loss_linear", t)], out[key("train", "err_linear", t)] = trl, tre
            out[key("test", "loss_linear", t)], out[key("test", "err_linear", t)] = tel, tee
        mc_lin, k_lin = mode_connectivity([r[1] for r in lin])
        out[key("train", "mc_linear")], out[key("train", "mc_linear_t")] = mc_lin, ts[k_lin]
    return out


METRIC = Metric(
    "curve", "pair", curve, CurveOptions,
    panels=(Panel("mc", "train", "mode connectivity (error %)", cmap="RdBu_r", center=0.0),
            Panel("mc_linear", "train", "linear-path mc (train error %)", cmap="RdBu", center=0.0)),
    description="mode connectivity: trained quadratic Bezier curve between two seeds, mc and the curve's errors",
    compute_pairs=curve_pairs,
    group_size=policy.bend_group,
    selects_pairs=True,
    diagnostics=("mc_t", "mc_linear_t"),
    test_options={"epochs": 1, "max_batches_per_epoch": 2, "eval_examples": 64, "batch_size": 32},
)
