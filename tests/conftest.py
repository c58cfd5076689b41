"""Shared fixtures: a tiny spec factory and a study root whose MNIST-1D cache is generated once."""

from __future__ import annotations

import shutil

import pytest
import torch

from phasediagram.data import datasets as data
from phasediagram.resolve import check
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage.layout import Layout

# One torch thread for the whole session: small models run as fast, and processes forked by the
# fault tests never inherit a busy OpenMP pool (which would deadlock them).
torch.set_num_threads(1)
torch.set_num_interop_threads(1)


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
    """A folder holding the MNIST-1D cache (.npz), generated once per test session."""
    folder = tmp_path_factory.mktemp("mnist1d_cache")
    data.load("mnist1d", cache_dir=folder)
    return folder


@pytest.fixture
def root(tmp_path, mnist_cache):
    """A fresh study root with the MNIST-1D cache already in <root>/data."""
    shutil.copytree(mnist_cache, tmp_path / "data")
    return tmp_path


def tiny_spec(**overrides) -> ExperimentSpec:
    """A 2x2 grid of small MLPs that trains in about a second, checked against the registries."""
    fields = dict(name="tiny", arch="mlp", widths=(4, 8), batch_sizes=(256, 512), seeds=(0, 1), epochs=2,
                  train_fractions=(0.25,), metrics=("loss_acc", "dist"))
    fields.update(overrides)
    return check(ExperimentSpec(**fields))


@pytest.fixture
def tiny(root):
    spec = tiny_spec()
    layout = Layout(root, spec.name)
    layout.spec_path.parent.mkdir(parents=True, exist_ok=True)
    layout.spec_path.write_text(spec.to_json())
    return spec, layout


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the job pool's workers run so), then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

