"""Hessian-vector products of the training cross-entropy of a model on a fixed batch.

The loss is the mean cross-entropy over a batch (x_i, y_i), i = 1..N, with no weight-decay term,

    L(theta) = (1/N) sum_i CE(f_theta(x_i), y_i),

evaluated with the model in eval mode, so BatchNorm uses its running statistics and L is a
deterministic function of the trainable parameters theta (flattened to a vector of length P, in
`model.parameters()` order). The operator is v -> H v with H = d^2 L / d theta^2, a symmetric
P x P matrix that is never formed.

Two ways to compute H v, both exact up to rounding:

- `"double_backward"` (reverse-over-reverse, Pearlmutter's trick on a cached graph): build
  g(theta) = dL/dtheta once with `create_graph=True`, then every product is one backward pass
  of the scalar g . v, since d(g . v)/dtheta = H v. The forward pass and the first backward pass
  are paid once per batch.
- `"func"` (forward-over-reverse with `torch.func`): H v = d/dt grad L(theta + t v) at t = 0,
  computed as `jvp(grad(L), (theta,), (v,))`. Nothing is cached, so every product repeats the
  forward and backward pass with dual numbers.

On CPU the cached double backward is the faster one (bench/bench_hessian.py, section 4, measures
both; docs/performance.md), so it is the default.
When the batch is split into chunks (to bound memory on large batches), H v is the
example-weighted sum sum_c (N_c / N) H_c v, and the graph is rebuilt per chunk and product.

A parameter the forward never uses (a plug-in model's spare layer) does not enter L: its gradient
and its rows and columns of H are exactly 0, which `gradients` returns for it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn import functional as F

from phasediagram.models.modes import eval_mode

METHODS = ("double_backward", "func")


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters that H differentiates with respect to (those with requires_grad)."""
    return [p for p in model.parameters() if p.requires_grad]


def gradients(outputs, inputs: Sequence[torch.Tensor], grad_outputs=None, **kwargs) -> tuple[torch.Tensor, ...]:
    """`torch.autograd.grad(outputs, inputs, grad_outputs, **kwargs)` with the derivative of what does not
    depend on an input written as the zero it is: 0 for an input the outputs never reach (a parameter
    the forward does not use), and outputs that are constants (such a zero gradient, differentiated
    again) left out with their grad_outputs. With `is_grads_batched` a zero has the batch's leading
    dimension."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    weights = ([None] * len(outputs) if grad_outputs is None
               else [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else list(grad_outputs))
    kept = [(o, w) for o, w in zip(outputs, weights) if o.requires_grad]
    found = torch.autograd.grad([o for o, _ in kept], inputs, [w for _, w in kept], allow_unused=True,
                                **kwargs) if kept else [None] * len(inputs)
    lead = tuple(weights[0].shape[:1]) if kwargs.get("is_grads_batched") else ()
    return tuple(torch.zeros(lead + p.shape, dtype=p.dtype, device=p.device) if g is None else g
                 for g, p in zip(found, inputs))


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one vector (in order)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split vector `v` into tensors shaped (and typed) like `like` (views of v where the dtype matches).

    One `torch.split` and, when all of `like` share a dtype, one conversion of the whole vector:
    about a third of the time of slicing and converting piece by piece (29 tensors of resnet1d).
    """
    dtypes = {p.dtype for p in like}
    if len(dtypes) == 1:
        v = v.to(dtypes.pop())
    pieces = torch.split(v, [p.numel() for p in like])
    return [t.view_as(p) if t.dtype == p.dtype else t.view_as(p).to(p.dtype) for t, p in zip(pieces, like)]


