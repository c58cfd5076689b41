"""The metric contract, for every registered metric: a new metric gets these tests for free.

Each metric must return a finite dict[str, float] with well-formed keys, leave the parameters,
buffers and per-module train/eval flags of its models unchanged, and return the same values for
the same generator seed. Each registry entry's `test_options` keep this fast (its defaults where it
gives none). Every option declares its rule (`phasediagram.options`), and the options reject values
just outside its bounds and accept the bounds that are inclusive.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from phasediagram import resolve
from phasediagram.data import sequences
from phasediagram.data.datasets import Split
from phasediagram.errors import SpecError
from phasediagram.metrics import DIAGNOSTIC, METRICS, STDERR, VALUE, MetricData, parse_key
from phasediagram.models import families as models
from phasediagram.options import Rule, rules
from phasediagram.spec.experiment import ExperimentSpec


def tiny_data() -> MetricData:
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(128, 40, generator=g, dtype=torch.float64), torch.randn(64, 40, generator=g, dtype=torch.float64)
    y, yt = torch.randint(0, 10, (128,), generator=g), torch.randint(0, 10, (64,), generator=g)
    return MetricData(Split(x, y), Split(xt, yt), 10)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create("resnet1d", 2, (40,), 10).double()
    model.train()
    model.stages[0].bn1.eval()  # a mixed state the metric must restore exactly
    return model


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def options_for(name: str):
    cls = METRICS[name].options
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in METRICS[name].test_options.items() if k in fields})


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_contract(name, tmp_path):
    metric = METRICS[name]
    data = tiny_data()
    models_ = [tiny_model(0)] if metric.kind == "single" else [tiny_model(0), tiny_model(1)]
    before = [snapshot(m) for m in models_]
    options = options_for(name)

    def compute(seed, state_dir):
        return metric.compute(*models_, dataclasses.replace(data, state_dir=state_dir), options,
                              torch.Generator().manual_seed(seed))

    first = compute(1, tmp_path / "a")
    assert isinstance(first, dict) and first
    for key, value in first.items():
        split, quantity, _ = parse_key(key)
        assert split in ("train", "test", "-") and quantity, key
        assert isinstance(value, float) and math.isfinite(value), (key, value)
    for model, (state, modes) in zip(models_, before):
        after_state, after_modes = snapshot(model)
        assert after_modes == modes
        assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert compute(1, tmp_path / "b") == first
    assert {p.quantity for p in metric.panels} <= {parse_key(k)[1] for k in first}


def default_data() -> MetricData:
    """Enough examples for every metric's default batch sizes (Hessian 200, Fisher 100, CKA 128)."""
    g = torch.Generator().manual_seed(2)
    x, xt = torch.randn(256, 40, generator=g, dtype=torch.float64), torch.randn(64, 40, generator=g, dtype=torch.float64)
    y, yt = torch.randint(0, 10, (256,), generator=g), torch.randint(0, 10, (64,), generator=g)
    return MetricData(Split(x, y), Split(xt, yt), 10)


@pytest.mark.parametrize("arch", ["resnet1d", "mlp"])
@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_value_is_finite_at_the_default_options(name, arch, tmp_path):
    """The options as shipped, on small models with and without BatchNorm: every value finite, every
    declared non-measurement quantity present, and each quantity named like a standard error or a product
    count declared as one (so figures, phases and correlations skip it)."""
    metric = METRICS[name]
    torch.manual_seed(0)
    models_ = [models.create(arch, 2, (40,), 10).double() for _ in range(1 if metric.kind == "single" else 2)]
    data = dataclasses.replace(default_data(), state_dir=tmp_path)
    out = metric.compute(*models_, data, metric.options(), torch.Generator().manual_seed(1))
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), \
        {k: v for k, v in out.items() if not math.isfinite(v)}
    quantities = {parse_key(k)[1] for k in out}
    # a t* diagnostic comes with its quantity (repaired_barrier: only for models without BatchNorm)
    expected = {d for d in metric.diagnostics if not d.endswith("_t") or d[:-2] in quantities}
    assert set(metric.stderrs) | expected <= quantities
    assert all(d[:-2] in quantities for d in quantities & set(metric.diagnostics) if d.endswith("_t"))
    for q in quantities:
        if q.endswith(("_stderr", "_se")):
            assert metric.quantity_kind(q) == STDERR, q
        elif q.startswith("hvp_") or q.endswith(("_t", "_converged", "_floored", "_skipped")):
            assert metric.quantity_kind(q) == DIAGNOSTIC, q
        else:
            assert metric.quantity_kind(q) == VALUE, q


