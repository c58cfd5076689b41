"""`fisher`: the observed-Fisher metric of InfoMCR (Jia & Su, ICML 2020).

For a batch of n training examples let J be the n x P matrix whose row i is the gradient of the
cross-entropy of example i with respect to the P trainable parameters,
J_i = d CE(f(x_i; w), y_i) / dw. The batch value is

    gamma = sum_k log sigma_k(J) = 1/2 log det(J J^T),

and the metric is the mean of gamma over batches drawn at random from the training split
(reference: 100 batches of 100). Smaller values are associated with better generalisation.

Numerics. With D = diag(||J_i||) and C = D^-1 J J^T D^-1 (unit diagonal, trace n),
log det(J J^T) = 2 sum_i log ||J_i|| + log det C exactly. The row norms carry the scale of the
per-example gradients (which spans many decades at a minimum, where most examples are fitted),
and C only their angles, so this split keeps small but genuine singular values exact. G = J J^T
is accumulated in float64 and the eigenvalues mu_k of C come from `eigvalsh`. Two guards make
gamma finite: a row norm of exactly 0 (a saturated softmax) is replaced by the smallest positive
normal number of the gradient dtype, and eigenvalues mu_k < `floor` (rank deficiency: collinear
rows, dead units, or n > P) are replaced by `floor`. How many were replaced, per batch on
average, is reported as `train/fisher_floored`; it is 0 for a healthy measurement.

BatchNorm. Per-example gradients need a per-example function, so by default (`batchnorm="eval"`)
the model runs in eval mode with its running statistics: J_i is then the gradient of the model as
it is evaluated. The reference instead runs BatchNorm in train mode on chunks of 10 examples, so
that an example's loss also depends on its chunk through the batch statistics;
`batchnorm="train"` reproduces that (rows are the gradients of each example's loss in its chunk of
`chunk_size`; running statistics are not updated).

Logit normalisation. With `logit_norm = c`, every example's logit vector z is rescaled to
c z / ||z||_2 before the cross-entropy (the reference does this to compare minima of different
training losses, whose logit scales differ).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from phasediagram.metrics.base import Metric, MetricData, Panel, key, per_example_logits
from phasediagram.models.modes import eval_mode
from phasediagram.numerics.hvp import gradients
from phasediagram.options import choice, integer, out_of_range, real, validate

BATCHNORM_MODES = ("eval", "train")


@dataclass(frozen=True)
class FisherOptions:
    n_batches: int = integer(100, low=1)  # batches drawn from the training split (reference 100)
    batch_size: int = integer(100, low=2)  # n, examples per batch (reference 100)
    # "eval": running statistics; "train": batch statistics of chunks (reference)
    batchnorm: str = choice("eval", BATCHNORM_MODES)
    # chunk for batchnorm="train" (reference 10), dividing batch_size; unused in "eval"
    chunk_size: int = integer(10, low=2)
    # rescale each logit vector to this L2 norm before the loss
    logit_norm: float | None = real(None, low=0, open_low=True, optional=True)
    # eigenvalues of the normalised Gram below this are floored
    floor: float = real(1e-12, low=0, high=1, open_low=True, open_high=True)
    # examples per vmap call in eval mode (None: the whole batch)
    vmap_chunk: int | None = integer(None, low=1, optional=True)

    def __post_init__(self):
        validate(self, "metric_options.fisher")
        if self.batchnorm == "train" and self.batch_size % self.chunk_size != 0:
            raise out_of_range("metric_options.fisher.chunk_size", self.chunk_size,
                               'a divisor of batch_size with batchnorm="train"')


def per_example_losses(logits: torch.Tensor, y: torch.Tensor, logit_norm: float | None = None) -> torch.Tensor:
    """CE(z_i, y_i) for each row z_i of `logits`, after z_i -> logit_norm * z_i / ||z_i|| if given."""
    if logit_norm is not None:
        logits = logit_norm * logits / logits.norm(dim=-1, keepdim=True)
    return F.cross_entropy(logits, y, reduction="none")


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batchnorm: str = "eval",
                      chunk_size: int = 10, logit_norm: float | None = None,
                      vmap_chunk: int | None = None) -> torch.Tensor:
    """J (n x P): row i is the gradient of example i's cross-entropy w.r.t. the trainable parameters.

    Parameters are flattened in `model.named_parameters()` order. `batchnorm="eval"` vectorises
    `grad` over examples with `vmap` on a functional call in eval mode; `batchnorm="train"` runs
    a private copy of the model in train mode on chunks of `chunk_size` and takes the rows with one
    batched vector-Jacobian product per chunk. The model itself is left unchanged.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if batchnorm == "eval":
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())

        def loss_one(p, xi, yi):
            out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
            return per_example_losses(out, yi.unsqueeze(0), logit_norm)[0]

        with eval_mode(model):
            g = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=vmap_chunk)(params, x, y)
        return torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)
    if batchnorm != "train":
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    clone = copy.deepcopy(model).train()
    ps = [dict(clone.named_parameters())[n] for n in names]
    rows = []
    for start in range(0, len(x), chunk_size):
        xc, yc = x[start:start + chunk_size], y[start:start + chunk_size]
        losses = per_example_losses(clone(xc), yc, logit_norm)
        eye = torch.eye(len(xc), dtype=losses.dtype, device=losses.device)
        g = gradients(losses, ps, grad_outputs=eye, is_grads_batched=True)
        rows.append(torch.cat([gi.reshape(len(xc), -1) for gi in g], dim=1))
    return torch.cat(rows)


