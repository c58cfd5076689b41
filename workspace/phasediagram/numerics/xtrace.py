"""XTrace (Epperly, Tropp and Webber 2024): a Hutch++ that uses every probe both for the low-rank part and for the residual.

Hutch++ splits its products between a sketch Q = orth(A S) and independent Hutchinson probes of
the residual. XTrace uses one set of k test vectors omega_1..omega_k (2 k products) for both:
for each i it builds the basis Q_(i) = orth(A Omega_(-i)) from the other k - 1 vectors and
estimates the trace of the residual with the left-out vector,

    t_i = tr(Q_(i)^T A Q_(i)) + omega_i^T P_i A P_i omega_i,   P_i = I - Q_(i) Q_(i)^T,

which is unbiased because omega_i is independent of Q_(i); the estimate is the mean of the t_i
(the exchangeability principle: the average of the k symmetric leave-one-out estimates). All k
leave-one-out bases come from one QR decomposition A Omega = Q R: Q_(i) Q_(i)^T = Q (I - s_i s_i^T)
Q^T, where s_i is the unit vector along R^-T e_i (orthogonal to every column of R but the i-th).
With Z = A Q, H = Q^T Z, W = Q^T Omega and, A being symmetric, Q^T A omega_i = r_i (the i-th
column of R, as A omega_i = Q r_i), write w = W e_i, alpha = s_i^T w and c = w - alpha s_i (the
coefficients of Q_(i) Q_(i)^T omega_i). Then

    tr(Q_(i)^T A Q_(i)) = tr(H) - s_i^T H s_i,
    omega_i^T P_i A P_i omega_i = (omega_i - Q c)^T (A omega_i - Z c) = 2 alpha s_i^T r_i - w^T r_i + c^T H c,

the last step by omega_i^T A omega_i = w^T r_i (A omega_i lies in range(Q)). Only k x k matrices
are left after the products, Q^T Z and Q^T Omega.

The normalized variant (`normalize=True`, the paper's recommended "improved" XTrace) draws each
omega_i uniformly from the sphere of radius sqrt(n) and rescales its residual term to the
dimension of the complement: times (n - k + 1) / ||P_i omega_i||^2, where
||P_i omega_i||^2 = ||omega_i||^2 - ||w||^2 + alpha^2. P_i omega_i / ||P_i omega_i|| is uniform on
the unit sphere of range(P_i), a space of dimension n - k + 1, so the rescaled term is still
unbiased and no longer varies with the length of the projected probe. `normalize=False` uses
Rademacher vectors and no rescaling (curvlinops' `xtrace`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from phasediagram.numerics.linalg import DTYPE, Matvec, Trace, rademacher


def probe_matrix(n: int, k: int, generator: torch.Generator, normalize: bool, device="cpu",
                 dtype: torch.dtype = DTYPE) -> torch.Tensor:
    """Omega (n x k): columns uniform on the sphere of radius sqrt(n) (`normalize`), else Rademacher;
    drawn in float64 on the CPU, so the same numbers for every device and dtype."""
    if not normalize:
        return rademacher(n, generator, device, columns=k, dtype=dtype)
    g = torch.randn(n, k, generator=generator, dtype=DTYPE)
    return (g * (math.sqrt(n) / torch.linalg.vector_norm(g, dim=0))).to(device, dtype)


def xtrace(matvec: Matvec, n: int, products: int = 100, generator: torch.Generator | None = None, device="cpu",
           dtype: torch.dtype = DTYPE, normalize: bool = True) -> Trace:
    """tr(A) for symmetric A by XTrace with `products` products (k = products // 2 test vectors).

    Products: A omega_1..A omega_k, then A q_1..A q_k for Q = orth(A Omega). The value is
    (1/k) sum_i t_i with the leave-one-out estimates t_i of the module docstring (`samples`),
    `stderr` their standard deviation over sqrt(k) (a heuristic: the t_i share their test
    vectors, so they are not independent). Vectors are in `dtype` (float64 by default), the k x k
    algebra in float64; memory: three n x k matrices.

    When products >= n the exact trace sum_j e_j^T A e_j is returned (n products, stderr 0).
    When A Omega is rank deficient to working precision (min_j |R_jj| <= k eps max_j |R_jj|), A's
    range lies in range(Q) to that precision (rank(A Omega) = min(rank A, k) almost surely), so
    tr(Q^T A Q) is returned, with stderr 0.
    """
    if products < 2:
        raise ValueError(f"XTrace needs at least 2 products, got {products}")
    if products >= n:
        eye = torch.eye(n, dtype=dtype, device=device)
        diag = np.array([float(matvec(e).to(dtype)[j]) for j, e in enumerate(eye)])
        return Trace(float(diag.sum()), 0.0, n, diag)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    k = products // 2
    omega = probe_matrix(n, k, generator, normalize, device, dtype)
    y = _products(matvec, omega, dtype)
    q, r = torch.linalg.qr(y)
    del y
    w = (omega.T @ q).T.to("cpu", DTYPE)  # Q^T Omega
    norms2 = (torch.linalg.vector_norm(omega, dim=0) ** 2).to("cpu", DTYPE)
    del omega
    h = (q.T @ _products(matvec, q, dtype)).to("cpu", DTYPE)
    h = (h + h.T) / 2
    r = r.to("cpu", DTYPE)
    low = float(torch.trace(h))
    diag = torch.diagonal(r).abs()
    if float(diag.min()) <= k * torch.finfo(dtype).eps * float(diag.max()):
        return Trace(low, 0.0, 2 * k, np.full(k, low))
    s = torch.linalg.solve_triangular(r.T, torch.eye(k, dtype=DTYPE), upper=False)  # R^-T, column i along R^-T e_i
    s = s / torch.linalg.vector_norm(s, dim=0)
    alpha = (s * w).sum(0)  # s_i^T w_i
    c = w - s * alpha
    hs, hc = h @ s, h @ c
    ests = (low - (s * hs).sum(0)) + _scale(n, k, norms2, w, alpha, normalize) * (
        2 * alpha * (s * r).sum(0) - (w * r).sum(0) + (c * hc).sum(0))
    samples = ests.numpy()
    return Trace(float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan, 2 * k,
                 samples)


def _products(matvec: Matvec, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A M, by the operator's `matmat` where it has one (e.g. `hvp.HessianOperator`), else column by column."""
    if hasattr(matvec, "matmat"):
        return matvec.matmat(m).to(dtype)
    return torch.stack([matvec(col.contiguous()).to(dtype) for col in m.T], dim=1)


def _scale(n: int, k: int, norms2: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, normalize: bool
           ) -> torch.Tensor | float:
    """(n - k + 1) / ||P_i omega_i||^2 per test vector (`normalize`), else 1."""
    if not normalize:
        return 1.0
    return (n - k + 1) / (norms2 - (w * w).sum(0) + alpha ** 2)