TOKEN_DATASETS = {"transformer": "modular_addition", "transformer_seq": "reversal"}
# what a spec check refuses: weight matching cannot trace attention's head split; the metrics of one label
# per example (per-example gradients, losses, a class's probability) cannot take token logits (N, C, T)
REFUSED = {("aligned_barrier", "transformer"), ("aligned_barrier", "transformer_seq"), ("fisher", "transformer_seq"),
           ("local_energy", "transformer_seq"), ("loss_slice", "transformer_seq")}


def token_data(arch: str) -> MetricData:
    """Modular addition mod 7 (49 pairs, V = 9) for `transformer`; for `transformer_seq` the reversal of strings
    of 3 of 4 symbols (V = 5), labels on the last 3 of 6 positions."""
    x, y = sequences.modular_arithmetic(7) if arch == "transformer" else sequences.reversal(4, 3, 48, seed=0)
    x = x.to(torch.float64)
    return MetricData(Split(x[:32], y[:32]), Split(x[32:48], y[32:48]), 9 if arch == "transformer" else 5)


@pytest.mark.parametrize("arch", sorted(TOKEN_DATASETS))
@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_measures_the_transformer_families_or_refuses_them_when_the_spec_is_checked(name, arch,
                                                                                                 tmp_path):
    """Never a silent missing panel: a spec naming the metric on the family and its token dataset is refused
    in one line naming the metric (exactly the pairs of REFUSED), or the metric's values are finite and hold its
    panels' quantities."""
    metric = METRICS[name]
    spec = ExperimentSpec(arch=arch, dataset=TOKEN_DATASETS[arch], widths=(8,), train_fractions=(0.5,),
                          metrics=(name,))
    if (name, arch) in REFUSED:
        with pytest.raises(SpecError, match=f"{name} cannot measure arch {arch}") as info:
            resolve.check(spec)
        assert "\n" not in str(info.value)
        return
    resolve.check(spec)
    data = token_data(arch)
    torch.manual_seed(0)
    models_ = [models.create(arch, 8, data.train.x.shape[1:], data.n_classes).double()
               for _ in range(1 if metric.kind == "single" else 2)]
    out = metric.compute(*models_, dataclasses.replace(data, state_dir=tmp_path), options_for(name),
                         torch.Generator().manual_seed(1))
    assert out and all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert {p.quantity for p in metric.panels} <= {parse_key(k)[1] for k in out}


def rule_cases(rule: Rule) -> tuple[list, list]:
    """(values `rule` must reject, values it must accept): just outside each bound of a number and each
    inclusive bound itself (a strict bound itself and just inside it), a bool and a string for a number, a
    non-choice for a choice, and so on."""
    rejected, accepted = [], []
    if rule.kind in ("integer", "real"):
        whole = rule.kind == "integer"
        rejected += [True, False, "1", *([] if whole else [math.nan, math.inf, -math.inf])]
        (accepted if rule.optional else rejected).append(None)
        for bound, outward, strict in ((rule.low, -math.inf, rule.open_low), (rule.high, math.inf, rule.open_high)):
            if bound is None:
                continue
            if strict:
                rejected.append(bound)
                accepted.append(math.nextafter(bound, -outward))
            else:
                rejected.append(bound + (1 if outward > 0 else -1) if whole else math.nextafter(bound, outward))
                accepted.append(bound)
                (rejected if whole else accepted).append(float(bound))
    elif rule.kind == "flag":
        rejected += [0, 1, "true", None]
        accepted += [True, False]
    elif rule.kind == "choice":
        rejected += ["no such choice", 1, *([] if rule.optional else [None])]
        accepted += list(rule.choices)
    elif rule.kind == "subset":
        rejected += [[], (), rule.choices[0], ["no such choice"], [rule.choices[0]] * 2, None]
        accepted += [[c] for c in rule.choices] + [list(rule.choices)]
    return rejected, accepted


def check_declared_bounds(cls: type, group: str) -> None:
    """Every field of the option class `cls` rejects what its rule rejects, with the SpecError naming
    `<group>.<field>`, and accepts its inclusive bounds."""
    for name, rule in rules(cls).items():
        rejected, accepted = rule_cases(rule)
        for value in rejected:
            with pytest.raises(SpecError) as info:
                cls(**{name: value})
            assert str(info.value) == f"{group}.{name}: {value!r} is out of range (allowed: {rule.allowed})"
        for value in accepted:
            cls(**{name: value})


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_option_declares_a_rule_its_default_obeys(name):
    cls = METRICS[name].options
    assert all(isinstance(rule, Rule) for rule in rules(cls).values()), rules(cls)
    default = cls()
    assert all(rule.accepts(getattr(default, field)) for field, rule in rules(cls).items())


@pytest.mark.parametrize("name", sorted(METRICS))
def test_options_reject_values_outside_their_declared_bounds(name):
    check_declared_bounds(METRICS[name].options, f"metric_options.{name}")
