"""Train/eval flags of a model, set for a block of code and restored after it."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """Put `models` in eval mode and restore each one's train/eval flags (per submodule) afterwards."""
    saved = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for flags in saved:
            for m, training in flags:
                m.training = training
