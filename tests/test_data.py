"""Datasets: the CIFAR-10 reader on a tiny folder in the real format, subsets, label noise, mixup."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from phasediagram.data import datasets as data
from phasediagram.errors import SpecError


def write_cifar_folder(root, n_per_batch=4, seed=0):
    """CIFAR-10's python layout: dicts with 'data' (uint8 N x 3072) and 'labels', pickled (protocol 2)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in (*data.CIFAR_TRAIN_FILES, "test_batch"):
        pixels = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": pixels, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(n_per_batch)]}, f, protocol=2)
        batches[name] = (pixels, labels)
    return batches


def test_cifar_reader_reads_the_real_layout(tmp_path):
    batches = write_cifar_folder(tmp_path)
    ds = data.read_cifar10(tmp_path)
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    pixels, labels = batches["data_batch_2"]
    expected = (pixels[1].reshape(3, 32, 32) / 255.0 - np.array(data.CIFAR_MEAN)[:, None, None]) \
        / np.array(data.CIFAR_STD)[:, None, None]
    np.testing.assert_allclose(ds.train.x[5].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ds.train.y[5].item() == labels[1]
    assert ds.test.y.tolist() == batches["test_batch"][1]
    assert data.read_cifar10(tmp_path / "cifar-10-batches-py").train.x.shape[0] == 20


def test_cifar_missing_folder_names_what_is_expected(tmp_path):
    with pytest.raises(SpecError, match="must hold the CIFAR-10 python batches.*missing: data_batch_1"):
        data.read_cifar10(tmp_path)
    with pytest.raises(SpecError, match="cifar10 needs data_root"):
        data.load("cifar10")


def test_cifar_wrong_format_is_refused(tmp_path):
    write_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(SpecError, match="data_batch_3 is not a CIFAR-10 python batch file"):
        data.read_cifar10(tmp_path)


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    write_cifar_folder(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(SpecError, match="refused to load global"):
        data.read_cifar10(tmp_path)
    assert not marker.exists()


def test_mnist1d_default_and_cache(mnist_cache):
    ds = data.load("mnist1d", cache_dir=mnist_cache)
    assert ds.train.x.shape == (4000, 40) and ds.test.x.shape == (1000, 40) and ds.n_classes == 10
    assert abs(float(ds.train.x.mean())) < 1e-5 and abs(float(ds.train.x.std()) - 1) < 1e-3


def test_subset_and_label_noise_are_seeded(mnist_cache):
    a = data.load("mnist1d", cache_dir=mnist_cache, train_fraction=0.1, label_noise=0.5)
    b = data.load("mnist1d", cache_dir=mnist_cache, train_fraction=0.1, label_noise=0.5)
    clean = data.load("mnist1d", cache_dir=mnist_cache, train_fraction=0.1)
    assert len(a.train) == 400 and torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    changed = (a.train.y != clean.train.y).float().mean().item()
    assert 0.35 < changed < 0.5  # half relabelled, 1/10 of those keep their class by chance


def test_mixup_mixes_pairs_with_one_lambda():
    g = torch.Generator().manual_seed(0)
    x = torch.eye(6, dtype=torch.float64)
    mixed = data.mixup(x, 16.0, g)
    rows = mixed.sort(dim=1, descending=True).values
    lam = rows[0, 0]
    assert 0.2 < lam < 0.8 or lam > 0.5
    assert torch.allclose(rows[:, 0] + rows[:, 1], torch.ones(6, dtype=torch.float64))
    with pytest.raises(SpecError, match="must be > 0"):
        data.mixup(x, 0.0, g)
