"""The transformer's Hessian: a Hessian-vector product's time against a gradient's, and its top eigenvalue
against a dense float64 Hessian's.

Time, on the registered `transformer` family (d_model `--width`, depth 2, causal attention written
out) over modular addition with p = 23 (all 529 pairs, 4 tokens, vocabulary 25), a batch of
`--batch` pairs, one torch thread, float32 and float64; perf_counter median of `--repeats` calls
after one untimed call, of:

- gradient: dL/dtheta of the mean cross-entropy (forward, backward);
- HVP, cached: one product H v of `numerics.hvp.HessianOperator` (double backward through the
  gradient graph it keeps), what the Hessian metric's Lanczos and Hutchinson steps pay;
- HVP, uncached: the gradient graph built for the product and then differentiated (forward,
  backward with create_graph, double backward), what one product on a new batch costs.

Exactness, float64, on a tiny one (d_model 4, depth 2, P = 588, 6 sequences of 3 tokens): the top
eigenvalue by Lanczos on the HVP against numpy's eigvalsh of the dense Hessian, the Jacobian of the
gradient by reverse mode (torch.func.jacrev of torch.func.grad).

    python bench/bench_transformer.py
    python bench/bench_transformer.py --write-docs   # also writes its tables into docs/performance.md
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_peak import median_time  # bench/: the script's folder, so on sys.path
from torch.func import functional_call, grad, jacrev
from torch.nn import functional as F

from phasediagram.data.sequences import modular_arithmetic
from phasediagram.models import families
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator, flatten, unflatten


def timings(width: int, batch: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = modular_arithmetic(23, "+")
    x, y = x[:batch].to(dtype), y[:batch]
    model = families.create("transformer", width, (4,), 25).to(dtype)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    op = HessianOperator(model, x, y)
    vector = flatten(v)

    def gradient():
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def uncached():
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        torch.autograd.grad(g, params, grad_outputs=v)

    return {"gradient": median_time(gradient, repeats, warmup=1),
            "HVP, cached": median_time(lambda: op.matvec(vector), repeats, warmup=1),
            "HVP, uncached": median_time(uncached, repeats, warmup=1), "P": op.dim}


def eigenvalue_agreement() -> tuple[float, float, int]:
    """(Lanczos top eigenvalue, dense top eigenvalue, P) on the tiny float64 transformer."""
    torch.manual_seed(0)
    model = families.create("transformer", 4, (3,), 5).double()
    x = torch.randint(0, 5, (6, 3), generator=torch.Generator().manual_seed(4))
    y = x.sum(1) % 5
    named = list(model.named_parameters())

    def loss(flat):
        theta = dict(zip([n for n, _ in named], unflatten(flat, [p for _, p in named])))
        return F.cross_entropy(functional_call(model, theta, (x,)), y)

    dense = jacrev(grad(loss))(flatten([p.detach() for _, p in named]))
    op = HessianOperator(model, x, y)
    top = linalg.lanczos_eigs(op, op.dim, k=1, max_iter=200, tol=1e-12, generator=torch.Generator().manual_seed(0))
    return float(top.top[0]), float(np.linalg.eigvalsh(dense.numpy())[-1]), op.dim


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true", help="write the tables into docs/performance.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.float32, torch.float64):
        t = timings(args.width, args.batch, dtype, args.repeats)
        for arm in ("gradient", "HVP, cached", "HVP, uncached"):
            rows.append([str(dtype).removeprefix("torch."), arm, f"{1e3 * t[arm]:.2f}",
                         f"{t[arm] / t['gradient']:.2f}"])
        print(f"{dtype} P={t['P']}: " + ", ".join(f"{r[1]} {r[2]} ms ({r[3]}x)" for r in rows[-3:]), flush=True)
    lanczos, dense, p = eigenvalue_agreement()
    rel = abs(lanczos - dense) / abs(dense)
    print(f"top eigenvalue: Lanczos {lanczos:.15g}, dense {dense:.15g}, relative difference {rel:.2e} (P = {p})")
    if args.write_docs:
        import report  # bench/report.py: bench/ is the script's folder, so on sys.path

        report.write_section("transformer", report.command(__file__, argv), (
            f"`transformer` d_model {args.width}, depth 2, P = {t['P']}; batch {args.batch} of modular addition "
            "(p = 23); one thread; median of the repeats.\n\n"
            + report.table(["dtype", "arm", "time (ms)", "/ gradient"], rows)
            + f"\n\nTop eigenvalue, tiny transformer (P = {p}, float64): Lanczos {lanczos:.15g}, dense "
            f"{dense:.15g}, relative difference {rel:.1e}.\n"))


if __name__ == "__main__":
    main()
