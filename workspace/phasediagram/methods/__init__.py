"""Registries of training methods: optimizers and regularizers (see `base` for the contract)."""

from __future__ import annotations

from dataclasses import dataclass

from phasediagram.methods.adamw import AdamW, AdamWOptions
from phasediagram.methods.base import MethodEntry, make_options
from phasediagram.methods.entropy_sgd import EntropySGD, EntropySGDOptions
from phasediagram.methods.infomcr import InfoMCR, InfoMCROptions
from phasediagram.methods.nrs import NRS, NRSOptions
from phasediagram.methods.replicated_sgd import ReplicatedSGD, ReplicatedSGDOptions
from phasediagram.methods.sam import SAM, SAMOptions
from phasediagram.methods.sgd import SGD, SGDOptions


@dataclass(frozen=True)
class NoOptions:
    pass


OPTIMIZERS: dict[str, MethodEntry] = {
    "sgd": MethodEntry(SGD, SGDOptions, ensemble_ok=True, description="SGD with momentum and weight decay"),
    "sam": MethodEntry(SAM, SAMOptions, ensemble_ok=False,
                       description="sharpness-aware minimisation (Foret et al. 2021); ASAM with adaptive=true"),
    "entropy_sgd": MethodEntry(
        EntropySGD, EntropySGDOptions, ensemble_ok=False,
        description="Entropy-SGD: SGLD inner loop, step towards its running mean, gamma scoping"),
    "replicated_sgd": MethodEntry(
        ReplicatedSGD, ReplicatedSGDOptions, ensemble_ok=False,
        description="y replicas coupled to their mean (the centre, evaluated), gamma scoping"),
    "adamw": MethodEntry(AdamW, AdamWOptions, ensemble_ok=False,
                         description="AdamW: Adam (beta1 = momentum) with decoupled weight decay, linear warmup"),
}

REGULARIZERS: dict[str, MethodEntry] = {
    "none": MethodEntry(lambda options, seed: None, NoOptions, ensemble_ok=True, description="no regularizer"),
    "infomcr": MethodEntry(InfoMCR, InfoMCROptions, ensemble_ok=False,
                           description="InfoMCR: beta mean_m [L_m(w) - L_m(w - alpha grad L_m)] over M sub-batches"),
    "nrs": MethodEntry(
        NRS, NRSOptions, ensemble_ok=False,
        description="NRS: alpha KL(p(x; w) || p(x; w + delta)), delta on a sphere of relative radius rho"),
}


def method_options(spec):
    """The validated (optimizer options, regularizer options) of `spec`; raises SpecError."""
    opt = make_options("optimizer_options", OPTIMIZERS[spec.optimizer].options, dict(spec.optimizer_options))
    reg = make_options("regularizer_options", REGULARIZERS[spec.regularizer].options, dict(spec.regularizer_options))
    return opt, reg


def build_method(spec, model, *, lr: float, weight_decay: float, seed: int):
    """The training method of `spec` for `model` at learning rate `lr` and weight decay `weight_decay`;
    `seed` seeds any randomness the method draws (noise, neighbours, replicas)."""
    opt_options, reg_options = method_options(spec)
    regularizer = REGULARIZERS[spec.regularizer].build(reg_options, seed=seed)
    return OPTIMIZERS[spec.optimizer].build(model, lr=lr, momentum=spec.momentum, weight_decay=weight_decay,
                                            epochs=spec.epochs, seed=seed, options=opt_options,
                                            regularizer=regularizer)


def ensemble_supported(spec) -> bool:
    return OPTIMIZERS[spec.optimizer].ensemble_ok and REGULARIZERS[spec.regularizer].ensemble_ok