def gram64(J: torch.Tensor, block: int = 1 << 16) -> torch.Tensor:
    """G = J J^T accumulated in float64 over blocks of `block` columns (no float64 copy of all of J)."""
    G = torch.zeros(len(J), len(J), dtype=torch.float64, device=J.device)
    for start in range(0, J.shape[1], block):
        Jb = J[:, start:start + block].to(torch.float64)
        G += Jb @ Jb.T
    return G


def log_det_gamma(J: torch.Tensor, floor: float = 1e-12) -> tuple[float, int]:
    """gamma = 1/2 log det(J J^T) = sum_i log ||J_i|| + 1/2 sum_k log mu_k(C), C = D^-1 J J^T D^-1.

    G = J J^T is formed in float64 (`gram64`), ||J_i|| = sqrt(G_ii) and C_ij = G_ij / (||J_i|| ||J_j||)
    with C_ii = 1 set exactly. A zero row norm becomes the smallest positive normal number of J's
    dtype (its row of C is taken as orthogonal to the others), and eigenvalues mu_k < `floor` become
    `floor` (see the module docstring). Returns (gamma, number of floored quantities).
    """
    G = gram64(J)
    norms = G.diagonal().sqrt()
    zero = norms == 0
    norms = torch.where(zero, torch.full_like(norms, torch.finfo(J.dtype).tiny), norms)
    C = torch.where(zero[:, None] | zero[None, :], torch.zeros_like(G), G / (norms[:, None] * norms[None, :]))
    C.diagonal().fill_(1.0)
    mu = torch.linalg.eigvalsh(C)
    low = mu < floor
    gamma = norms.log().sum() + 0.5 * torch.where(low, torch.full_like(mu, floor), mu).log().sum()
    return float(gamma), int(zero.sum()) + int(low.sum())


def fisher(model, data: MetricData, options: FisherOptions, generator) -> dict[str, float]:
    """Mean over `n_batches` random training batches of gamma = 1/2 log det(J J^T) (see module docstring).

    Batch b is `data.train.batch(batch_size, generator)` for b = 0, 1, ...: examples without
    replacement within a batch, batches drawn independently.
    """
    gammas, floored = [], 0
    for _ in range(options.n_batches):
        batch = data.train.batch(options.batch_size, generator)
        J = per_example_grads(model, batch.x, batch.y, batchnorm=options.batchnorm, chunk_size=options.chunk_size,
                              logit_norm=options.logit_norm, vmap_chunk=options.vmap_chunk)
        gamma, n_floored = log_det_gamma(J, options.floor)
        gammas.append(gamma)
        floored += n_floored
    return {key("train", "fisher"): sum(gammas) / len(gammas),
            key("train", "fisher_floored"): floored / len(gammas)}


METRIC = Metric(
    "fisher", "single", fisher, FisherOptions,
    panels=(Panel("fisher", "train", "Fisher metric 1/2 log det JJ^T (InfoMCR)", cmap="magma"),),
    description="InfoMCR observed-Fisher metric: mean over batches of sum log singular values of per-example gradients",
    diagnostics=("fisher_floored",),
    check_model=per_example_logits,
    test_options={"n_batches": 2, "batch_size": 10},
)
