"""Spec validation: every bad field fails at construction with a message naming it."""

from __future__ import annotations

import json

import pytest

from phasediagram.errors import SpecError
from phasediagram.resolve import check, load_spec
from phasediagram.spec.experiment import Cell, ExperimentSpec
from phasediagram.spec.presets import PRESET_BATCH_SIZES, PRESET_WIDTHS, preset

from .conftest import tiny_spec


@pytest.mark.parametrize("field, value, words", [
    ("widths", (), "must not be empty"),
    ("widths", (0, 4), "out of range"),
    ("widths", (-2,), "out of range"),
    ("widths", (2.5,), "not an integer"),
    ("widths", (4, 4), "duplicated"),
    ("widths", "8", "expected a list"),
    ("batch_sizes", (), "must not be empty"),
    ("batch_sizes", (0,), "out of range"),
    ("batch_sizes", (16, 16), "duplicated"),
    ("batch_sizes", (5000,), "exceed the training set"),
    ("arch", "vgg", "not one of mlp, resnet1d, resnet18"),
    ("dataset", "imagenet", "not one of mnist1d, cifar10"),
    ("metrics", ("loss_acc", "sharpness"), "not one of"),
    ("optimizer", "adam", "not one of"),
    ("regularizer", "dropout", "not one of"),
    ("seeds", (-1,), "out of range"),
    ("seeds", (2**31,), "out of range"),
    ("seeds", (0, 0), "duplicated"),
    ("epochs", 0, "out of range"),
    ("lrs", (0.0,), "out of range"),
    ("lrs", (float("nan"),), "not a finite number"),
    ("schedule", "linear", "not one of constant, step, cosine"),
    ("name", "../escape", "must be 1-64 characters"),
    ("name", "/abs", "must be 1-64 characters"),
    ("load_axis", "depth", "not one of width, train_fraction, label_noise"),
    ("ensemble", "maybe", "not one of auto, on, off"),
])
def test_bad_field_names_field_and_allowed_values(field, value, words):
    with pytest.raises(SpecError) as err:
        tiny_spec(**{field: value})
    assert err.value.field == field
    assert words in str(err.value)


def test_batch_size_limit_follows_training_fraction():
    tiny_spec(train_fractions=(1.0,), batch_sizes=(4000,))
    with pytest.raises(SpecError, match=r"exceed the training set \(1000 examples"):
        tiny_spec(train_fractions=(0.25,), batch_sizes=(1001,))


def test_non_axis_fields_must_hold_one_value():
    with pytest.raises(SpecError, match="neither the load axis"):
        tiny_spec(lrs=(0.1, 0.01))
    spec = tiny_spec(lrs=(0.1, 0.01), temperature_axis="lr", batch_sizes=(256,))
    assert len(spec.cells()) == 4


def test_pair_metrics_need_two_seeds():
    with pytest.raises(SpecError, match="need at least two seeds"):
        tiny_spec(seeds=(0,), metrics=("loss_acc", "dist"))
    tiny_spec(seeds=(0,), metrics=("loss_acc",))


def test_cells_are_ordered_and_ids_stable():
    spec = tiny_spec()
    cells = spec.cells()
    assert [(c.width, c.batch_size) for c in cells] == [(4, 256), (4, 512), (8, 256), (8, 512)]
    assert cells[0].id == "w4_bs256_lr0.1_wd0.0005_f0.25_n0"
    assert Cell(4, 256, 0.1, 5e-4, 0.25, 0.0).id == cells[0].id


def test_json_and_yaml_round_trip(tmp_path):
    spec = tiny_spec(metric_options={"loss_acc": {"batch_size": 500}})
    (tmp_path / "s.json").write_text(spec.to_json())
    assert ExperimentSpec.from_file(tmp_path / "s.json") == spec
    (tmp_path / "s.yaml").write_text("name: y\narch: mlp\nwidths: [4, 8]\nbatch_sizes: efficient_fine\n"
                                     "seeds: [0, 1]\nepochs: 1\n")
    y = ExperimentSpec.from_file(tmp_path / "s.yaml")
    assert y.batch_sizes == PRESET_BATCH_SIZES["efficient_fine"] and y.widths == (4, 8)


@pytest.mark.parametrize("text, suffix, words", [
    ("{not json", ".json", "not valid JSON"),
    ("a: [1, 2", ".yaml", "not valid YAML"),
    ("- 1\n- 2\n", ".yaml", "expected a mapping"),
    ('{"widths": [4], "colour": "red"}', ".json", "unknown key(s) ['colour']"),
])
def test_bad_spec_files(tmp_path, text, suffix, words):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        ExperimentSpec.from_file(path)
    assert words in str(err.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        ExperimentSpec.from_file(tmp_path / "nope.yaml")


def test_presets_of_the_reference_study():
    assert preset("widths", "reference") == PRESET_WIDTHS["reference"] == (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64,
                                                                           91, 128)
    assert preset("batch_sizes", "efficient_fine")[0] == 16 and len(preset("batch_sizes", "efficient_fine")) == 13
    with pytest.raises(SpecError, match="neither a list of numbers nor a preset; presets:"):
        preset("lrs", "medium")


def test_training_hash_ignores_metrics_only():
    a = tiny_spec()
    assert a.training_hash() == tiny_spec(metrics=("loss_acc",)).training_hash()
    assert a.training_hash() != tiny_spec(epochs=3).training_hash()
    assert json.loads(a.to_json())["widths"] == [4, 8]


def test_the_spec_checks_structure_and_resolve_checks_names():
    """An unregistered name is structurally a name: the spec holds it, `resolve.check` refuses it."""
    spec = ExperimentSpec(name="t", arch="vgg", metrics=("loss_acc", "sharpness"))
    assert spec.arch == "vgg"
    with pytest.raises(SpecError, match="arch: 'vgg' is not one of mlp, resnet1d, resnet18"):
        check(spec)
    with pytest.raises(SpecError, match="not a name"):
        ExperimentSpec(name="t", arch="../x")
    with pytest.raises(SpecError, match="metrics: 'sharpness' is not one of"):
        check(ExperimentSpec(name="t", metrics=("loss_acc", "sharpness")))
    assert load_spec({"name": "t", "arch": "mlp"}) == ExperimentSpec(name="t", arch="mlp")
