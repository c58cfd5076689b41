"""Hessian-vector products of several models (a cell's seeds) computed together, in lockstep.

S models of one architecture, model s with parameters theta_s and its own fixed batch, are held
as one ensemble (`ensemble_models.from_models`, eval mode). The ensemble's loss
sum_s L_s(theta_s) has the block-diagonal Hessian diag(H_1, ..., H_S) (no operation mixes
members), so with the gradient graph g = d(sum_s L_s)/d(theta_1, ..., theta_S) built once, one
backward pass of g . (v_1, ..., v_S) gives (H_1 v_1, ..., H_S v_S): one product for S models.
Small models on a CPU are bound by per-operation overhead, so that costs far less than S separate
products (bench/bench_metrics_batched.py, section 3, measures it).

Each model's estimator (Lanczos, probes, with its own generator and stopping rule) runs unchanged
in its own thread (`LockstepHessians.run`) against `member(s)`, an operator with the interface of
`hvp.HessianOperator`. A product call waits until every model still running has asked for its
next product; then one ensemble backward answers all of them (a model that asked for none gets a
zero vector). A model whose estimator returns leaves the lockstep, so the others never wait for
it. Member s's product depends only on v_s, so each model gets the values its own sequential run
gets, up to rounding (float64: ~1e-15; float32: ~1e-6, the ensemble's batched matmuls summing in
another order than `nn.Conv1d`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.accel import ensemble_models
from phasediagram.numerics.hvp import flatten, trainable


class MemberOperator:
    """v -> H_s v for member s of a `LockstepHessians` (the interface of `hvp.HessianOperator`)."""

    def __init__(self, lockstep: LockstepHessians, index: int, params: list[torch.Tensor]):
        self.lockstep, self.index, self.params = lockstep, index, params
        self.dim = sum(p.numel() for p in params)
        self.device = params[0].device
        self.n_products = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H_s v for a flat vector v of length P (in the model's `parameters()` order), in v's dtype."""
        hv = self.lockstep.product(self.index, v)
        self.n_products += 1
        return hv.to(v.dtype)

    __call__ = matvec

    def gradient(self) -> torch.Tensor:
        """dL_s/dtheta_s as a flat vector, read off the cached graph (no product counted)."""
        return self.lockstep.gradients[self.index]


class LockstepHessians:
    """The training-loss Hessians of `models` (one architecture, ensemble form) on their own batches
    (x_s, y_s) of equal size, BatchNorm in eval mode; `member(s)` is model s's operator.

    Memory: one gradient graph of the S-member ensemble on S batches (S times one model's).
    """

    def __init__(self, models: Sequence[nn.Module], xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]):
        self.members = len(models)
        self.ensemble = ensemble_models.from_models(list(models)).eval()
        own = [dict(m.named_parameters()) for m in models]
        self.names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        ens_params = dict(self.ensemble.named_parameters())
        self.params = [ens_params[n] for n in self.names]
        self.layouts = [ensemble_models.layout_of(ens_params[n].shape, own[0][n].shape, self.members)
                        for n in self.names]
        self.shapes = [own[0][n].shape for n in self.names]
        self.sizes = [own[0][n].numel() for n in self.names]
        with torch.enable_grad():
            logits = self.ensemble(torch.stack(list(xs)))
            s, b, k = logits.shape
            losses = F.cross_entropy(logits.reshape(s * b, k), torch.stack(list(ys)).reshape(s * b),
                                     reduction="none").view(s, b).mean(1)
            self._grads = torch.autograd.grad(losses.sum(), self.params, create_graph=True)
        self.gradients = self._split([g.detach() for g in self._grads])
        self.operators = [MemberOperator(self, i, trainable(m)) for i, m in enumerate(models)]
        self._cond = threading.Condition()
        self._running: set[int] = set()
        self._asked: dict[int, torch.Tensor] = {}
        self._answers: dict[int, torch.Tensor] = {}
        self._error: BaseException | None = None

    def member(self, s: int) -> MemberOperator:
        return self.operators[s]

    def _split(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Ensemble-layout tensors (in `names` order) -> one flat vector per member."""
        parts = [ensemble_models.split_tensor(t, layout, self.members) for t, layout in zip(tensors, self.layouts)]
        return [flatten([p[s] for p in parts]) for s in range(self.members)]

    def _stack(self, vectors: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """One flat vector per asking member (zeros for the others) -> ensemble-layout tensors."""
        zero = torch.zeros(sum(self.sizes), dtype=self.params[0].dtype, device=self.params[0].device)
        pieces = [torch.split(vectors[s].to(zero.device, zero.dtype) if s in vectors else zero, self.sizes)
                  for s in range(self.members)]
        return [ensemble_models.stack_tensors([pieces[s][i].view(shape) for s in range(self.members)], layout)
                for i, (shape, layout) in enumerate(zip(self.shapes, self.layouts))]

    def _answer_all(self) -> None:
        """One ensemble backward for every asked product (called with the lock held, all running members asking)."""
        asked, self._asked = self._asked, {}
        try:
            hv = torch.autograd.grad(self._grads, self.params, grad_outputs=self._stack(asked), retain_graph=True)
            products = self._split(hv)
            self._answers.update({s: products[s] for s in asked})
        except BaseException as exc:
            self._error = exc
        self._cond.notify_all()

    def product(self, s: int, v: torch.Tensor) -> torch.Tensor:
        """H_s v, once every running member has asked for its next product."""
        with self._cond:
            if self._error is not None:
                raise RuntimeError("a lockstep Hessian product failed") from self._error
            self._asked[s] = v.detach()
            if set(self._asked) >= self._running:
                self._answer_all()
            self._cond.wait_for(lambda: s in self._answers or self._error is not None)
            if s not in self._answers:
                raise RuntimeError("a lockstep Hessian product failed") from self._error
            return self._answers.pop(s)

    def _leave(self, s: int) -> None:
        with self._cond:
            self._running.discard(s)
            if self._asked and set(self._asked) >= self._running:
                self._answer_all()

    def run(self, tasks: Sequence[Callable[[MemberOperator], Any]]) -> list[Any]:
        """[tasks[s](member(s))] with every task in its own thread, their products in lockstep;
        re-raises the first exception a task raised."""
        if len(tasks) != self.members:
            raise ValueError(f"{len(tasks)} tasks for {self.members} members")
        results: list[Any] = [None] * self.members
        errors: list[BaseException | None] = [None] * self.members
        self._running = set(range(self.members))

        def work(s: int) -> None:
            try:
                results[s] = tasks[s](self.operators[s])
            except BaseException as exc:
                errors[s] = exc
            finally:
                self._leave(s)

        threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in range(self.members)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results
