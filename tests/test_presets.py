"""The presets: `reference` is the reference study's recipe, value by value; `demo` is a real phase-diagram study.

Each reference value cites the file of nsfzyzz/loss_landscape_taxonomy (workspace/src/) it comes from.
"""

from __future__ import annotations

import pytest

from phasediagram import cli
from phasediagram.resolve import metric_options
from phasediagram.spec.experiment import ExperimentSpec


def spec_of(preset: str, *extra: str) -> ExperimentSpec:
    return cli.spec_from_args(cli.build_parser().parse_args(["--preset", preset, *extra]))


@pytest.fixture(scope="module")
def reference() -> ExperimentSpec:
    return spec_of("reference")


def test_reference_grid_and_training(reference):
    assert (reference.arch, reference.dataset) == ("resnet18", "cifar10")  # ResNet18_w{W} on CIFAR-10
    # example_experiment.py: widths = ["1", "2", ..., "128"]
    assert reference.widths == (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128)
    # write_script.py, get_load_temperature, "Efficient_fine"
    assert reference.batch_sizes == (16, 24, 32, 44, 64, 92, 128, 180, 256, 364, 512, 724, 1024)
    assert len(reference.seeds) == 5  # example_experiment.py: --exp-start 0 --exp-num 5
    assert reference.epochs == 100  # write_script.py, lr_decay branch: --one-lr-decay --epochs 100
    # example_experiment.py --lr-standard 0.1 at every batch size (lr scaling only for training_type lr_scaling)
    assert reference.lrs == (0.1,)
    assert reference.weight_decays == (5e-4,)  # --wd-standard 5e-4; code/train.py SGD(weight_decay=...)
    assert (reference.optimizer, reference.momentum) == ("sgd", 0.9)  # code/train.py: SGD(momentum=0.9)
    # code/train.py, one_lr_decay: lr = base_lr * 0.1 once epoch >= 0.75 * epochs
    assert (reference.schedule, reference.lr_decay_at, reference.lr_decay_factor) == ("step", 0.75, 0.1)
    assert reference.train_fractions == (1.0,)  # write_script.py load_map: '10' -> --subset 1.0
    assert reference.label_noises == (0.0,)
    # code/train.py --save-best writes net_exp_{i}_best.pkl (lowest training loss), which the metrics read
    assert reference.metric_checkpoint == "best"


def test_reference_metrics_and_their_settings(reference):
    assert reference.metrics == ("loss_acc", "dist", "hessian", "CKA", "curve")
    hessian = metric_options(reference, "hessian")
    # code/measure_hessian.py: --hessian-batch-size 200 (one batch), eigenvalues(maxIter=100, tol=1e-3),
    # trace(maxIter=100, tol=1e-3) with the relative-change rule
    assert (hessian.batch_size, hessian.lanczos_iters, hessian.tol) == (200, 100, 1e-3)
    assert (hessian.trace_probes, hessian.trace_rule, hessian.trace_tol) == (100, "change", 1e-3)
    cka = metric_options(reference, "CKA")
    # code/CKA.py: --mixup-CKA --mixup-alpha 16, batches 0..5 (`batch_idx > 5` breaks) of 128, all pairs
    assert (cka.mixup_alpha, cka.batches, cka.batch_size, cka.pairs) == (16.0, 6, 128, "all")
    curve = metric_options(reference, "curve")
    # example_experiment.py CURVE_PARAMETERS: --epochs 50 --num-points 5; code/arguments.py: lr 0.01,
    # momentum 0.9, weight decay 5e-4, batch 128; --init_start net_exp_0 --init_end net_exp_1;
    # code/Mode_connectivity.py never calls init_linear
    assert (curve.epochs, curve.lr, curve.momentum, curve.weight_decay, curve.batch_size) == (50, 0.01, 0.9, 5e-4, 128)
    assert (curve.points, curve.max_batches_per_epoch, curve.eval_examples) == (5, 0, 0)
    assert (curve.pairs, curve.bend_init) == ("first", "random")


def test_metric_checkpoint_is_not_part_of_the_training(reference):
    """Switching which checkpoint the metrics read keeps the trained runs (same training hash)."""
    final = spec_of("reference", "--metric-checkpoint", "final")
    assert final.metric_checkpoint == "final"
    assert final.training_hash() == reference.training_hash()
    with pytest.raises(Exception, match="metric_checkpoint"):
        spec_of("reference", "--metric-checkpoint", "early")


def test_demo_is_a_phase_diagram_study_with_every_landscape_metric():
    """The embedded demo: three widths (the load) against five learning rates (the temperature), the Fisher
    metric among its metrics, the Hessian at its default settings, full-pass curves."""
    demo = spec_of("demo")
    assert (demo.load_axis, demo.temperature_axis) == ("width", "lr")
    assert len(demo.widths) == 3 and len(demo.lrs) == 5 and len(demo.seeds) == 2
    assert set(demo.metrics) == {"loss_acc", "dist", "hessian", "CKA", "curve", "fisher"}
    assert "hessian" not in demo.metric_options  # the shipped defaults
    curve = metric_options(demo, "curve")
    assert curve.max_batches_per_epoch == 0 and curve.eval_examples == 0
