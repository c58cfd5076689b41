"""Replicated-SGD (Pittorino et al., ICLR 2021; the robust ensemble of Baldassi et al., PNAS 2020).

y replicas w_1..w_y of the model are trained on the coupled objective

    H(w_1..w_y) = sum_a L_a(w_a) + gamma_t * (1/y) sum_a ||w_a - w_c||^2,   w_c = (1/y) sum_a w_a,

L_a the cross-entropy (plus the regularizer's penalty) of replica a's data. Since
sum_a (w_a - w_c) = 0, the coupling pulls each replica towards the centre with the force

    dH/dw_a = grad L_a(w_a) + (2 gamma_t / y) (w_a - w_c),

and each replica takes its own torch.optim.SGD step with it (own momentum buffer, weight decay
weight_decay * w_a as in SGD). w_c is the centre at the start of the step. After the step the
centre is recomputed as the replicas' mean; `.model` is the centre (evaluated and checkpointed).

Scoping. gamma_t = gamma_0 (1 + gamma_1)^t with t the epoch (0-based), constant within an epoch:
the coupling schedule is then the same in every cell of a batch-size grid and needs no step
counter to resume (as for Entropy-SGD).

Data. The contract hands one batch per step. With `batch="split"` (default) the batch is cut into
y contiguous shards (torch.tensor_split: sizes differ by at most one) and replica a sees shard a:
the replicas get independent gradient noise, every example is used once per epoch by one replica,
and an epoch costs as many gradient evaluations as an SGD epoch (each replica's minibatch is B/y;
a batch smaller than y is an error). With `batch="shared"` every replica sees the whole batch (each
at SGD's minibatch B; y times the cost), and the replicas then differ only through `init_noise`.

Initialisation. Every replica starts as a copy of the given model; with `init_noise = s > 0` each
parameter is perturbed multiplicatively, w_a = w (1 + s z), z ~ N(0, I) from a generator seeded by
the run's seed (the local-energy convention), and the centre starts at the replicas' mean.

BatchNorm. Each replica keeps its own running statistics. The centre's floating-point buffers
(running mean and variance) are the replicas' means; integer buffers (num_batches_tracked) are
replica 1's (all replicas count the same batches). The running variance of the centre is thus
the mean of the replicas' variances, not the variance the centre's own activations would have.

Reductions (tested): with y = 1 and gamma = 0 the single replica is trained by plain SGD and the
centre equals it, so the weights are SGD's bit for bit. The loss returned is the replicas'
cross-entropy on the batch (shards weighted by size), measured before the step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from phasediagram.methods.base import load_regularizer_state, regularizer_state
from phasediagram.numerics.sgd import set_lr, sgd
from phasediagram.options import choice, flag, integer, real, validate
from phasediagram.seeding import stable_seed

BATCH_MODES = ("split", "shared")


@dataclass(frozen=True)
class ReplicatedSGDOptions:
    y: int = integer(3, low=1, high=64)  # number of replicas
    gamma0: float = real(0.01, low=0)  # coupling at epoch 0
    gamma1: float = real(0.1, low=0)  # scoping rate: gamma_t = gamma0 (1 + gamma1)^epoch
    # "split": replica a sees shard a of the batch; "shared": all see the whole batch
    batch: str = choice("split", BATCH_MODES)
    init_noise: float = real(0.0, low=0)  # relative std s of the replicas' initial perturbation w (1 + s z)
    nesterov: bool = flag(False)

    def __post_init__(self):
        validate(self, "optimizer_options")


class ReplicatedSGD:
    """y coupled replicas, each stepped by SGD with momentum; `.model` is their centre (module docstring)."""

    def __init__(self, model, *, lr, momentum, weight_decay, epochs=None, seed=0,
                 options: ReplicatedSGDOptions = ReplicatedSGDOptions(), regularizer=None):
        self.model = model
        self.options = options
        self.regularizer = regularizer
        self.replicas = [copy.deepcopy(model) for _ in range(options.y)]
        if options.init_noise > 0:
            generator = torch.Generator().manual_seed(stable_seed("replicated_sgd", seed))
            with torch.no_grad():
                for replica in self.replicas:
                    for p in replica.parameters():
                        z = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
                        p.mul_(1.0 + options.init_noise * z)
        self.opts = [sgd([p for p in r.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                         weight_decay=weight_decay, nesterov=options.nesterov and momentum > 0)
                     for r in self.replicas]
        self.sync_centre()

    def set_lr(self, lr: float) -> None:
        for opt in self.opts:
            set_lr(opt, lr)

    def gamma(self, epoch: int) -> float:
        """gamma_t = gamma0 (1 + gamma1)^epoch."""
        return self.options.gamma0 * (1.0 + self.options.gamma1) ** epoch

    @torch.no_grad()
    def sync_centre(self) -> None:
        """Centre parameters and floating buffers <- the replicas' means; integer buffers <- replica 1's."""
        tensors = [dict(r.named_parameters()) | dict(r.named_buffers()) for r in self.replicas]
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.stack([d[name] for d in tensors]).mean(0))
            else:
                t.copy_(tensors[0][name])

    def _shards(self, x, y):
        n = self.options.y
        if self.options.batch == "shared":
            return [(x, y)] * n
        if len(y) < n:
            raise ValueError(f"replicated_sgd with batch='split' needs a batch of at least y={n} examples, "
                             f"got {len(y)}")
        return list(zip(x.tensor_split(n), y.tensor_split(n)))

    def step(self, x, y, epoch: int) -> float:
        k = 2.0 * self.gamma(epoch) / self.options.y
        centre = [p.detach().clone() for p in self.model.parameters()]
        total_loss, count = 0.0, 0
        for replica, opt, (xs, ys) in zip(self.replicas, self.opts, self._shards(x, y)):
            replica.train(self.model.training)
            opt.zero_grad(set_to_none=True)
            logits = replica(xs)
            loss = F.cross_entropy(logits, ys)
            total = loss if self.regularizer is None else loss + self.regularizer(replica, xs, ys, logits, epoch)
            total.backward()
            if k != 0:
                with torch.no_grad():
                    for p, c in zip(replica.parameters(), centre):
                        if p.requires_grad:
                            force = (p - c).mul_(k)
                            p.grad = force if p.grad is None else p.grad.add_(force)
            opt.step()
            total_loss += float(loss.detach()) * len(ys)
            count += len(ys)
        self.sync_centre()
        return total_loss / count

    def state_dict(self) -> dict:
        return {"replicas": [r.state_dict() for r in self.replicas], "opts": [o.state_dict() for o in self.opts],
                "regularizer": regularizer_state(self.regularizer)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["replicas"]) != len(self.replicas):
            raise ValueError(f"state holds {len(state['replicas'])} replicas, this method has {len(self.replicas)}")
        for replica, opt, r_state, o_state in zip(self.replicas, self.opts, state["replicas"], state["opts"]):
            replica.load_state_dict(r_state)
            opt.load_state_dict(o_state)
        load_regularizer_state(self.regularizer, state.get("regularizer"))
        self.sync_centre()
