"""AdamW against its update written out, its warmup and the cosine schedule; a transformer trained
with it on modular addition through the study's jobs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from phasediagram.errors import SpecError
from phasediagram.methods import OPTIMIZERS
from phasediagram.methods.adamw import AdamWOptions
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.study import Study
from phasediagram.training.train import lr_at

DT = torch.float64
HESSIAN = {"batch_size": 64, "lanczos_iters": 5, "trace_probes": 2, "density_probes": 0, "hutchpp_sketch": 1}


def test_adamw_is_the_update_written_out_with_its_warmup():
    """Three steps with warmup_steps 2 (lr/2, lr, lr): each parameter as the formula of methods/adamw.py, to 1e-12."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).to(DT)
    w0 = [p.detach().clone() for p in model.parameters()]
    lr, wd, b1, b2, eps = 0.1, 0.05, 0.8, 0.95, 1e-8
    method = OPTIMIZERS["adamw"].build(model, lr=lr, momentum=b1, weight_decay=wd, epochs=1, seed=0,
                                       options=AdamWOptions(beta2=b2, eps=eps, warmup_steps=2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 3, generator=g, dtype=DT), torch.randint(0, 4, (5,), generator=g)) for _ in range(3)]
    w, m, v = w0, [torch.zeros_like(p) for p in w0], [torch.zeros_like(p) for p in w0]
    for t, (x, y) in enumerate(batches, start=1):
        ws = [p.clone().requires_grad_() for p in w]
        grads = torch.autograd.grad(F.cross_entropy(F.linear(x, ws[0], ws[1]), y), ws)
        eta = lr * min(1.0, t / 2)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, grads)]
        v = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(v, grads)]
        w = [wi * (1 - eta * wd) - eta * (mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps)
             for wi, mi, vi in zip(w, m, v)]
        method.step(x, y, epoch=0)
        for p, expected in zip(model.parameters(), w):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


def test_adamw_options_out_of_range_are_refused_in_one_line():
    for bad in ({"beta2": 1.0}, {"eps": 0.0}, {"warmup_steps": -1}):
        with pytest.raises(SpecError, match=f"optimizer_options.{next(iter(bad))}") as info:
            AdamWOptions(**bad)
        assert "\n" not in str(info.value)


def test_cosine_schedule():
    spec = ExperimentSpec(schedule="cosine", epochs=4)
    assert [lr_at(spec, 2.0, e) for e in range(4)] == pytest.approx([2.0, 1 + math.cos(math.pi / 4), 1.0,
                                                                      1 + math.cos(3 * math.pi / 4)], rel=1e-15)


def test_a_transformer_trains_on_modular_addition_with_adamw(tmp_path):
    """Two cells of train_fraction (the load axis) x weight decay (the temperature axis), one seed, through
    the study's jobs: rows of train and test (held-out pairs) loss and accuracy for every run and Hessian rows."""
    spec = ExperimentSpec(name="grok_tiny", arch="transformer", dataset="modular_addition", widths=(16,),
                          train_fractions=(0.3, 0.5), load_axis="train_fraction", weight_decays=(0.0, 1.0),
                          temperature_axis="weight_decay", batch_sizes=(1024,), lrs=(1e-3,), seeds=(0,), epochs=2,
                          schedule="cosine", optimizer="adamw", optimizer_options={"warmup_steps": 2},
                          metrics=("loss_acc", "hessian"), metric_options={"hessian": HESSIAN})
    study = Study(spec, root=tmp_path)
    study.run()
    df = study.table()
    acc = df[(df.metric == "acc") & (df.split == "test")]
    assert len(acc) == 4 and acc.value.between(0, 100).all()
    top = df[(df.metric == "eigenvalue") & (df.coord == 1)]
    assert len(top) == 4 and top.value.map(math.isfinite).all()
