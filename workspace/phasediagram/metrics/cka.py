"""`CKA`: linear centred kernel alignment between the representations of two seeds.

Linear CKA (Kornblith et al., ICML 2019) of two representations X (n x p) and Y (n x q) of the
same n inputs, with Xc = X - 1 mean(X)^T and Yc = Y - 1 mean(Y)^T the column-centred matrices:

    feature space:  CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
    Gram space:     CKA(X, Y) = <K~, L~>_F / (||K~||_F ||L~||_F),  K~ = H X X^T H,  L~ = H Y Y^T H,
                    H = I - (1/n) 1 1^T

The two forms are equal because <K~, L~>_F = tr(Xc Xc^T Yc Yc^T) = ||Yc^T Xc||_F^2 and
||K~||_F = ||Xc Xc^T||_F = ||Xc^T Xc||_F. CKA lies in [0, 1], equals 1 for X = Y, and is invariant
to orthogonal transforms and isotropic scalings of either representation, but not to general
invertible linear maps.

The metric (reference setting of Yang et al. 2021) feeds the same mixup batches of training
inputs (lambda ~ Beta(16, 16), 6 batches of 128) to both models in eval mode and computes CKA over
all 6 * 128 mixed examples at once, on the logits, on the softmax outputs and optionally on the
(flattened) outputs of named hidden modules. Memory stays bounded: the feature-space form
accumulates X^T X, Y^T Y, Y^T X and the column sums batch by batch (O((p + q)^2) memory,
independent of n); when features outnumber examples the Gram-space form is used instead
(O(n (p + q) + n^2) memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.data.datasets import mixup
from phasediagram.errors import SpecError
from phasediagram.metrics.base import PAIR_SELECTIONS, MetricData, key
from phasediagram.models.modes import eval_mode
from phasediagram.options import choice, integer, real, rule, validate

PAIRS = PAIR_SELECTIONS
METHODS = ("auto", "feature", "gram")
_GRAM_CHUNK = 4096  # feature columns per chunk when forming an n x n Gram matrix in float64


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) by the feature-space formula.

    Args:
        x: (n, p) representation, rows are examples (extra dimensions are flattened).
        y: (n, q) representation of the same n examples.

    Returns:
        The CKA value in float64 arithmetic; NaN when either centred representation is zero.
    """
    acc = CKAAccumulator("feature")
    acc.update(x, y)
    return acc.value()


def linear_cka_gram(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA <H K H, H L H>_F / (||H K H||_F ||H L H||_F) with K = X X^T, L = Y Y^T (Gram space)."""
    acc = CKAAccumulator("gram")
    acc.update(x, y)
    return acc.value()


class CKAAccumulator:
    """Linear CKA over examples that arrive in batches; `value()` equals the one-shot CKA of all rows.

    Feature form: accumulates n, s_x = X^T 1, s_y = Y^T 1, X^T X, Y^T Y and Y^T X in float64, then
    centres by Xc^T Xc = X^T X - s_x s_x^T / n (likewise for the others). Gram form: keeps the rows
    and centres K = X X^T, L = Y Y^T with H at the end. `method="auto"` chooses the feature form
    when max(p, q) <= the expected number of examples `n_hint` (or when no hint is given and
    max(p, q) <= 1024), else the Gram form.
    """

    def __init__(self, method: str = "auto", n_hint: int | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.n_hint = method, n_hint
        self.n = 0
        self._xs: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []

    def _choose(self, p: int, q: int) -> str:
        if self.method != "auto":
            return self.method
        return "feature" if max(p, q) <= (self.n_hint if self.n_hint is not None else 1024) else "gram"

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the rows of x (b, p) and y (b, q), the representations of the same b examples."""
        x, y = x.detach().flatten(1), y.detach().flatten(1)
        if len(x) != len(y):
            raise ValueError(f"x and y hold {len(x)} and {len(y)} examples")
        if self.n == 0:
            self.form = self._choose(x.shape[1], y.shape[1])
            if self.form == "feature":
                z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
                p, q = x.shape[1], y.shape[1]
                self.sx, self.sy, self.xx, self.yy, self.yx = z(p), z(q), z(p, p), z(q, q), z(q, p)
        self.n += len(x)
        if self.form == "feature":
            xd, yd = x.double(), y.double()
            self.sx += xd.sum(0)
            self.sy += yd.sum(0)
            self.xx += xd.T @ xd
            self.yy += yd.T @ yd
            self.yx += yd.T @ xd
        else:
            self._xs.append(x)
            self._ys.append(y)

    def value(self) -> float:
        if self.n == 0:
            raise ValueError("no examples were added")
        if self.form == "feature":
            n = self.n
            cxx = self.xx - torch.outer(self.sx, self.sx) / n
            cyy = self.yy - torch.outer(self.sy, self.sy) / n
            cyx = self.yx - torch.outer(self.sy, self.sx) / n
            num = (cyx ** 2).sum()
            den = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
        else:
            k = _centred_gram(torch.cat(self._xs))
            l_ = _centred_gram(torch.cat(self._ys))
            num = (k * l_).sum()
            den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
        return float(num / den) if float(den) > 0 else float("nan")


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    """H (X X^T) H in float64, formed from column chunks of X so that only one chunk is copied to float64."""
    k = torch.zeros(len(x), len(x), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], _GRAM_CHUNK):
        c = x[:, start:start + _GRAM_CHUNK].double()
        k += c @ c.T
    row = k.mean(0, keepdim=True)
    return k - row - row.T + k.mean()


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
    features outnumber examples); `pairs` which seed pairs of a cell are compared.
    """

    mixup_alpha: float = real(16.0, low=0, open_low=True)
    batches: int = integer(6, low=1)
    batch_size: int = integer(128, low=2)
    layers: tuple[str, ...] = rule((), lambda v: _module_names(v) is not None, "a list of module names")
    method: str = choice("auto", METHODS)
    pairs: str = choice("all", PAIRS)

    def __post_init__(self):
        validate(self, "metric_options.CKA")
        object.__setattr__(self, "layers", _module_names(self.layers))


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
    mode and accumulate the CKA statistics; report CKA over all batches * batch_size examples.
    """
    n = options.batches * min(options.batch_size, len(data.train))
    names = ("logits", "softmax") + options.layers
    accs = {name: CKAAccumulator(options.method, n_hint=n) for name in names}
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
