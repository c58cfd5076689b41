"""`hessian`: top eigenvalues, trace and spectral density of the training-loss Hessian.

H = d^2 L / d theta^2 of the mean training cross-entropy L (no weight-decay term) on a fixed
batch drawn from the generator (reference: 200 examples) or on the whole training split, model
in eval mode (BatchNorm uses its running statistics), theta = the trainable parameters. H is
only touched through Hessian-vector products (`hvp.HessianOperator`; for a cell's seeds together,
`hessian_seeds`, `hvp_lockstep`); the estimators are in `linalg`. Keys (all on the "train" split):

- `top_eigenvalue`: lambda_max, the largest *algebraic* eigenvalue, by Lanczos stopped once the gap
  bound min(r, r^2 / gap) certifies it within tol * |lambda| (`linalg.ritz_bounds`). Started
  (`eig_start` "slq", the default when the density is computed) from the sum of the top_k Ritz
  vectors and the bottom Ritz vector of the first SLQ probe's Lanczos run, i.e. that random-start
  Krylov search continued (a restart with its best vectors), else from the loss gradient plus a
  random vector ("gradient") or a random vector ("random"); `eigenvalue@i`: the i-th largest algebraic,
  i = 1..top_k.
- `top_abs_eigenvalue`: the eigenvalue of largest magnitude, signed: lambda_max, unless negative
  curvature dominates (|lambda_min| > lambda_max), then lambda_min < 0. It is what the reference
  code's power iteration reports. `bottom_eigenvalue`: lambda_min, the smallest algebraic
  eigenvalue; the Lanczos stopping test covers it as it covers lambda_max.
- `trace`, `trace_stderr`: Hutchinson with Rademacher probes; `trace_hutchpp`,
  `trace_hutchpp_stderr`: Hutch++. Both use the same probes, each probe's product serving both
  estimators (`linalg.traces`). By default Hutch++ stops once its standard error is at most
  trace_tol = 2 % of |trace| (from 10 probes on, at most trace_probes), so a value that stopped
  before the cap has a relative standard error <= 2 %, and Hutchinson is the estimate on the same
  probes (its larger standard error reported as it is: it would need hundreds of probes more for
  2 %). With the reference code's rule (`trace_rule="change"`: relative change of the running
  mean below trace_tol, reference 1e-3; it certifies nothing and can stop with an error far above
  its tol) each estimator stops by its own rule. Hutch++ on the Krylov basis is the accurate
  one (the figures draw it): the basis removes the outlying eigenvalues that dominate
  Hutchinson's variance, so it reaches 2 % within a few probes where Hutchinson needs hundreds.
  Hutch++ deflates by the Krylov basis of the first SLQ probe's Lanczos run (`hutchpp_basis`
  "krylov", the default when the density is computed: density_iters vectors at no extra product,
  `linalg.Deflation.krylov`) or by a random sketch of `hutchpp_sketch` columns ("sketch", or when
  density_probes is 0).
- `trace_xtrace`, `trace_xtrace_stderr`, `hvp_trace_xtrace` (only with `xtrace_vectors` k > 0): XTrace
  (`numerics.xtrace`: 2 k products of its own, every test vector serving both its low-rank part and
  its residual estimate), after the other traces; at equal products within the noise of Krylov
  Hutch++ on the benchmark Hessians (bench/bench_trace.py), whose Krylov basis the density pays for.
- `density@t`: the SLQ spectral density phi(t) on a grid of eigenvalues t, smoothed by a
  Gaussian of width density_sigma * (spectral range); it integrates to 1 (multiply by the
  parameter count for eigenvalues per unit). `density_figure` draws it.
- `hvp_eig`, `hvp_trace`, `hvp_trace_hutchpp`, `hvp_density`: Hessian-vector products each
  estimate rests on (eigenvalues from the SLQ run's Ritz vectors, Hutch++ on its Krylov basis:
  the SLQ run's products plus their own); `hvp_traces`: products the traces call made (2 s for a
  sketch, then the larger probe count, as the two share probes);
  `eig_converged`: 1 if the Lanczos stopping test passed within `lanczos_iters`, else 0.

Hessian-vector products are in the model's dtype, and so are the Krylov and probe vectors
(float32 for a float16 or bfloat16 model; see `vector_dtype`).

The eigenvectors themselves are not rows: `top_eigenvectors` returns the top (or bottom) k eigenpairs
of the same H through the Python API (`EigenPairs`), and the `loss_slice` metric slices along them.
With `save_eigenvectors` the metric writes the top_k Ritz vectors of its own Lanczos run, with their
Ritz values, to its state folder per checkpoint (`Layout.eigenvectors_path`: `eigenvectors.npz`,
groups "top1".."top<k>", read with `storage.vectors.load_vectors`; numpy arrays, no pickle).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from phasediagram.accel import ensemble_models, policy
from phasediagram.accel.hvp_lockstep import LockstepHessians
from phasediagram.data.datasets import Split
from phasediagram.metrics.base import Metric, MetricData, Panel, key, metric_data, parse_key
from phasediagram.models.modes import eval_mode
from phasediagram.numerics import linalg, xtrace
from phasediagram.numerics.hvp import METHODS, HessianOperator
from phasediagram.options import choice, flag, integer, out_of_range, real, validate
from phasediagram.storage.layout import EIGENVECTORS_FILE
from phasediagram.storage.vectors import save_vectors

NAME = "hessian"
EIG_STARTS = ("slq", "gradient", "random")
HUTCHPP_BASES = ("krylov", "sketch")


@dataclass(frozen=True)
class HessianOptions:
    # fixed seeded batch of this many training examples; None: whole split
    batch_size: int | None = integer(200, low=1, optional=True)
    # examples per forward pass; one chunk caches the graph, more rebuild it per product
    chunk_size: int = integer(1000, low=1)
    top_k: int = integer(1, low=1)  # eigenvalues reported (largest algebraic)
    # most Lanczos steps, one product each (reference power iteration: 100); at least top_k
    lanczos_iters: int = integer(100, low=1)
    # eigenvalue tolerance, relative to the largest |Ritz value| (reference: 1e-3)
    tol: float = real(1e-3, low=0, high=1, open_low=True)
    # "gap" (min(r, r^2/gap) <= tol), "residual" (r <= tol) or "change" (reference rule)
    eig_rule: str = choice("gap", linalg.EIG_RULES)
    # Lanczos start: "slq" (the SLQ run's top Ritz vectors; "gradient" without density),
    # "gradient" (gradient + random vector), "random" (pair with "residual")
    eig_start: str = choice("slq", EIG_STARTS)
    trace_probes: int = integer(200, low=1)  # most Rademacher probes (reference: 100)
    # "stderr": largest relative standard error; "change": relative change (reference 1e-3)
    trace_tol: float = real(0.02, low=0, high=1)
    # "stderr" (stderr <= trace_tol |trace|) or "change" (reference rule with |trace|)
    trace_rule: str = choice("stderr", linalg.RULES)
    # Hutch++ deflation: "krylov" (the SLQ run's basis, no product) or "sketch"
    hutchpp_basis: str = choice("krylov", HUTCHPP_BASES)
    # sketch size s ("sketch", or no density): 2 s products, then residual probes
    hutchpp_sketch: int = integer(10, low=0)
    # XTrace test vectors k (2 k products of its own, keys trace_xtrace*); 0: no XTrace
    xtrace_vectors: int = integer(0, low=0)
    density_iters: int = integer(100, low=1)  # Lanczos steps per SLQ probe
    density_probes: int = integer(1, low=0)  # SLQ probes; 0 skips the density
    density_points: int = integer(100, low=2)  # grid points of the stored density curve
    # Gaussian smoothing width, relative to the spectral range
    density_sigma: float = real(0.01, low=0, high=1, open_low=True)
    # Hessian-vector product: "double_backward" or "func"
    hvp: str = choice("double_backward", METHODS)
    # write the top_k Ritz vectors to the state folder (eigenvectors.npz)
    save_eigenvectors: bool = flag(False)

    def __post_init__(self):
        validate(self, f"metric_options.{NAME}")
        if self.lanczos_iters < self.top_k:
            raise out_of_range(f"metric_options.{NAME}.lanczos_iters", self.lanczos_iters,
                               f"an integer >= top_k = {self.top_k}")


def hessian_batch(split: Split, options: HessianOptions, generator: torch.Generator) -> Split:
    """The fixed batch: `batch_size` examples drawn without replacement from `generator`, or the split."""
    return split if options.batch_size is None else split.batch(options.batch_size, generator)


def operator(model, split: Split, options: HessianOptions) -> HessianOperator:
    """H v on `split` (inputs cast to the parameters' dtype); call inside `eval_mode(model)`."""
    p = next(model.parameters())
    return HessianOperator(model, split.x.to(p.device, p.dtype), split.y.to(p.device), options.chunk_size,
                           options.hvp)


def vector_dtype(op: HessianOperator) -> torch.dtype:
    """The Krylov and probe vectors' dtype: the model's if float64 or float32, else float32.

    float32 vectors on a float32 model cost nothing in accuracy: the products are float32, and on
    the benchmark model (bench/bench_hessian.py) top eigenvalues with float32 and float64 vectors
    were both within 3e-7 of the float64 value, Hutch++ traces agreed to 3e-7 and SLQ densities
    to 1e-8 of their peak, while a float32 basis holds half the memory and halves the traffic of
    the reorthogonalisation.
    """
    return torch.float64 if op.params[0].dtype == torch.float64 else torch.float32


def _eig_values(op: HessianOperator, options: HessianOptions, generator,
                krylov: linalg.Lanczos | None = None) -> tuple[dict[str, float], linalg.Eigs]:
    """Lanczos for the top eigenvalues, from one of three starts: their entries and the `linalg.Eigs`.

    "slq" with the SLQ run `krylov` (None without a density; the other starts ignore it): v0 = sum
    of its top_k Ritz vectors and of its bottom Ritz vector. After m steps from the random probe z,
    the top Ritz vector is p(H) z for the degree m - 1 polynomial that best isolates the top of the
    spectrum (the bottom one likewise for the bottom), so this run continues the probe's search at
    both ends (an explicitly restarted Lanczos), with the probe's randomness as its guarantee; both
    ends are needed for the eigenvalue of largest magnitude, which is lambda_min when negative
    curvature dominates. The SLQ run's products are counted in `hvp_eig`.
    "gradient" (or "slq" without a run): the gradient-mixed start (`linalg.start_vector`): the
    gradient of the cross-entropy lies mostly in the top eigenspace of H (Gur-Ari, Roberts, Dyer
    2018; on the benchmark model its cosine with the top eigenvector is 0.5-0.9, against ~0.006 for
    a random vector), while the random half keeps the random start's guarantee. "random": Gaussian.
    """
    dtype, start, hint = vector_dtype(op), None, None
    if options.eig_start == "slq" and krylov is not None:
        _, s = krylov.ritz()
        ends = s[:, -options.top_k:].sum(1) + (s[:, 0] if len(s) > options.top_k else 0.0)
        start = krylov.basis.combine(torch.as_tensor(ends, dtype=dtype, device=op.device))
        if not bool(torch.isfinite(start).all()) or float(torch.linalg.vector_norm(start)) == 0.0:
            start = None
    if start is None and options.eig_start in ("slq", "gradient"):
        hint = op.gradient()
    eigs = linalg.lanczos_eigs(op, op.dim, options.top_k, options.lanczos_iters, options.tol, generator, op.device,
                               options.eig_rule, dtype, hint, start)
    out = {key("train", "top_eigenvalue"): float(eigs.top[0]),
           key("train", "top_abs_eigenvalue"): eigs.largest_magnitude,
           key("train", "bottom_eigenvalue"): eigs.bottom}
    out.update({key("train", "eigenvalue", i): float(v) for i, v in enumerate(eigs.top, 1)})
    out[key("train", "hvp_eig")] = float(eigs.n_products + (krylov.n_products if start is not None else 0))
    out[key("train", "eig_converged")] = float(eigs.converged)
    return out, eigs


def _trace_values(op: HessianOperator, options: HessianOptions, generator,
                  krylov: linalg.Lanczos | None = None) -> dict[str, float]:
    """Hutchinson and Hutch++ on one stream of probes (`linalg.traces`: each probe's product serves both);
    Hutch++ deflates by the Krylov basis of `krylov` (an SLQ run) when given, else by a random sketch."""
    before = op.n_products
    if krylov is not None:
        deflation = linalg.Deflation.krylov(krylov)
    else:
        deflation = linalg.Deflation.sketch(op, op.dim, options.hutchpp_sketch, generator, op.device, vector_dtype(op))
    plain, plus = linalg.traces(op, op.dim, max_probes=options.trace_probes, tol=options.trace_tol,
                                generator=generator, device=op.device, rule=options.trace_rule,
                                dtype=vector_dtype(op), deflation=deflation,
                                plain_follows=options.trace_rule == "stderr")
    if krylov is not None:  # the products of the SLQ run its basis came from
        plus.n_products += krylov.n_products
    return {key("train", "trace"): plain.value, key("train", "trace_stderr"): plain.stderr,
            key("train", "hvp_trace"): float(plain.n_products),
            key("train", "trace_hutchpp"): plus.value,
            key("train", "trace_hutchpp_stderr"): 0.0 if deflation.full else plus.stderr,
            key("train", "hvp_trace_hutchpp"): float(plus.n_products),
            key("train", "hvp_traces"): float(op.n_products - before)}


def _xtrace_values(op: HessianOperator, options: HessianOptions, generator) -> dict[str, float]:
    """XTrace with `xtrace_vectors` normalized test vectors (`xtrace.xtrace`, 2 k products), if asked for."""
    if options.xtrace_vectors == 0:
        return {}
    res = xtrace.xtrace(op, op.dim, 2 * options.xtrace_vectors, generator, op.device, vector_dtype(op))
    return {key("train", "trace_xtrace"): res.value, key("train", "trace_xtrace_stderr"): res.stderr,
            key("train", "hvp_trace_xtrace"): float(res.n_products)}


def _density_values(op: HessianOperator, options: HessianOptions, generator
                    ) -> tuple[dict[str, float], linalg.Lanczos | None]:
    """The SLQ density entries, and the first probe's Lanczos run (None without density)."""
    if options.density_probes == 0:
        return {}, None
    quad = linalg.slq(op, op.dim, options.density_iters, options.density_probes, generator, op.device,
                      vector_dtype(op))
    grid = quad.grid(options.density_points)
    phi = quad.density(grid, options.density_sigma * (grid[-1] - grid[0]))
    out = {key("train", "density", float(t)): float(v) for t, v in zip(grid, phi)}
    out[key("train", "hvp_density")] = float(quad.n_products)
    return out, quad.first_run


def hessian(model, data: MetricData, options: HessianOptions, generator) -> dict[str, float]:
    """Top-k eigenvalues (Lanczos), trace (Hutchinson, Hutch++) and SLQ density of H of the training loss.

    All on one fixed batch (drawn first from `generator`), in eval mode; see the module docstring
    for the keys. A batch whose loss is not finite gives NaN for every scalar quantity.
    """
    batch = hessian_batch(data.train, options, generator)
    with eval_mode(model):
        if not _finite_loss(model, batch):
            return _not_finite()
        out, eigs = _estimates(operator(model, batch, options), options, generator)
    _save_eigenvectors(model, eigs, data, options)
    return out


def hessian_seeds(models: Sequence, datas: Sequence[MetricData], options: HessianOptions, generators: Sequence
                  ) -> list[dict[str, float]]:
    """[`hessian`(models[s], datas[s], options, generators[s])] for models of one architecture (a cell's
    seeds), with their Hessian-vector products computed together (`hvp_lockstep`: one backward of
    their ensemble per round of products; for one model, its ensemble form). Each model draws its
    batch from its own generator and runs its own estimators with it, so it gets its sequential
    values up to rounding. Falls back to `hessian`'s operator, model after model, where the
    ensemble cannot serve: batches split into chunks, the `func` product, or an arch without an
    ensemble form. The datas share their training split (the first one's is used) and differ in their
    state folders.
    """
    batches = [hessian_batch(datas[0].train, options, g) for g in generators]
    out: list[dict[str, float] | None] = [None] * len(models)
    with eval_mode(*models):
        for i, (model, batch) in enumerate(zip(models, batches)):
            if not _finite_loss(model, batch):
                out[i] = _not_finite()
        live = [i for i, v in enumerate(out) if v is None]
        together = (bool(live) and options.hvp == "double_backward" and len(batches[0]) <= options.chunk_size
                    and all(ensemble_models.has_form(models[i]) for i in live))
        if together:
            p = next(models[live[0]].parameters())
            lockstep = LockstepHessians([models[i] for i in live], [batches[i].x.to(p.device, p.dtype) for i in live],
                                        [batches[i].y.to(p.device) for i in live])
            values = lockstep.run([functools.partial(_estimates, options=options, generator=generators[i])
                                   for i in live])
        else:
            values = [_estimates(operator(models[i], batches[i], options), options, generators[i]) for i in live]
    for i, (v, eigs) in zip(live, values):
        out[i] = v
        _save_eigenvectors(models[i], eigs, datas[i], options)
    return out


def _not_finite() -> dict[str, float]:
    return {key("train", q): math.nan for q in ("top_eigenvalue", "top_abs_eigenvalue", "trace", "trace_hutchpp")}


def _estimates(op, options: HessianOptions, generator) -> tuple[dict[str, float], linalg.Eigs]:
    """Density, eigenvalues (from the density's Krylov run with `eig_start` "slq"), then traces (Hutch++
    on that run's Krylov basis) of the operator `op`; and the Lanczos result of the eigenvalues."""
    density, run = _density_values(op, options, generator)
    out, eigs = _eig_values(op, options, generator, run)
    out.update(_trace_values(op, options, generator, run if options.hutchpp_basis == "krylov" else None))
    out.update(_xtrace_values(op, options, generator))
    out.update(density)
    return out, eigs


def _save_eigenvectors(model, eigs: linalg.Eigs, data: MetricData, options: HessianOptions) -> None:
    """With `save_eigenvectors` and a state folder: the top_k Ritz vectors of `eigs` (unit norm, signed as
    `EigenPairs`) as groups "top1".."top<k>" with their Ritz values, in `EIGENVECTORS_FILE` there."""
    if not options.save_eigenvectors or data.state_dir is None:
        return
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pairs = EigenPairs(np.asarray(eigs.top, np.float64), _unit_signed(eigs.vectors), np.asarray(eigs.residuals),
                       bool(eigs.converged), int(eigs.n_products), tuple(n for n, _ in named),
                       tuple(tuple(p.shape) for _, p in named))
    save_vectors(Path(data.state_dir) / EIGENVECTORS_FILE,
                 {f"top{i + 1}": pairs.tensors(i) for i in range(len(pairs.values))},
                 {f"top{i + 1}": float(v) for i, v in enumerate(pairs.values)})


def _unit_signed(vectors: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit norm, its sign fixed so that its entry of largest magnitude is positive."""
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    biggest = vectors.abs().argmax(dim=1, keepdim=True)
    return vectors * torch.sign(vectors.gather(1, biggest))


def _finite_loss(model, split: Split) -> bool:
    """Whether the cross-entropy on `split` is finite (a diverged model's is not); one forward pass per chunk."""
    p = next(model.parameters())
    with torch.no_grad():
        return all(bool(torch.isfinite(F.cross_entropy(model(b.x.to(p.device, p.dtype)), b.y.to(p.device))))
                   for b in split.batches(1000))


# --------------------------------------------------------------------------- eigenvectors
@dataclass(frozen=True)
class EigenPairs:
    """Eigenpairs of H from `top_eigenvectors`, the most extreme first.

    `values`: (k,) float64 array of Ritz values theta_i, descending (the top end) or ascending (the
    bottom end). `vectors`: (k, P) tensor, row i the Ritz vector y_i over the trainable parameters
    flattened in `model.parameters()` order: unit norm and mutually orthogonal to rounding (Ritz
    vectors of a fully reorthogonalised Lanczos run), in `vector_dtype` (float64 for a float64 model,
    else float32), on the model's device, the sign fixed so that its entry of largest magnitude is
    positive. `residuals`: r_i = ||H y_i - theta_i y_i||, so some eigenvalue lambda of H has
    |theta_i - lambda| <= r_i, and its eigenvector u_i has sin angle(y_i, u_i) <= r_i / gap_i (Davis-Kahan),
    gap_i the distance from theta_i to the rest of the spectrum. `converged`: whether the stopping test
    passed within `lanczos_iters` products; `n_products`: Hessian-vector products used. `names`,
    `shapes`: the parameters a row splits into (`tensors`).
    """

    values: np.ndarray
    vectors: torch.Tensor
    residuals: np.ndarray
    converged: bool
    n_products: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Row i as {parameter name: tensor shaped like that parameter} (views of the row)."""
        pieces = torch.split(self.vectors[i], [math.prod(s) for s in self.shapes])
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes)}


# the eigenvector defaults: `hessian`'s, with the residual rule (it bounds the vectors' errors)
EIGENVECTOR_OPTIONS = HessianOptions(eig_rule="residual", eig_start="gradient", density_probes=0)


def top_eigenvectors(model, data, k: int = 1, options: HessianOptions | None = None,
                     generator: torch.Generator | None = None, *, bottom: bool = False) -> EigenPairs:
    """The k largest algebraic eigenpairs of H (with `bottom`, the k smallest), by Lanczos.

    H is the `hessian` metric's: the mean training cross-entropy on the fixed batch
    `hessian_batch(data.train, options, generator)` (drawn first from `generator`), eval mode, over
    the trainable parameters. Lanczos (`linalg.lanczos_eigs`, full reorthogonalisation) runs on
    v -> H v, or on v -> -H v for the bottom end (its top eigenpairs are H's bottom ones, negated
    back), from the gradient-mixed start (`eig_start` "slq" or "gradient"; "random": Gaussian),
    until the k wanted Ritz values pass `options.eig_rule` at `options.tol` (relative to the largest
    |Ritz value|) or `lanczos_iters` products are spent. The default options (`EIGENVECTOR_OPTIONS`)
    are `hessian`'s with the residual rule, r_i <= tol max|theta|, which bounds the vectors' errors
    (see `EigenPairs`); the gap rule bounds the eigenvalues' errors by r_i^2 / gap_i and lets
    r_i, and so the vector error, stay near sqrt(tol |theta| gap_i).

    `data`: a `MetricData`, or the training examples as (x, y) tensors, a Dataset or a DataLoader
    (`base.metric_data`, moved to the model's device and dtype).
    Returns `EigenPairs` (values float64, vectors as one (k, P) tensor and per parameter via `tensors`).
    Raises ValueError for k outside [1, min(lanczos_iters, P)] or a loss on the batch that is not finite.
    """
    options = options if options is not None else EIGENVECTOR_OPTIONS
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    data = metric_data(data, model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for _, p in named)
    if not 1 <= k <= min(options.lanczos_iters, n_params):
        raise ValueError(f"k must be in [1, {min(options.lanczos_iters, n_params)}] (lanczos_iters "
                         f"{options.lanczos_iters}, {n_params} parameters), got {k}")
    batch = hessian_batch(data.train, options, generator)
    sign = -1.0 if bottom else 1.0
    with eval_mode(model):
        if not _finite_loss(model, batch):
            raise ValueError("the training loss on the Hessian batch is not finite")
        op = operator(model, batch, options)
        hint = op.gradient() if options.eig_start in ("slq", "gradient") else None
        eigs = linalg.lanczos_eigs(lambda v: sign * op(v), op.dim, k, options.lanczos_iters, options.tol, generator,
                                   op.device, options.eig_rule, vector_dtype(op), hint, magnitude=False)
    return EigenPairs(sign * np.asarray(eigs.top, dtype=np.float64), _unit_signed(eigs.vectors), np.asarray(eigs.residuals, np.float64),
                      bool(eigs.converged), int(eigs.n_products), tuple(n for n, _ in named),
                      tuple(tuple(p.shape) for _, p in named))


# --------------------------------------------------------------------------- density plots
def density_curve(values: Mapping[str, float], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(t, phi(t)) sorted by t, from the `density@t` entries of a `hessian` result dict."""
    pts = sorted((c, v) for k, v in values.items() for s, q, c in [parse_key(k)]
                 if s == split and q == "density" and c is not None)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _draw(ax, curves: list[tuple[np.ndarray, np.ndarray]], title: str) -> None:
    from matplotlib.ticker import LogLocator, NullLocator

    for t, phi in curves:
        ax.plot(t, np.maximum(phi, 1e-300), lw=1)
    peak = max((float(phi.max()) for _, phi in curves if len(phi)), default=1.0)
    ax.set_yscale("log")
    ax.set_ylim(peak * 1e-6, peak * 2)
    ax.yaxis.set_major_locator(LogLocator(numticks=4))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)


def density_figure(source, load: str = "width", temperature: str = "batch_size"):
    """A matplotlib Figure of Hessian spectral densities (log scale).

    `source` is either one `hessian` result dict (one panel) or a results table (DataFrame with
    the rows of `table.collect`): then one panel per cell, laid out like the phase diagram
    (load across, temperature down), one line per seed.
    """
    from matplotlib.figure import Figure

    if isinstance(source, Mapping):
        fig = Figure(figsize=(4, 3))
        _draw(fig.add_subplot(), [density_curve(source)], "Hessian spectral density")
        axes_label = [fig.axes[0]]
    else:
        fig, axes_label = _table_figure(source, load, temperature)
    for ax in axes_label:
        ax.set_xlabel("eigenvalue", fontsize=7)
    fig.tight_layout()
    return fig


def _table_figure(df, load: str, temperature: str):
    from matplotlib.figure import Figure

    rows = df[(df["metric"] == "density") & (df["split"] == "train") & (df["status"] == "ok")]
    if "source" in rows:
        rows = rows[rows["source"] == NAME]
    loads, temps = sorted(rows[load].unique()), sorted(rows[temperature].unique())
    fig = Figure(figsize=(2.6 * max(1, len(loads)), 2.2 * max(1, len(temps))))
    if rows.empty:
        fig.add_subplot().text(0.5, 0.5, "no Hessian densities yet", ha="center", va="center")
        return fig, []
    axes = fig.subplots(len(temps), len(loads), squeeze=False)
    for (t_val, l_val), cell in rows.groupby([temperature, load]):
        curves = [(g["coord"].to_numpy(float), g["value"].to_numpy(float))
                  for _, g in cell.sort_values("coord").groupby("seed")]
        _draw(axes[temps.index(t_val)][loads.index(l_val)], curves, f"{load} {l_val:g}, {temperature} {t_val:g}")
    return fig, list(axes[-1])


METRIC = Metric(
    "hessian", "single", hessian, HessianOptions,
    panels=(Panel("top_eigenvalue", "train", "top Hessian eigenvalue", log=True, cmap="viridis_r",
                  fallback=Panel("top_abs_eigenvalue", "train", "largest-magnitude Hessian eigenvalue", log=True,
                                 cmap="viridis_r")),
            Panel("trace_hutchpp", "train", "Hessian trace (Hutch++)", log=True, cmap="viridis_r",
                  fallback=Panel("trace", "train", "Hessian trace (Hutchinson)", log=True, cmap="viridis_r"))),
    description="training-loss Hessian: top eigenvalues (Lanczos), trace (Hutchinson, Hutch++), SLQ density",
    compute_seeds=hessian_seeds,
    group_size=policy.seed_group,
    stderrs=("trace_stderr", "trace_hutchpp_stderr"),
    diagnostics=("hvp_eig", "hvp_trace", "hvp_trace_hutchpp", "hvp_traces", "hvp_density", "eig_converged"),
    test_options={"batch_size": 64, "lanczos_iters": 10, "trace_probes": 4, "hutchpp_sketch": 2, "density_iters": 8,
                  "density_points": 10},
)
