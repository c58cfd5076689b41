"""Named lists for the grid's axes and named whole specs (the demo, a tiny study, the reference recipe).

A spec field `widths`, `batch_sizes`, `lrs` or `weight_decays` may name one of `PRESETS[field]`
instead of listing numbers; `PRESET_SPECS[name]` is a spec mapping `ExperimentSpec.from_dict` takes.
"""

from __future__ import annotations

from phasediagram.errors import SpecError

PRESET_WIDTHS = {
    "reference": (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128),
    "demo": (2, 4, 8, 16, 32),
}
PRESET_BATCH_SIZES = {
    "efficient_fine": (16, 24, 32, 44, 64, 92, 128, 180, 256, 364, 512, 724, 1024),
    "demo": (16, 32, 64, 128, 256),
}
# Log-spaced temperature lists of our own (the reference repository's lists are not published
# with its results); coarse: half a decade apart, fine: a quarter of a decade apart.
PRESET_LRS = {
    "coarse": (0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316),
    "fine": (0.001, 0.00178, 0.00316, 0.00562, 0.01, 0.0178, 0.0316, 0.0562, 0.1, 0.178, 0.316),
}
PRESET_WEIGHT_DECAYS = {
    "coarse": (1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3),
    "fine": (1e-5, 1.78e-5, 3.16e-5, 5.62e-5, 1e-4, 1.78e-4, 3.16e-4, 5.62e-4, 1e-3, 1.78e-3, 3.16e-3),
}
PRESETS = {
    "widths": PRESET_WIDTHS,
    "batch_sizes": PRESET_BATCH_SIZES,
    "lrs": PRESET_LRS,
    "weight_decays": PRESET_WEIGHT_DECAYS,
}

PRESET_SPECS = {
    # The embedded default: residual conv nets on MNIST-1D, 3 widths x 5 learning rates (the temperature) x 2
    # seeds, every landscape metric at its default settings except where a cheaper one still measures
    # what the figure shows (docs/reference.md says which and why).
    "demo": {"name": "demo", "arch": "resnet1d", "dataset": "mnist1d", "widths": [2, 8, 32], "batch_sizes": [32],
             "lrs": [0.05, 0.1, 0.2, 0.4, 0.8], "temperature_axis": "lr", "seeds": [0, 1], "epochs": 8,
             "schedule": "step", "metrics": ["loss_acc", "dist", "hessian", "CKA", "curve", "fisher"],
             "metric_options": {"fisher": {"n_batches": 20},
                                "curve": {"epochs": 20, "lr": 0.1, "linear": False, "pairs": "first"}}},
    "tiny": {"name": "tiny", "arch": "mlp", "widths": [4, 16], "batch_sizes": [32, 128], "seeds": [0, 1],
             "epochs": 3, "metrics": ["loss_acc", "dist"]},
    # The reference study's recipe (nsfzyzz/loss_landscape_taxonomy, workspace/src/): ResNet18 of width k on
    # CIFAR-10, as its width x batch-size experiment trained and measured it (tests/test_presets.py pins each value).
    "reference": {
        "name": "reference", "arch": "resnet18", "dataset": "cifar10",
        "widths": "reference",              # example_experiment.py: widths 1 ... 128
        "batch_sizes": "efficient_fine",    # write_script.py, temperature range Efficient_fine: 16 ... 1024
        "seeds": [0, 1, 2, 3, 4],           # example_experiment.py: --exp-num 5 models per cell
        "epochs": 100,                      # write_script.py, lr_decay: --epochs 100
        "lrs": [0.1],                       # example_experiment.py --lr-standard 0.1, the same at every batch size
        "weight_decays": [5e-4],            # --wd-standard 5e-4, coupled, on every parameter (code/train.py)
        "momentum": 0.9,                    # code/train.py: SGD(momentum=0.9)
        "schedule": "step", "lr_decay_at": 0.75, "lr_decay_factor": 0.1,  # code/train.py --one-lr-decay
        "train_fractions": [1.0],           # "subset_10": load 10 -> --subset 1.0, the whole training set
        "metric_checkpoint": "best",        # --save-best writes only the lowest-training-loss checkpoint,
                                            # which the metric scripts read (utils.py return_file_name)
        "metrics": ["loss_acc", "dist", "hessian", "CKA", "curve"],
        "metric_options": {
            # code/measure_hessian.py: one batch of 200 training images, eval mode; PyHessian eigenvalues
            # (100 iterations, tol 1e-3) and trace (Hutchinson, 100 probes, relative change below 1e-3)
            "hessian": {"batch_size": 200, "lanczos_iters": 100, "tol": 1e-3, "trace_probes": 100,
                        "trace_rule": "change", "trace_tol": 1e-3},
            # code/CKA.py: --mixup-CKA --mixup-alpha 16, batches 0..5 of 128 training images, every seed pair
            "CKA": {"mixup_alpha": 16.0, "batches": 6, "batch_size": 128, "pairs": "all"},
            # example_experiment.py CURVE_PARAMETERS, code/Mode_connectivity.py: Bezier with 3 bends between
            # models 0 and 1, 50 epochs of the whole training set, lr 0.01, momentum 0.9, L2 5e-4, batch 128,
            # 5 points, its bend left at the curve layers' initialisation (init_linear is not called)
            "curve": {"epochs": 50, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                      "max_batches_per_epoch": 0, "points": 5, "eval_examples": 0, "pairs": "first",
                      "bend_init": "random"},
        },
    },
}


def preset(field_name: str, name: str) -> tuple:
    """A named list from PRESETS, e.g. preset('batch_sizes', 'efficient_fine')."""
    table = PRESETS[field_name]
    if name not in table:
        raise SpecError(field_name, f"{name!r} is neither a list of numbers nor a preset; presets: {', '.join(table)}")
    return table[name]
