"""A model family and a dataset named by import path: both defined here, run through the CLI and the API.

The plugged-in family is a small conv net with BatchNorm (no ensemble form), the dataset
scikit-learn's bundled 8x8 digits as (N, 1, 8, 8) images.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import phasediagram
from phasediagram import cli
from phasediagram.analysis import table
from phasediagram.data import datasets
from phasediagram.errors import CorruptFile, SpecError
from phasediagram.metrics import METRICS
from phasediagram.models import families
from phasediagram.plugins import is_import_path, load_object
from phasediagram.resolve import check
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.training import train

from .test_method_contract import CASES

HERE = __name__  # "tests.test_plugins": importable by path in this process and in the pool's workers
NET, DIGITS = f"{HERE}:make_net", f"{HERE}:load_digits"


class DigitNet(nn.Module):
    """conv(1 -> k, 3x3) -> BatchNorm -> ReLU -> 2x2 max pool -> linear(n_classes)."""

    def __init__(self, width: int, n_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        c, h, w = input_shape
        self.conv, self.bn = nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Linear(width * (h // 2) * (w // 2), n_classes)

    def forward(self, x):
        return self.head(torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def make_net(width, n_classes, input_shape):
    return DigitNet(width, n_classes, input_shape)


def load_digits(data_root):
    """scikit-learn's digits, pixels / 16 - 0.5, the first 1400 images for training."""
    from sklearn.datasets import load_digits as digits

    d = digits()
    x = torch.as_tensor(d.images / 16.0 - 0.5, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(d.target)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:]), 10


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def load_digits_as_datasets():
    (xtr, ytr), (xte, yte), k = load_digits(None)
    return PairDataset(xtr[:300], ytr[:300]), PairDataset(xte, yte), k


def returns(value):
    """A loader returning `value` whatever the folder: registered here under a fresh name."""
    name = f"_returns_{len(RETURNS)}"
    RETURNS[name] = lambda data_root: value
    globals()[name] = RETURNS[name]
    return f"{HERE}:{name}"


RETURNS: dict = {}


def load_broken(data_root):
    raise OSError("no such folder")


def make_dict(width, n_classes, input_shape):
    return {"width": width}


def make_wrong_logits(width, n_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), n_classes + 1))


def make_frozen(width, n_classes, input_shape):
    net = make_net(width, n_classes, input_shape)
    net.requires_grad_(False)
    return net


def spec_for(**fields):
    base = dict(name="plug", arch=NET, dataset=DIGITS, widths=(2, 4), batch_sizes=(64, 256), seeds=(0, 1),
                epochs=2, train_fractions=(0.5,), metrics=("loss_acc", "dist"))
    return check(ExperimentSpec(**{**base, **fields}))


def test_import_paths_are_spelled_module_colon_function():
    assert is_import_path("mypkg.nets:make_vit") and is_import_path("a:b.c")
    for text in ("mlp", "a:", ":b", "a:b:c", "a b:c", "1a:b", "a:b-c", "a" * 200 + ":b", 3, None):
        assert not is_import_path(text), text


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    (f"{HERE}:no_such_function", f"module '{HERE}' has no attribute 'no_such_function'"),
    (f"{HERE}:HERE", "'HERE' is a str, not a function"),
])
def test_a_failed_import_says_which_module_and_why(path, message):
    with pytest.raises(SpecError, match="arch") as err:
        load_object("arch", path)
    assert message in str(err.value)


def test_the_spec_accepts_import_paths_and_records_them():
    spec = spec_for()
    assert ExperimentSpec.from_dict(json.loads(spec.to_json())) == spec
    with pytest.raises(SpecError, match="is not a name .* nor an import path"):
        ExperimentSpec(name="x", arch="mypkg nets:make")