class HessianOperator:
    """v -> H v for the mean cross-entropy of `model` on (x, y), BatchNorm in eval mode.

    Args:
        model: the network; its parameters and train/eval flags are left unchanged.
        x, y: the batch (inputs and integer labels), on the model's device.
        chunk_size: examples per forward pass; the batch is one chunk when it fits (or when None).
        method: "double_backward" (cached graph, the default) or "func" (forward-over-reverse).
        loss: loss(outputs, targets), the mean loss of a chunk (default: the cross-entropy).

    `matvec(v)` takes a length-P vector of any floating dtype on the model's device, computes in
    the parameters' dtype and returns H v in the dtype of v. `n_products` counts the calls.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None,
                 method: str = "double_backward", loss: Callable = F.cross_entropy):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model, self.method, self.loss = model, method, loss
        self.params = trainable(model)
        self.dim = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        size = len(y) if chunk_size is None else max(1, int(chunk_size))
        self.chunks = [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]
        self.n_examples = len(y)
        self.n_products = 0
        self._grads = self._gradient_graph(*self.chunks[0]) if method == "double_backward" and len(self.chunks) == 1 \
            else None

    def _gradient_graph(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """dL_c/dtheta with its graph kept, for one chunk (eval mode)."""
        with eval_mode(self.model), torch.enable_grad():
            loss = self.loss(self.model(x), y)
            return gradients(loss, self.params, create_graph=True)

    def _double_backward(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._grads is not None:
            return list(gradients(self._grads, self.params, grad_outputs=vs, retain_graph=True))
        total = [torch.zeros_like(p) for p in self.params]
        for x, y in self.chunks:
            grads = self._gradient_graph(x, y)
            hv = gradients(grads, self.params, grad_outputs=vs)
            for t, h in zip(total, hv):
                t.add_(h, alpha=len(y) / self.n_examples)
        return total

    def _func(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        primals = {n: p.detach() for n, p in zip(names, self.params)}
        tangents = dict(zip(names, vs))
        buffers = dict(self.model.named_buffers())
        total = [torch.zeros_like(p) for p in self.params]
        with eval_mode(self.model):
            for x, y in self.chunks:
                def loss(theta, x=x, y=y):
                    return self.loss(functional_call(self.model, (theta, buffers), (x,)), y)

                hv = jvp(grad(loss), (primals,), (tangents,))[1]
                for t, n in zip(total, names):
                    t.add_(hv[n], alpha=len(y) / self.n_examples)
        return total

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of length P."""
        vs = unflatten(v.to(self.device), self.params)
        hv = self._double_backward(vs) if self.method == "double_backward" else self._func(vs)
        self.n_products += 1
        return flatten([h.detach() for h in hv]).to(v.dtype)

    __call__ = matvec

    def matmat(self, vs: torch.Tensor, block: int = 16) -> torch.Tensor:
        """H V for a P x k matrix V, column by column as `matvec` computes it (k products). On the cached
        graph, `block` columns share one batched backward pass (`torch.autograd.grad` with
        `is_grads_batched`, vmap over the vectors), equal to the separate products up to rounding."""
        if vs.shape[1] == 0:
            return vs.clone()
        if self._grads is None or self.method != "double_backward":
            return torch.stack([self.matvec(v) for v in vs.T], dim=1)
        out = []
        sizes = [p.numel() for p in self.params]
        for start in range(0, vs.shape[1], block):
            chunk = vs[:, start:start + block].T.to(self.device, self.params[0].dtype)
            pieces = [t.reshape(len(chunk), *p.shape) for t, p in zip(torch.split(chunk, sizes, dim=1), self.params)]
            hv = gradients(self._grads, self.params, grad_outputs=pieces, retain_graph=True, is_grads_batched=True)
            out.append(torch.cat([h.detach().reshape(len(chunk), -1) for h in hv], dim=1).T)
            self.n_products += len(chunk)
        return torch.cat(out, dim=1).to(vs.dtype)

    def gradient(self) -> torch.Tensor:
        """dL/dtheta as a flat vector (no product counted): read off the cached graph when there is one,
        else one forward and backward pass per chunk, example-weighted like the products."""
        if self._grads is not None:
            return flatten([g.detach() for g in self._grads])
        total = [torch.zeros_like(p) for p in self.params]
        with eval_mode(self.model), torch.enable_grad():
            for x, y in self.chunks:
                grads = gradients(self.loss(self.model(x), y), self.params)
                for t, g in zip(total, grads):
                    t.add_(g, alpha=len(y) / self.n_examples)
        return flatten(total)

    def dense(self) -> torch.Tensor:
        """The full P x P Hessian, one product per column (tests and small models only)."""
        eye = torch.eye(self.dim, dtype=self.params[0].dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)
