"""`grad_norm` against exact references: the analytic gradient of softmax regression, and a
full-batch autograd gradient of BatchNorm and residual nets, at the shipped defaults too."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics import METRICS, MetricData
from phasediagram.metrics.grad_norm import GradNormOptions
from phasediagram.models import families as models


def data(n: int, shape: tuple, classes: int = 10, seed: int = 0) -> MetricData:
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randn(n // 2, *shape, generator=g,
                                                                                 dtype=torch.float64)
    y, yt = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n // 2,), generator=g)
    return MetricData(Split(x, y), Split(xt, yt), classes)


def compute(model, d, **options):
    return METRICS["grad_norm"].compute(model, d, GradNormOptions(**options), torch.Generator().manual_seed(0))


def test_softmax_regression_matches_the_analytic_gradient():
    """L = mean CE(W x + b): dL/dW = (P - Y)^T X / N, dL/db = mean(P - Y), P = softmax(W x + b)."""
    torch.manual_seed(3)
    model = nn.Linear(7, 4).double()
    d = data(2500, (7,), classes=4)
    x, y = d.train.x, d.train.y
    residual = torch.softmax(model(x), -1).detach() - F.one_hot(y, 4).double()
    g_w, g_b = residual.T @ x / len(x), residual.mean(0)
    expected = torch.sqrt((g_w ** 2).sum() + (g_b ** 2).sum()).item()
    weights = torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters())).item()
    out = compute(model, d)  # the shipped defaults: the whole training split, batches of 1000
    assert out["train/grad_norm"] == pytest.approx(expected, rel=1e-12)
    assert out["train/grad_norm_rel"] == pytest.approx(expected / weights, rel=1e-12)
    assert set(out) == {"train/grad_norm", "train/grad_norm_rel"}


@pytest.mark.parametrize("arch, shape", [("mlp", (40,)), ("resnet1d", (40,)), ("resnet18", (3, 8, 8))])
def test_batched_gradient_equals_the_full_batch_one_in_eval_mode(arch, shape):
    """BatchNorm nets in eval mode (running statistics, here moved off their initial values): the
    accumulated gradient equals one autograd call on the whole split, whatever the batch size."""
    torch.manual_seed(1)
    model = models.create(arch, 2, shape, 10).double()
    with torch.no_grad():
        model.train()
        model(data(64, shape, seed=5).train.x)  # running statistics away from (0, 1)
    model.train()
    d = data(96, shape)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(model(d.train.x), d.train.y), params)
    expected = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    model.train()
    for batch_size in (1000, 7):
        out = compute(model, d, batch_size=batch_size, splits=["train", "test"])
        assert out["train/grad_norm"] == pytest.approx(expected, rel=1e-10), batch_size
        assert out["test/grad_norm"] > 0
    assert model.training  # its mode restored


def test_a_subset_and_bad_options():
    torch.manual_seed(0)
    model = nn.Linear(7, 4).double()
    d = data(300, (7,), classes=4)
    sub = compute(model, d, n_examples=50)
    assert sub["train/grad_norm"] != compute(model, d)["train/grad_norm"]
    assert compute(model, d, n_examples=50, batch_size=3) == pytest.approx(sub, rel=1e-12)  # only rounding
    for bad in ({"splits": ["val"]}, {"splits": []}, {"n_examples": 0}, {"batch_size": 0}, {"batch_size": True}):
        with pytest.raises(SpecError, match="metric_options.grad_norm"):
            GradNormOptions(**bad)