@pytest.mark.parametrize("arch, message", [
    (f"{HERE}:make_dict", "returned a dict, not a torch.nn.Module"),
    (f"{HERE}:make_wrong_logits", "to (2, 11); expected floating-point logits of shape (2, 10)"),
    (f"{HERE}:make_frozen", "no trainable parameters"),
    (f"{HERE}:load_digits", "raised TypeError"),
])
def test_a_builder_whose_model_is_wrong_is_refused_at_check(arch, message):
    with pytest.raises(SpecError, match="arch") as err:
        spec_for(arch=arch)
    assert arch in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_a_registered_family_takes_plugged_inputs(arch):
    model = families.create(arch, 2, (1, 8, 8), 10)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10) and spec_for(arch=arch).arch == arch


def test_a_registered_family_on_plugged_inputs_it_cannot_take_is_refused():
    with pytest.raises(SpecError, match="resnet18 needs image inputs"):
        spec_for(arch="resnet18", dataset=returns(((torch.zeros(8, 5), torch.zeros(8, dtype=torch.long)),
                                                   (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)), 2)))


GOOD_X, GOOD_Y = torch.zeros(8, 3), torch.arange(8) % 2


@pytest.mark.parametrize("value, message", [
    ([1, 2], "returned a list; expected (train, test, n_classes)"),
    (((GOOD_X, GOOD_Y), (GOOD_X, GOOD_Y), 1), "n_classes is 1"),
    (((GOOD_X, GOOD_Y), (GOOD_X, GOOD_Y), True), "n_classes is True"),
    (((GOOD_X.long(), GOOD_Y), (GOOD_X, GOOD_Y), 2), "train inputs are torch.int64; expected floating point"),
    (((GOOD_X, GOOD_Y.float()), (GOOD_X, GOOD_Y), 2), "train labels are torch.float32; expected integer"),
    (((GOOD_X, GOOD_Y[:5]), (GOOD_X, GOOD_Y), 2), "train labels of shape (5,) for 8 inputs"),
    (((GOOD_X, GOOD_Y), (GOOD_X, GOOD_Y + 1), 2), "test labels span 1..2; expected 0..1"),
    (((GOOD_X, GOOD_Y), (torch.zeros(8, 4), GOOD_Y), 2), "train inputs of shape (3,) but test inputs of (4,)"),
    (((GOOD_X / 0, GOOD_Y), (GOOD_X, GOOD_Y), 2), "train inputs hold NaN"),
    (((torch.zeros(8), GOOD_Y), (GOOD_X, GOOD_Y), 2), "expected (N, *input_shape)"),
    (("abc", (GOOD_X, GOOD_Y), 2), "the train split is a str"),
])
def test_a_loader_whose_data_is_wrong_is_refused_naming_its_path(value, message):
    path = returns(value)
    with pytest.raises(SpecError, match="dataset") as err:
        spec_for(arch="mlp", dataset=path, batch_sizes=(2,))
    assert path in str(err.value) and message in str(err.value)


def test_a_loader_that_raises_or_is_missing_says_why():
    with pytest.raises(SpecError, match=r"load_broken\('/x'\) raised OSError: no such folder"):
        datasets.load_plugged(f"{HERE}:load_broken", "/x")
    with pytest.raises(SpecError, match=r"cannot import module 'nowhere_pkg.data' \(ModuleNotFoundError: No module named 'nowhere_pkg'\)"):
        spec_for(dataset="nowhere_pkg.data:load")


def test_torch_dataset_pairs_load_as_tensors_and_batch_sizes_are_bounded_by_them():
    ds = datasets.load(f"{HERE}:load_digits_as_datasets")
    assert (len(ds.train), len(ds.test), ds.input_shape, ds.n_classes) == (300, 397, (1, 8, 8), 10)
    assert ds.train.y.dtype == torch.long and ds.train.x.dtype == torch.float32
    with pytest.raises(SpecError, match=r"\[200\] exceed the training set \(150 examples"):
        spec_for(dataset=f"{HERE}:load_digits_as_datasets", batch_sizes=(200,))


