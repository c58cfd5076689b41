"""CIFAR-100 and SVHN read from tiny folders written in their published formats, and a study on each.

CIFAR-100: `cifar-100-python/{train,test}`, python-2 pickles with bytes keys (b'data' uint8 N x 3072
in channel-major order, b'fine_labels', b'coarse_labels', b'filenames'). SVHN: MATLAB v5 files
`train_32x32.mat`, `test_32x32.mat` with X (32, 32, 3, N) uint8 and y (N, 1), the digit 0 labelled 10.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from scipy.io import savemat

from phasediagram import cli
from phasediagram.data import datasets as data
from phasediagram.errors import SpecError


def write_cifar100_folder(root, n_train=12, n_test=4, seed=0):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1",
                         b"fine_labels": fine, b"coarse_labels": [v // 5 for v in fine], b"data": pixels}, f,
                        protocol=2)
        out[name] = (pixels, fine)
    return out


def write_svhn_folder(root, n_train=10, n_test=4, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0] = 10  # the digit 0
        savemat(root / name, {"X": x, "y": y})
        out[name] = (x, y)
    return out


def test_cifar100_reader_reads_the_real_layout(tmp_path):
    written = write_cifar100_folder(tmp_path)
    ds = data.read_cifar100(tmp_path)
    assert ds.n_classes == 100 and ds.train.x.shape == (12, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    pixels, fine = written["train"]
    expected = (pixels[3].reshape(3, 32, 32) / 255.0 - np.array(data.CIFAR100_MEAN)[:, None, None]) \
        / np.array(data.CIFAR100_STD)[:, None, None]
    np.testing.assert_allclose(ds.train.x[3].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ds.train.y.tolist() == fine and ds.train.y.dtype == torch.int64
    assert data.read_cifar100(tmp_path / "cifar-100-python").train.x.shape[0] == 12


def test_svhn_reader_reads_the_real_layout(tmp_path):
    written = write_svhn_folder(tmp_path)
    ds = data.read_svhn(tmp_path)
    assert ds.n_classes == 10 and ds.train.x.shape == (10, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    x, y = written["train_32x32.mat"]
    expected = (x[:, :, :, 2].transpose(2, 0, 1) / 255.0 - np.array(data.SVHN_MEAN)[:, None, None]) \
        / np.array(data.SVHN_STD)[:, None, None]
    np.testing.assert_allclose(ds.train.x[2].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert ds.train.y.tolist() == [int(v) % 10 for v in y[:, 0]] and ds.train.y[0] == 0


@pytest.mark.parametrize("name, write, words", [
    ("cifar100", lambda root: (root / "cifar-100-python").mkdir(), "must hold the CIFAR-100 python files (train, test)"),
    ("svhn", lambda root: None, "must hold the SVHN cropped-digit files (train_32x32.mat, test_32x32.mat)"),
])
def test_missing_files_are_named(tmp_path, name, write, words):
    write(tmp_path)
    with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
        data.READERS[name](tmp_path)
    with pytest.raises(SpecError, match=f"{name} needs data_root"):
        data.load(name)


def test_malformed_files_are_refused(tmp_path):
    write_cifar100_folder(tmp_path / "c")
    with open(tmp_path / "c" / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [3, 100]}, f, protocol=2)
    with pytest.raises(SpecError, match="labels outside 0..99"):
        data.read_cifar100(tmp_path / "c")
    write_svhn_folder(tmp_path / "s")
    (tmp_path / "s" / "test_32x32.mat").write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(SpecError, match="test_32x32.mat is not an SVHN .mat file"):
        data.read_svhn(tmp_path / "s")
    savemat(tmp_path / "s" / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]])})
    with pytest.raises(SpecError, match="labels outside 1..10"):
        data.read_svhn(tmp_path / "s")


@pytest.mark.parametrize("dataset, write", [("cifar100", write_cifar100_folder), ("svhn", write_svhn_folder)])
def test_a_study_on_each_dataset(tmp_path, dataset, write):
    write(tmp_path / "data_root", n_train=16, n_test=8)
    argv = ["--name", dataset, "--dataset", dataset, "--data-root", str(tmp_path / "data_root"), "--arch", "mlp",
            "--widths", "4", "--batch-sizes", "8", "--seeds", "0", "1", "--epochs", "1", "--metrics", "train",
            "loss_acc", "dist", "--run", "--executor", "inprocess", "--root", str(tmp_path / "study")]
    assert cli.main(argv) == 0
    from phasediagram.analysis import table

    df = table.read(tmp_path / "study" / "checkpoint" / dataset / "results.csv", dataset)
    acc = df[(df.source == "loss_acc") & (df.metric == "acc")]
    assert len(acc) == 4 and acc.value.between(0, 100).all()
