"""`CKA`: linear centred kernel alignment between the representations of two seeds.

Linear CKA (Kornblith et al., ICML 2019) of two representations X (n x p) and Y (n x q) of the
same n inputs, with Xc = X - 1 mean(X)^T and Yc = Y - 1 mean(Y)^T the column-centred matrices:

    feature space:  CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
    Gram space:     CKA(X, Y) = <K~, L~>_F / (||K~||_F ||L~||_F),  K~ = H X X^T H,  L~ = H Y Y^T H,
                    H = I - (1/n) 1 1^T

The two forms are equal because <K~, L~>_F = tr(Xc Xc^T Yc Yc^T) = ||Yc^T Xc||_F^2 and
||K~||_F = ||Xc Xc^T||_F = ||Xc^T Xc||_F. CKA lies in [0, 1], equals 1 for X = Y, and is invariant
to orthogonal transforms and isotropic scalings of either representation, but not to general
invertible linear maps. Both forms cost memory for one side only: the feature form
O((p + q)^2), accumulated over batches of rows, the Gram form O(n^2) plus the rows and a float64
copy of up to 4096 of their columns at a time; the one with the smaller side is chosen (feature
form when max(p, q) <= n). The Gram form's K = X X^T is symmetric, so it is formed by a symmetric
rank-k update (half the multiply-adds of a general product) on the CPU.

Estimators (`estimator` option), all ratios HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)):

- "biased": the plug-in HSIC_0(K, L) = tr(K~ L~) / (n - 1)^2 above.
- "debiased": the unbiased HSIC of Song et al. (2012), with K' = K - diag(K), L' = L - diag(L),

      HSIC_1(K, L) = [tr(K' L') + 1^T K' 1 1^T L' 1 / ((n - 1)(n - 2)) - 2/(n - 2) 1^T K' L' 1] / (n (n - 3)),

  as in Kornblith et al.'s `cka(gram_linear(X), gram_linear(Y), debiased=True)` (Gram form: the
  U-centred Gram matrices of Szekely & Rizzo 2014, whose inner product is HSIC_1; feature form: the
  same sums written with X^T X, X^T Y, the row norms a_i = ||x_i||^2, b_i = ||y_i||^2 and the column
  sums). HSIC_1 is unchanged when a constant row is subtracted from X or Y, so the feature form
  accumulates rows shifted by the first batch's column means. It needs n >= 4 and may be negative.
- "minibatch" (Nguyen et al., ICLR 2021): HSIC_1 of each minibatch b (each `update` call), averaged
  over the k minibatches before the ratio is formed:
  sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) sum_b HSIC_1(L_b, L_b)).

The metric (reference setting of Yang et al. 2021) feeds the same mixup batches of training
inputs (lambda ~ Beta(16, 16), 6 batches of 128) to both models in eval mode and computes CKA over
all 6 * 128 mixed examples (each batch a minibatch for "minibatch"), on the logits, on the softmax
outputs and optionally on the (flattened) outputs of named hidden modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.data.datasets import mixup
from phasediagram.errors import SpecError
from phasediagram.metrics.base import PAIR_SELECTIONS, Metric, MetricData, Panel, key
from phasediagram.models.modes import eval_mode
from phasediagram.options import choice, integer, out_of_range, real, rule, validate

PAIRS = PAIR_SELECTIONS
METHODS = ("auto", "feature", "gram")
ESTIMATORS = ("biased", "debiased", "minibatch")
UNBIASED_MIN_EXAMPLES = 4  # HSIC_1 divides by n (n - 3)
_GRAM_CHUNK = 4096  # feature columns per chunk when forming an n x n Gram matrix in float64
_ROW_CHUNK = 4096  # rows per batch when `linear_cka` accumulates the feature form


def choose_form(p: int, q: int, n: int) -> str:
    """"feature" when max(p, q) <= n (a (p + q)^2 accumulator is no larger than an n x n Gram matrix), else "gram"."""
    return "feature" if max(p, q) <= n else "gram"


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False, method: str = "auto") -> float:
    """Linear CKA of x (n, p) and y (n, q) (extra dimensions flattened), biased or with HSIC_1 (module docstring).

    `method="auto"` takes the feature form when max(p, q) <= n, accumulated over batches of rows, and
    the Gram form otherwise; both give the same value. Returns a float64 value; NaN when a
    denominator HSIC is not positive (e.g. a constant representation).
    """
    x, y = x.detach().flatten(1), y.detach().flatten(1)
    form = choose_form(x.shape[1], y.shape[1], len(x)) if method == "auto" else method
    acc = CKAAccumulator(form, estimator="debiased" if debiased else "biased")
    step = _ROW_CHUNK if form == "feature" else max(len(x), 1)
    for start in range(0, len(x), step):
        acc.update(x[start:start + step], y[start:start + step])
    return acc.value()


def linear_cka_feature(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) in feature space (or its HSIC_1 form)."""
    return linear_cka(x, y, debiased, method="feature")


