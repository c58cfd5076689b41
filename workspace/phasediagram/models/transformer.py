"""A pre-LayerNorm transformer over token sequences: the `transformer` and `transformer_seq` families.

Width k is d_model. The rest scales from it: heads of 16 dimensions when 16 divides k, else one
head of k; MLP hidden size 4k; `depth` blocks (2 in the registered families). Inputs are token ids
(N, T) in 0..V-1, given as integers or as floats holding integers (the training loop and the
metrics move inputs to the model's dtype); the vocabulary V is the dataset's `n_classes`, shared by
inputs and outputs as in a language model, and T is at most the `input_shape` the model was built
for (its learned positional embeddings). With h_0 = E[x_t] + P_t,

    h_{l+1} = h'_l + MLP(LN(h'_l)),   h'_l = h_l + Attn(LN(h_l)),
    Attn(u) = concat_heads softmax(Q K^T / sqrt(d_head) + M) V  W_o,   M_{ts} = -inf for s > t (causal),
    MLP(u) = GELU(u W_1 + b_1) W_2 + b_2,   logits = LN(h_L) W_head.

Attention is written out (no fused kernel), so its second derivatives, which Hessian-vector
products take, are plain autograd. The output is the logits of the last position, (N, V): the
answer to "a op b =" under the (N, C) cross-entropy every trainer and metric takes; with
`every_position` it is the logits of every position as (N, V, T), the class dimension second as
`torch.nn.functional.cross_entropy` takes sequences, so the same cross-entropy against labels
(N, T) is the token cross-entropy averaged over the positions whose label is not -100 (its
`ignore_index`). Initialisation as GPT-2 (nanoGPT): weights N(0, 0.02^2), the residual
projections N(0, 0.02^2 / (2 depth)), biases 0, LayerNorm (1, 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_DIM = 16
LABELS = {"transformer": "one label per sequence", "transformer_seq": "a label per position"}  # what each family fits


def heads_of(width: int) -> int:
    """The number of attention heads at d_model = `width`: width / 16 when 16 divides it, else 1."""
    return width // HEAD_DIM if width % HEAD_DIM == 0 else 1


class Attention(nn.Module):
    """Causal multi-head self-attention, softmax(Q K^T / sqrt(d) + M) V, written out."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, k = h.shape
        q, key, v = (z.view(n, t, self.heads, k // self.heads).transpose(1, 2) for z in self.qkv(h).split(k, dim=2))
        scores = q @ key.transpose(-2, -1) / math.sqrt(k // self.heads)
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, k))


class Block(nn.Module):
    """h + Attn(LN(h)), then + MLP(LN(.))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """Token and position embeddings -> `depth` pre-LN blocks -> LayerNorm -> linear head (module docstring)."""

    def __init__(self, width: int, vocab: int, max_len: int, depth: int = 2, every_position: bool = False):
        super().__init__()
        self.every_position = every_position
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(max_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads_of(width)) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:
                std = 0.02 / math.sqrt(2 * depth) if name.endswith("proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long()
        h = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1], device=x.device))
        logits = self.head(self.ln(self.blocks(h)))
        return logits.transpose(1, 2) if self.every_position else logits[:, -1]


def _check_shape(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise ValueError(f"the transformer needs token sequences (N, T), got input shape {tuple(input_shape)}")
    return input_shape[0]


def transformer(width: int, input_shape: tuple[int, ...], n_classes: int) -> Transformer:
    """The `transformer` family: logits of the last position, (N, n_classes)."""
    return Transformer(width, n_classes, _check_shape(input_shape))


def transformer_seq(width: int, input_shape: tuple[int, ...], n_classes: int) -> Transformer:
    """The `transformer_seq` family: logits of every position, (N, n_classes, T)."""
    return Transformer(width, n_classes, _check_shape(input_shape), every_position=True)
