"""The metric registry: one explicit dict, one contract (see `base`).

To add a metric: write `metrics/<name>.py` with its compute function and options dataclass, and
add one entry here. The registry-wide contract tests then cover it.
"""

from __future__ import annotations

from phasediagram.accel import policy
from phasediagram.metrics.aligned_barrier import AlignedBarrierOptions, aligned_barrier, check_model
from phasediagram.metrics.base import DIAGNOSTIC, ROW_KINDS, STDERR, VALUE, Metric, MetricData, Panel, key, parse_key
from phasediagram.metrics.cka import CKAOptions, cka
from phasediagram.metrics.curve import CurveOptions, curve, curve_pairs
from phasediagram.metrics.dist import DistOptions, dist
from phasediagram.metrics.esd_alpha import ESDAlphaOptions, esd_alpha
from phasediagram.metrics.fisher import FisherOptions, fisher
from phasediagram.metrics.grad_norm import GradNormOptions, grad_norm
from phasediagram.metrics.hessian import HessianOptions, hessian, hessian_seeds
from phasediagram.metrics.local_energy import LocalEnergyOptions, local_energy
from phasediagram.metrics.loss_acc import LossAccOptions, loss_acc
from phasediagram.metrics.loss_slice import LossSliceOptions, loss_slice
from phasediagram.metrics.nrs import NRSOptions, nrs