def linear_cka_gram(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA <H K H, H L H>_F / (||H K H||_F ||H L H||_F) with K = X X^T, L = Y Y^T (or its HSIC_1 form)."""
    return linear_cka(x, y, debiased, method="gram")


class CKAAccumulator:
    """Linear CKA over examples that arrive in batches; `value()` equals the one-shot CKA of all rows
    ("biased", "debiased") or the minibatch CKA of the batches ("minibatch", one minibatch per `update`).

    Feature form: accumulates, in float64 over rows shifted by the first batch's column means c,
    n, s_x = X^T 1, s_y = Y^T 1, X^T X, Y^T Y, Y^T X and (for HSIC_1) the sums of a_i, b_i, a_i^2,
    b_i^2, a_i b_i and X^T a, X^T b, Y^T a, Y^T b. Gram form: keeps the rows and centres K = X X^T,
    L = Y Y^T at the end. `method="auto"` chooses the feature form when max(p, q) <= the expected
    number of examples `n_hint` (or when no hint is given and max(p, q) <= 1024), else the Gram form;
    for "minibatch" each minibatch chooses by its own size.
    """

    def __init__(self, method: str = "auto", n_hint: int | None = None, estimator: str = "biased"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.method, self.n_hint, self.estimator = method, n_hint, estimator
        self.n = 0
        self.batches = 0
        self._xs: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []
        self._sums = [0.0, 0.0, 0.0]  # minibatch: sum_b HSIC_1(K_b, L_b), (K_b, K_b), (L_b, L_b)

    def _choose(self, p: int, q: int, n: int) -> str:
        if self.method != "auto":
            return self.method
        if self.estimator == "minibatch":
            return choose_form(p, q, n)
        return choose_form(p, q, self.n_hint if self.n_hint is not None else 1024)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the rows of x (b, p) and y (b, q), the representations of the same b examples."""
        x, y = x.detach().flatten(1), y.detach().flatten(1)
        if len(x) != len(y):
            raise ValueError(f"x and y hold {len(x)} and {len(y)} examples")
        if self.estimator == "minibatch":
            part = CKAAccumulator(self._choose(x.shape[1], y.shape[1], len(x)), estimator="debiased")
            part.update(x, y)
            self._sums = [s + t for s, t in zip(self._sums, part.hsic())]
            self.n += len(x)
            self.batches += 1
            self.form = part.form
            return
        if self.n == 0:
            self.form = self._choose(x.shape[1], y.shape[1], len(x))
            if self.form == "feature":
                self._start_moments(x, y)
        self.n += len(x)
        self.batches += 1
        if self.form == "feature":
            self._add_moments(x, y)
        else:
            self._xs.append(x)
            self._ys.append(y)

    def _start_moments(self, x: torch.Tensor, y: torch.Tensor) -> None:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
        p, q = x.shape[1], y.shape[1]
        self.cx, self.cy = x.double().mean(0), y.double().mean(0)
        self.sx, self.sy, self.xx, self.yy, self.yx = z(p), z(q), z(p, p), z(q, q), z(q, p)
        if self.estimator != "biased":
            self.xa, self.xb, self.ya, self.yb = z(p), z(p), z(q), z(q)
            self.sa = self.sb = self.saa = self.sbb = self.sab = 0.0

    def _add_moments(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xd, yd = x.double() - self.cx, y.double() - self.cy
        self.sx += xd.sum(0)
        self.sy += yd.sum(0)
        self.xx.addmm_(xd.T, xd)
        self.yy.addmm_(yd.T, yd)
        self.yx.addmm_(yd.T, xd)
        if self.estimator != "biased":
            a, b = (xd * xd).sum(1), (yd * yd).sum(1)
            self.xa += xd.T @ a
            self.xb += xd.T @ b
            self.ya += yd.T @ a
            self.yb += yd.T @ b
            self.sa, self.sb = self.sa + float(a.sum()), self.sb + float(b.sum())
            self.saa, self.sbb, self.sab = (self.saa + float(a @ a), self.sbb + float(b @ b),
                                            self.sab + float(a @ b))

    def hsic(self) -> tuple[float, float, float]:
        """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) of the rows added: HSIC_0 for "biased", HSIC_1 otherwise
        (for "minibatch", the sums over the minibatches)."""
        if self.n == 0:
            raise ValueError("no examples were added")
        if self.estimator == "minibatch":
            return tuple(self._sums)
        if self.estimator != "biased" and self.n < UNBIASED_MIN_EXAMPLES:
            raise ValueError(f"the unbiased HSIC needs at least {UNBIASED_MIN_EXAMPLES} examples, got {self.n}")
        if self.form == "gram":
            return _gram_hsic(_cat(self._xs), _cat(self._ys), unbiased=self.estimator != "biased")
        return self._feature_hsic_biased() if self.estimator == "biased" else self._feature_hsic_unbiased()

    def _feature_hsic_biased(self) -> tuple[float, float, float]:
        n = self.n

        def centred_sq_norm(m, u, v):  # ||M - u v^T / n||_F^2, one temporary at a time
            return float(torch.addr(m, u, v, alpha=-1.0 / n).square_().sum())

        scale = (n - 1) ** 2 if n > 1 else 1
        return (centred_sq_norm(self.yx, self.sy, self.sx) / scale, centred_sq_norm(self.xx, self.sx, self.sx) / scale,
                centred_sq_norm(self.yy, self.sy, self.sy) / scale)

    def _feature_hsic_unbiased(self) -> tuple[float, float, float]:
        n = self.n
        sx, sy = self.sx, self.sy

        def u_stat(trace_kl, one_k_one, one_l_one, k1_dot_l1):
            return float(trace_kl + one_k_one * one_l_one / ((n - 1) * (n - 2))
                         - 2.0 / (n - 2) * k1_dot_l1) / (n * (n - 3))

        k1k = float(sx @ sx) - self.sa  # 1^T K' 1
        l1l = float(sy @ sy) - self.sb
        kl = u_stat(float((self.yx ** 2).sum()) - self.sab, k1k, l1l,
                    float(sy @ self.yx @ sx) - float(sx @ self.xb) - float(sy @ self.ya) + self.sab)
        kk = u_stat(float((self.xx ** 2).sum()) - self.saa, k1k, k1k,
                    float(sx @ self.xx @ sx) - 2.0 * float(sx @ self.xa) + self.saa)
        ll = u_stat(float((self.yy ** 2).sum()) - self.sbb, l1l, l1l,
                    float(sy @ self.yy @ sy) - 2.0 * float(sy @ self.yb) + self.sbb)
        return kl, kk, ll

    def value(self) -> float:
        """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); NaN when the denominator is not positive."""
        kl, kk, ll = self.hsic()
        return kl / (kk * ll) ** 0.5 if kk > 0 and ll > 0 else float("nan")


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """K = X X^T (n x n) in float64, X copied to float64 one column chunk at a time.

    K is symmetric: on the CPU each chunk's X_c X_c^T is numpy's product of the float64 chunk with
    its own transpose, which numpy computes by a symmetric rank-k update (BLAS syrk: one triangle,
    half the multiply-adds of a general product, then mirrored). Elsewhere (torch has no
    symmetric product) the chunks' full products are summed. A float64 X held contiguously is used
    as it is, in one product."""
    n, d = x.shape
    if x.device.type != "cpu":
        k = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        for start in range(0, d, _GRAM_CHUNK):
            c = x[:, start:start + _GRAM_CHUNK].double()
            k.addmm_(c, c.T)
        return k
    if x.dtype == torch.float64 and x.is_contiguous():
        chunks = [x.numpy()]
    else:
        width = min(d, _GRAM_CHUNK)
        buf = torch.empty(n * width, dtype=torch.float64)
        chunks = (buf[:n * c.shape[1]].view(n, c.shape[1]).copy_(c).numpy()
                  for c in (x[:, s:s + width] for s in range(0, d, width)))
    k = None
    for c in chunks:
        part = c @ c.T
        k = part if k is None else np.add(k, part, out=k)
    return torch.from_numpy(k) if k is not None else torch.zeros(n, n, dtype=torch.float64)


def _centre(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """H K H (biased), or the U-centred K^ of Szekely & Rizzo (2014) with <K^, L^> = n (n - 3) HSIC_1(K, L), in place.

    Both subtract m 1^T + 1 m^T from K (from K' = K - diag(K) when unbiased), with r the row sums:
    biased r = K 1, m = r / n - 1^T r / (2 n^2), so that K - m 1^T - 1 m^T = H K H; unbiased r = K' 1,
    m = r / (n - 2) - 1^T r / (2 (n - 1)(n - 2)), and diag(K^) = 0."""
    n = len(k)
    if unbiased:
        k.fill_diagonal_(0.0)
    r = k.sum(0)
    m = r / (n - 2) - r.sum() / (2 * (n - 1) * (n - 2)) if unbiased else r / n - r.sum() / (2 * n * n)
    k.sub_(m[None, :]).sub_(m[:, None])
    return k.fill_diagonal_(0.0) if unbiased else k


def _gram_hsic(x: torch.Tensor, y: torch.Tensor, unbiased: bool) -> tuple[float, float, float]:
    """(HSIC(K, L), HSIC(K, K), HSIC(L, L)) of K = X X^T, L = Y Y^T in Gram space."""
    n = len(x)
    scale = n * (n - 3) if unbiased else max(n - 1, 1) ** 2
    k, l_ = _centre(_gram(x), unbiased).reshape(-1), _centre(_gram(y), unbiased).reshape(-1)
    return float(k @ l_) / scale, float(k @ k) / scale, float(l_ @ l_) / scale


def _module_names(value) -> tuple[str, ...] | None:
    """`layers` as a tuple of non-empty names (one name may be given alone), or None if it is not that."""
    names = (value,) if isinstance(value, str) else value
    ok = isinstance(names, (list, tuple)) and all(isinstance(s, str) and s for s in names)
    return tuple(names) if ok else None


@dataclass(frozen=True)
class CKAOptions:
    """Reference setting: 6 mixup batches of 128 training examples, lambda ~ Beta(16, 16).

    `layers` names hidden modules (as in `model.named_modules()`) whose flattened outputs are also
    compared, as quantity `cka_<name>`; `method` picks the CKA form ("auto": feature space unless
    features outnumber examples); `estimator` the HSIC estimator ("biased", "debiased": HSIC_1 over
    all examples, "minibatch": HSIC_1 per mixup batch averaged over the batches; module docstring);
    `pairs` which seed pairs of a cell are compared.
    """

    mixup_alpha: float = real(16.0, low=0, open_low=True)
    batches: int = integer(6, low=1)
    batch_size: int = integer(128, low=2)
    layers: tuple[str, ...] = rule((), lambda v: _module_names(v) is not None, "a list of module names")
    method: str = choice("auto", METHODS)
    pairs: str = choice("all", PAIRS)
    estimator: str = choice("biased", ESTIMATORS)

    def __post_init__(self):
        validate(self, "metric_options.CKA")
        object.__setattr__(self, "layers", _module_names(self.layers))
        unbiased_examples = {"debiased": self.batches * self.batch_size, "minibatch": self.batch_size}
        if unbiased_examples.get(self.estimator, UNBIASED_MIN_EXAMPLES) < UNBIASED_MIN_EXAMPLES:
            raise out_of_range("metric_options.CKA.batch_size", self.batch_size,
                               f"at least {UNBIASED_MIN_EXAMPLES} examples per "
                               f"{'batch' if self.estimator == 'minibatch' else 'measurement'} "
                               f"with estimator {self.estimator!r}")

    def check_model(self, model: nn.Module) -> None:
        """At spec check (`resolve.check`, on the family's model): every name of `layers` is a module of
        `model`; `SpecError` naming the modules it has otherwise."""
        for handle in _hooks(model, self.layers, {}):
            handle.remove()


def _hooks(model: nn.Module, layers: tuple[str, ...], store: dict):
    handles = []
    names = dict(model.named_modules())
    for name in layers:
        if name not in names:
            raise SpecError("metric_options.CKA.layers", f"{name!r} is not a module of {type(model).__name__}; "
                            f"known: {', '.join(n for n in names if n)}")
        handles.append(names[name].register_forward_hook(
            lambda _m, _inp, out, name=name: store.__setitem__(name, out)))
    return handles


@torch.no_grad()
def cka(model_a: nn.Module, model_b: nn.Module, data: MetricData, options: CKAOptions, generator) -> dict[str, float]:
    """Linear CKA between two models' logits z, softmax(z) and hidden layers over mixup training inputs.

    For b = 1..batches: draw `batch_size` training inputs without replacement, mix them
    (x~ = lam x + (1 - lam) x[perm], lam ~ Beta(alpha, alpha)), feed x~ to both models in eval
    mode and accumulate the CKA statistics; report CKA over all batches * batch_size examples
    (`estimator` "biased" or "debiased"), or the minibatch CKA of the batches ("minibatch").
    """
    n = options.batches * min(options.batch_size, len(data.train))
    names = ("logits", "softmax") + options.layers
    accs = {name: CKAAccumulator(options.method, n_hint=n, estimator=options.estimator) for name in names}
    acts_a, acts_b = {}, {}
    handles = _hooks(model_a, options.layers, acts_a) + _hooks(model_b, options.layers, acts_b)
    try:
        with eval_mode(model_a, model_b):
            for _ in range(options.batches):
                x = mixup(data.train.batch(options.batch_size, generator).x, options.mixup_alpha, generator)
                za, zb = model_a(x).double(), model_b(x).double()
                accs["logits"].update(za, zb)
                accs["softmax"].update(F.softmax(za, dim=1), F.softmax(zb, dim=1))
                for name in options.layers:
                    accs[name].update(acts_a[name], acts_b[name])
    finally:
        for h in handles:
            h.remove()
    return {key("train", f"cka_{name}"): accs[name].value() for name in names}


METRIC = Metric(
    "CKA", "pair", cka, CKAOptions,
    panels=(Panel("cka_logits", "train", "CKA of logits (mixup inputs)", cmap="viridis", vmin=0.0, vmax=1.0),
            Panel("cka_softmax", "train", "CKA similarity", cmap="viridis", vmin=0.0, vmax=1.0)),
    description="linear CKA between two seeds' logits and softmax outputs on mixup training inputs",
    test_options={"batches": 2, "batch_size": 32},
    selects_pairs=True,
)
