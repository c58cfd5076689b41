"""Token-sequence datasets generated locally: modular arithmetic and string reversal.

Inputs are token ids (N, T) and `n_classes` is the vocabulary V (inputs and outputs share it, as
the `transformer` families take it).

- `modular_arithmetic(p, op)`: every pair (a, b) of 0..p-1 once, as the tokens (a, OP, b, EQ) with
  OP = p and EQ = p + 1 (V = p + 2), labelled c = a op b mod p (op one of "+", "-", "*"). The test
  set is the pairs the training fraction leaves out (`HELD_OUT`, as in the grokking studies).
- `reversal(symbols, length, n_train, n_test, seed)`: uniform random strings s of `length` symbols
  in 0..symbols-1 and the sequence z = (s, SEP, reversed s), SEP = symbols (V = symbols + 1); the
  input is z's first 2 length tokens and the label of position t is z_{t+1} (next-token labels)
  for t >= length, -100 (`IGNORE`, cross-entropy's ignore index) on the prompt t < length. The
  training and test strings are drawn independently.
"""

from __future__ import annotations

from typing import Callable

import torch

IGNORE = -100
OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "+": torch.add, "-": torch.sub, "*": torch.mul}


def modular_arithmetic(p: int = 97, op: str = "+") -> tuple[torch.Tensor, torch.Tensor]:
    """(x (p^2, 4) tokens (a, p, b, p + 1), y (p^2,) = a op b mod p), pairs in the order a * p + b."""
    a, b = (t.reshape(-1) for t in torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"))
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    return x, OPS[op](a, b).remainder(p)


def modular_addition() -> tuple[tuple[torch.Tensor, torch.Tensor], None, int]:
    """The registered `modular_addition`: p = 97, every pair (its test set: the pairs not trained on)."""
    return modular_arithmetic(97, "+"), None, 99


def reversal(symbols: int = 10, length: int = 6, n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 2 length), y (n, 2 length)) of `n` random strings to reverse (module docstring)."""
    s = torch.randint(0, symbols, (n, length), generator=torch.Generator().manual_seed(seed))
    z = torch.cat([s, torch.full((n, 1), symbols), s.flip(1)], dim=1)
    y = z[:, 1:].clone()
    y[:, :length] = IGNORE
    return z[:, :-1], y


def reversal_task() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], int]:
    """The registered `reversal`: 10 symbols, strings of 6, 4000 training and 1000 test strings."""
    return reversal(10, 6, 4000, seed=0), reversal(10, 6, 1000, seed=1), 11


GENERATED = {"modular_addition": modular_addition, "reversal": reversal_task}  # name -> (train, test or None, V)
LABELS = {"modular_addition": "one label per sequence", "reversal": "a label per position"}
