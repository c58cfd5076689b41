"""The metric registry: one explicit dict, one contract (see `base`).

To add a metric: write `metrics/<name>.py` with its compute function and options dataclass, and
add one entry here. The registry-wide contract tests then cover it.
"""

from __future__ import annotations

from phasediagram.accel import policy
from phasediagram.metrics.base import DIAGNOSTIC, ROW_KINDS, STDERR, VALUE, Metric, MetricData, Panel, key, parse_key
from phasediagram.metrics.cka import CKAOptions, cka
from phasediagram.metrics.curve import CurveOptions, curve, curve_pairs
from phasediagram.metrics.dist import DistOptions, dist
from phasediagram.metrics.fisher import FisherOptions, fisher
from phasediagram.metrics.grad_norm import GradNormOptions, grad_norm
from phasediagram.metrics.hessian import HessianOptions, hessian, hessian_seeds
from phasediagram.metrics.local_energy import LocalEnergyOptions, local_energy
from phasediagram.metrics.loss_acc import LossAccOptions, loss_acc
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