def test_a_checkpoint_records_the_import_path_and_refuses_another_family(root):
    spec = spec_for(widths=(2,), batch_sizes=(256,), seeds=(0,), metrics=("loss_acc",))
    phasediagram.Study(spec, root).train(phasediagram.InProcess())
    final = next((root / "checkpoint" / "plug").rglob("final.pt"))
    model, ckpt = train.load_model(final)
    assert ckpt["model_args"]["arch"] == NET and isinstance(model, DigitNet)
    train.check_matches(ckpt, spec, spec.cells()[0], final)
    with pytest.raises(CorruptFile, match=f"holds a {NET} of width 2, but the spec says mlp"):
        train.check_matches(ckpt, spec_for(arch="mlp", widths=(2,)), spec.cells()[0], final)
    with pytest.raises(SpecError, match=r"different training settings \(arch\)"):
        phasediagram.Study(spec_for(arch="mlp", widths=(2,), batch_sizes=(256,), seeds=(0,), metrics=("loss_acc",)),
                           root).record()


def test_a_2x2_study_of_a_plugged_model_and_dataset_through_the_cli(tmp_path):
    argv = ["--name", "plug", "--arch", NET, "--dataset", DIGITS, "--widths", "2", "4", "--batch-sizes", "32", "128",
            "--seeds", "0", "1", "--epochs", "3", "--train-fractions", "0.5", "--metrics", "train", "loss_acc",
            "dist", "--run", "--plot", "--root", str(tmp_path), "--workers", "2"]
    assert cli.main(argv) == 0
    exp = tmp_path / "checkpoint" / "plug"
    df = table.read(exp / "results.csv", "plug")
    acc = df[(df.source == "loss_acc") & (df.metric == "acc") & (df.split == "test")]
    assert len(acc) == 8 and acc.cell.nunique() == 4 and (acc.value > 20).all()  # 10 classes: chance is 10 %
    assert json.loads((exp / "spec.json").read_text())["arch"] == NET
    assert list(exp.glob("*.png"))


def test_a_2x2_study_through_the_api_with_every_metric(root):
    """Every registered metric runs on a plugged-in BatchNorm family (no ensemble form: sequential
    runs even with ensemble "on") at its test options; `aligned_barrier` with its traced permutation
    spec, drawn in the figure."""
    measurable = tuple(name for name, entry in METRICS.items() if entry.families is None)
    options = {name: dict(METRICS[name].test_options) for name in measurable if METRICS[name].test_options}
    spec = spec_for(epochs=1, metrics=measurable, metric_options=options, ensemble="on")
    study = phasediagram.Study(spec, root)
    reports = study.run(executor=phasediagram.InProcess())
    assert all(not r.failed for r in reports.values()), {s: r.failed for s, r in reports.items()}
    df = study.table()
    values = df[df.kind == "value"] if "kind" in df else df
    for name in measurable:
        rows = values[values.source == name]
        assert len(rows) and np.isfinite(rows.value.astype(float)).any(), name
    assert {"aligned_barrier", "linear_barrier"} <= set(values[values.source == "aligned_barrier"].metric)
    titles = study.figure(df).titles  # the traced permutation spec gives the aligned barrier its panel
    assert any("linear barrier after weight matching" in t for t in titles), titles


@pytest.mark.parametrize("optimizer, regularizer", CASES)
def test_every_training_method_trains_a_plugged_model(root, optimizer, regularizer):
    spec = spec_for(name=f"m_{optimizer}_{regularizer}", optimizer=optimizer, regularizer=regularizer, widths=(2,),
                    batch_sizes=(128,), seeds=(0,), epochs=1, metrics=("loss_acc",))
    study = phasediagram.Study(spec, root)
    assert not any(r.failed for r in study.run(executor=phasediagram.InProcess()).values())
    loss = study.table().query("source == 'loss_acc' and metric == 'loss' and split == 'train'").value
    assert len(loss) == 1 and np.isfinite(loss).all()


def test_a_metric_of_named_families_refuses_a_plugged_family_at_check(monkeypatch):
    monkeypatch.setitem(METRICS, "dist", dataclasses.replace(METRICS["dist"], families=("mlp", "resnet18")))
    with pytest.raises(SpecError, match=f"metrics: dist measures only mlp, resnet18 models, not arch {NET}"):
        spec_for(metrics=("dist",))
    assert spec_for(arch="mlp", metrics=("dist",)).metrics == ("dist",)
