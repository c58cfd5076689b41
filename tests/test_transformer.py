"""The transformer families and the token datasets: shapes, causality, the token cross-entropy, the
held-out split of modular arithmetic, and the Hessian against a dense float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, jacrev
from torch.nn import functional as F

from phasediagram.data import datasets, sequences
from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics.base import evaluate
from phasediagram.models import families
from phasediagram.models.transformer import heads_of
from phasediagram.numerics import linalg
from phasediagram.numerics.hvp import HessianOperator, flatten, unflatten

DT = torch.float64


def tiny(arch: str, width: int = 8, vocab: int = 7, length: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return families.create(arch, width, (length,), vocab).to(DT)


def tokens(n: int, vocab: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_heads_scale_with_width():
    assert [heads_of(k) for k in (8, 16, 24, 48, 64)] == [1, 1, 1, 3, 4]
    model = tiny("transformer", width=48)
    assert model.blocks[0].attn.heads == 3 and model.blocks[0].mlp[0].out_features == 192 and len(model.blocks) == 2


def test_output_shapes_and_float_tokens():
    x = tokens(5, 7, 4)
    last, every = tiny("transformer"), tiny("transformer_seq")
    assert last(x).shape == (5, 7) and every(x).shape == (5, 7, 4)
    assert torch.equal(last(x), last(x.to(DT)))  # token ids given as floats, as the training loop casts them
    assert torch.equal(every(x)[:, :, -1], last(x))  # same weights (same seed): the last position's logits


def test_attention_is_causal():
    model, x = tiny("transformer_seq"), tokens(3, 7, 4)
    changed = x.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 7
    a, b = model(x), model(changed)
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_modular_arithmetic_and_its_held_out_test_set():
    x, y = sequences.modular_arithmetic(5, "-")
    assert x.shape == (25, 4) and torch.equal(x[7], torch.tensor([1, 5, 2, 6])) and int(y[7]) == (1 - 2) % 5
    full = Split(x, y)
    train, test = datasets.subset(full, 0.4, 3), datasets.held_out(full, 0.4, 3)
    assert len(train) == 10 and len(test) == 15
    pairs = {tuple(r.tolist()) for r in torch.cat([train.x, test.x])}
    assert len(pairs) == 25
    ds = datasets.load("modular_addition", train_fraction=0.5)
    assert len(ds.train) + len(ds.test) == 97 * 97 and ds.n_classes == 99 and ds.input_shape == (4,)
    with pytest.raises(SpecError, match="below 1"):
        datasets.load("modular_addition", train_fraction=1.0)


def test_reversal_labels_the_reversed_string_and_ignores_the_prompt():
    x, y = sequences.reversal(symbols=4, length=3, n=6, seed=0)
    assert x.shape == (6, 6) and y.shape == (6, 6)
    assert (y[:, :3] == sequences.IGNORE).all()
    assert torch.equal(y[:, 3:], x[:, :3].flip(1)) and (x[:, 3] == 4).all()


def test_token_cross_entropy_and_accuracy_per_labelled_token():
    model = tiny("transformer_seq", vocab=5, length=6)
    x, y = sequences.reversal(symbols=4, length=3, n=10, seed=2)
    loss, acc = evaluate(model, Split(x.to(DT), y), batch_size=4)
    logits = model(x)[:, :, 3:]  # (N, C, 3): the labelled positions
    expected = F.cross_entropy(logits.transpose(1, 2).reshape(-1, 5), y[:, 3:].reshape(-1))
    assert loss == pytest.approx(float(expected.detach()), rel=1e-12)
    assert acc == pytest.approx(100.0 * float((logits.argmax(1) == y[:, 3:]).double().mean()), rel=1e-12)


def reference_hessian(model, x, y) -> torch.Tensor:
    """d^2/dtheta^2 of the mean cross-entropy, as a dense P x P float64 matrix: the Jacobian of the gradient,
    both by reverse mode (torch.func.hessian, forward over reverse, is wrong on LayerNorm's weight in torch
    2.13 under vmap; reverse over reverse agrees with central differences of the gradient to 1e-6)."""
    named = [(n, p) for n, p in model.named_parameters()]

    def loss(flat):
        theta = dict(zip([n for n, _ in named], unflatten(flat, [p for _, p in named])))
        return F.cross_entropy(functional_call(model, theta, (x,)), y)

    return jacrev(grad(loss))(flatten([p.detach() for _, p in named]))


@pytest.mark.parametrize("arch", ["transformer", "transformer_seq"])
def test_hessian_top_eigenvalue_equals_the_dense_one(arch):
    """A tiny transformer (d_model 4, P = 548): H v against the dense H to 1e-10, and the Lanczos top
    eigenvalue equal to numpy's of the dense H to 1e-8 relative."""
    model = tiny(arch, width=4, vocab=5, length=3)
    x = tokens(6, 5, 3, seed=4)
    y = (x.sum(1) % 5) if arch == "transformer" else torch.where(torch.arange(3) > 0, x.roll(-1, 1), -100)
    h = reference_hessian(model, x, y)
    op = HessianOperator(model, x, y)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(5), dtype=DT)
    assert float(torch.linalg.vector_norm(op.matvec(v) - h @ v) / torch.linalg.vector_norm(h @ v)) < 1e-10
    exact = np.linalg.eigvalsh(h.numpy())[-1]
    top = linalg.lanczos_eigs(op, op.dim, k=1, max_iter=200, tol=1e-12, generator=torch.Generator().manual_seed(0))
    assert abs(top.top[0] - exact) / abs(exact) < 1e-8


def test_transformer_seq_learns_reversal_under_the_token_cross_entropy():
    """AdamW on the token cross-entropy (the training loop's F.cross_entropy on logits (N, V, T)): 60 steps
    of batch 64 on strings of 3 of 4 symbols take the token accuracy on new strings from chance (25 %) past 99 %."""
    from phasediagram.methods import OPTIMIZERS
    from phasediagram.methods.adamw import AdamWOptions

    torch.manual_seed(0)
    model = families.create("transformer_seq", 16, (6,), 5)
    method = OPTIMIZERS["adamw"].build(model, lr=1e-2, momentum=0.9, weight_decay=0.0, epochs=1, seed=0,
                                       options=AdamWOptions(warmup_steps=10))
    x, y = sequences.reversal(4, 3, 64 * 60, seed=3)
    for step in range(60):
        method.step(x[64 * step:64 * (step + 1)].float(), y[64 * step:64 * (step + 1)], epoch=0)
    xt, yt = sequences.reversal(4, 3, 512, seed=4)
    assert evaluate(model, Split(xt.float(), yt))[1] > 99.0