METRICS: dict[str, Metric] = {
    "loss_acc": Metric(
        "loss_acc", "single", loss_acc, LossAccOptions,
        panels=(Panel("acc", "test", "test accuracy (%)", cmap="viridis"),
                Panel("loss", "train", "training loss", log=True, cmap="viridis_r")),
        description="cross-entropy and accuracy on train and test",
    ),
    "dist": Metric(
        "dist", "pair", dist, DistOptions,
        panels=(Panel("dist", "-", "L2 distance between seeds", cmap="viridis_r"),),
        description="L2 distance between the parameters of two seeds",
    ),
    "CKA": Metric(
        "CKA", "pair", cka, CKAOptions,
        panels=(Panel("cka_logits", "train", "CKA of logits (mixup inputs)", cmap="viridis", vmin=0.0, vmax=1.0),
                Panel("cka_softmax", "train", "CKA similarity", cmap="viridis", vmin=0.0, vmax=1.0)),
        description="linear CKA between two seeds' logits and softmax outputs on mixup training inputs",
        test_options={"batches": 2, "batch_size": 32},
        selects_pairs=True,
    ),
    "curve": Metric(
        "curve", "pair", curve, CurveOptions,
        panels=(Panel("mc", "train", "mode connectivity (error %)", cmap="RdBu_r", center=0.0),
                Panel("mc_linear", "train", "linear-path mc (train error %)", cmap="RdBu", center=0.0)),
        description="mode connectivity: trained quadratic Bezier curve between two seeds, mc and the curve's errors",
        compute_pairs=curve_pairs,
        group_size=policy.bend_group,
        selects_pairs=True,
        diagnostics=("mc_t", "mc_linear_t"),
        test_options={"epochs": 1, "max_batches_per_epoch": 2, "eval_examples": 64, "batch_size": 32},
    ),
    "aligned_barrier": Metric(
        "aligned_barrier", "pair", aligned_barrier, AlignedBarrierOptions,
        panels=(Panel("aligned_barrier", "train", "linear barrier after weight matching (train error %)",
                      cmap="RdBu_r", center=0.0),
                Panel("linear_barrier", "train", "linear barrier (train error %)", cmap="RdBu_r", center=0.0)),
        description="linear-path barrier (train error %) after permuting one seed's units to the other's "
                    "(weight matching, Git Re-Basin; permutation groups traced for plugged-in families), and "
                    "without; with REPAIR for models without BatchNorm",
        selects_pairs=True,
        check_model=check_model,
        diagnostics=("aligned_barrier_t", "linear_barrier_t", "repaired_barrier_t", "wm_converged"),
        test_options={"points": 3, "eval_examples": 64, "batch_size": 32},
    ),
    "hessian": Metric(
        "hessian", "single", hessian, HessianOptions,
        panels=(Panel("top_eigenvalue", "train", "top Hessian eigenvalue", log=True, cmap="viridis_r",
                      fallback=Panel("top_abs_eigenvalue", "train", "largest-magnitude Hessian eigenvalue", log=True,
                                     cmap="viridis_r")),
                Panel("trace_hutchpp", "train", "Hessian trace (Hutch++)", log=True, cmap="viridis_r",
                      fallback=Panel("trace", "train", "Hessian trace (Hutchinson)", log=True, cmap="viridis_r"))),
        description="training-loss Hessian: top eigenvalues (Lanczos), trace (Hutchinson, Hutch++), SLQ density",
        compute_seeds=hessian_seeds,
        group_size=policy.seed_group,
        stderrs=("trace_stderr", "trace_hutchpp_stderr"),
        diagnostics=("hvp_eig", "hvp_trace", "hvp_trace_hutchpp", "hvp_traces", "hvp_density", "eig_converged"),
        test_options={"batch_size": 64, "lanczos_iters": 10, "trace_probes": 4, "hutchpp_sketch": 2, "density_iters": 8,
                      "density_points": 10},
    ),
    "fisher": Metric(
        "fisher", "single", fisher, FisherOptions,
        panels=(Panel("fisher", "train", "Fisher metric 1/2 log det JJ^T (InfoMCR)", cmap="magma"),),
        description="InfoMCR observed-Fisher metric: mean over batches of sum log singular values of per-example gradients",
        diagnostics=("fisher_floored",),
        test_options={"n_batches": 2, "batch_size": 10},
    ),
    "local_energy": Metric(
        "local_energy", "single", local_energy, LocalEnergyOptions,
        panels=(Panel("local_energy", "train", "local energy dE at sigma_value (train loss)", cmap="magma"),
                Panel("local_energy", "test", "local energy dE at sigma_value (test loss)", cmap="magma")),
        description="Pittorino et al. local energy under multiplicative Gaussian weight noise, curve over sigma",
        stderrs=("local_energy_se", "local_energy_err_se"),
        test_options={"n_samples": 3, "n_examples": 64},
    ),
    "nrs": Metric(
        "nrs", "single", nrs, NRSOptions,
        panels=(Panel("nrs", "train", "NRS divergence KL(p(w) || p(w + delta)), train", log=True, cmap="magma"),),
        description="mean KL between the outputs of w and of random neighbours at relative radius rho",
        stderrs=("nrs_se",),
        test_options={"n_neighbours": 2},
    ),
    "grad_norm": Metric(
        "grad_norm", "single", grad_norm, GradNormOptions,
        panels=(Panel("grad_norm", "train", "gradient norm of the training loss", log=True, cmap="magma"),),
        description="norm of the training-loss gradient at the checkpoint (0 at a minimum), and relative to the weights",
        test_options={"n_examples": 64},
    ),
    "loss_slice": Metric(
        "loss_slice", "single", loss_slice, LossSliceOptions,
        panels=(Panel("slice_eigen_rise", "train", "loss rise at t = +-eigen_radius along the top Hessian eigenvector",
                      cmap="magma"),
                Panel("slice_random_rise", "train", "loss rise at t = +-random_radius along a filter-normalised direction",
                      cmap="magma")),
        description="loss slices L(w + t d) - L(w) along the top Hessian eigenvector and filter-normalised random "
                    "directions (1D, 2D), with the rise at the radius and the curvature at 0",
        diagnostics=("slice_eig_converged", "hvp_slice"),
        test_options={"slices": ("eigen", "eigen_bottom", "random", "random2d"), "steps": 2, "steps_2d": 1,
                      "n_examples": 64, "hessian_batch_size": 64, "lanczos_iters": 10},
    ),
    "esd_alpha": Metric(
        "esd_alpha", "single", esd_alpha, ESDAlphaOptions,
        panels=(Panel("esd_alpha", "-", "weight-spectrum power-law alpha (layer mean)", cmap="viridis"),
                Panel("esd_alpha_weighted", "-", "weighted alpha sum alpha log10 lambda_max / L", cmap="viridis")),
        description="WeightWatcher's data-free alpha as weightwatcher 0.7.7's analyze() computes it: power-law "
                    "exponent of each layer's W^T W spectrum, its layer mean and weighted alpha",
        diagnostics=("esd_layers_skipped",),
    ),
}

TRAIN_DIAGNOSTICS = ("epochs", "diverged_epoch", "diverged_step")  # rows of the train stage that are bookkeeping


def row_kind(source: str, quantity: str) -> str:
    """What a table row of `source` (a metric, "train", or another tool's name) and `quantity` holds:
    "value" (a measurement), "stderr" (the standard error of one) or "diagnostic" (of the run)."""
    if source in METRICS:
        return METRICS[source].quantity_kind(quantity)
    return DIAGNOSTIC if source == "train" and quantity in TRAIN_DIAGNOSTICS else VALUE


__all__ = ["DIAGNOSTIC", "METRICS", "ROW_KINDS", "STDERR", "VALUE", "Metric", "MetricData", "Panel", "key",
           "parse_key", "row_kind"]
