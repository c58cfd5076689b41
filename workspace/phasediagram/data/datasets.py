"""Datasets as in-memory tensors: MNIST-1D (generated locally, the default), CIFAR-10, CIFAR-100, SVHN.

The image datasets are read from local folders in their published formats, nothing is downloaded
and no torchvision is needed: CIFAR-10 and CIFAR-100 from the python pickle batches of the official
archives (`cifar-10-batches-py`: data_batch_1..5, test_batch; `cifar-100-python`: train, test,
labels `fine_labels`), unpickled through an allow-list; SVHN from the cropped-digits .mat files
(`train_32x32.mat`, `test_32x32.mat`: X of shape (32, 32, 3, N), y of shape (N, 1) with the digit 0
labelled 10), read with `scipy.io.loadmat`. Images are scaled to [0, 1] and normalised per channel
by the dataset's usual mean and standard deviation.
The token datasets `modular_addition` and `reversal` are generated locally (`data.sequences`).
Any other dataset is named by import path (`dataset: "mypkg.data:load"`, see `load_plugged`).
Training subsets (by fraction) and random labels (by fraction) are seeded independently of the
training seed, so every cell and seed of a study sees the same data.
"""

from __future__ import annotations

import functools
import inspect
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phasediagram.data import sequences
from phasediagram.errors import SpecError
from phasediagram.plugins import call, is_import_path, load_object
from phasediagram.seeding import stable_seed
from phasediagram.storage.checkpoints import atomic_write_bytes
from phasediagram.storage.safepickle import NUMPY_ARRAY_GLOBALS, load_allowed

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known before loading it."""

    train_size: int
    test_size: int
    input_shape: tuple[int, ...]
    n_classes: int


DATASETS = {
    "mnist1d": DatasetInfo(4000, 1000, (40,), 10),
    "cifar10": DatasetInfo(50000, 10000, (3, 32, 32), 10),
    "cifar100": DatasetInfo(50000, 10000, (3, 32, 32), 100),
    "svhn": DatasetInfo(73257, 26032, (3, 32, 32), 10),
    "modular_addition": DatasetInfo(97 * 97, 97 * 97, (4,), 99),  # the test set: the pairs not trained on
    "reversal": DatasetInfo(4000, 1000, (12,), 11),
}
FOLDERS = {"cifar10": "cifar-10-batches-py (data_batch_1..5, test_batch)", "cifar100": "cifar-100-python (train, test)",
           "svhn": "train_32x32.mat and test_32x32.mat"}  # what data_root holds, per image dataset


@dataclass(frozen=True)
class Split:
    """Inputs `x` (N, *input_shape) and integer labels `y` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Split":
        return Split(self.x.to(device=device, dtype=dtype or self.x.dtype), self.y.to(device))

    def batch(self, size: int, generator: torch.Generator) -> "Split":
        """A random batch of `size` examples without replacement (the whole split if smaller)."""
        if size >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator)[:size].to(self.y.device)
        return Split(self.x[idx], self.y[idx])

    def batches(self, size: int):
        """The split in order, in batches of at most `size`."""
        for start in range(0, len(self), size):
            yield Split(self.x[start:start + size], self.y[start:start + size])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device, dtype=None) -> "Dataset":
        return Dataset(self.name, self.train.to(device, dtype), self.test.to(device, dtype), self.n_classes)


def info(name: str, data_root: str | os.PathLike | None = None) -> DatasetInfo:
    """The facts of a registered dataset, or of a plugged-in one (loaded to know them)."""
    if name in DATASETS:
        return DATASETS[name]
    if not is_import_path(name):
        raise SpecError("dataset", f"{name!r} is not one of {', '.join(DATASETS)}, nor an import path module:function")
    ds = load_plugged(name, None if data_root is None else str(data_root))
    return DatasetInfo(len(ds.train), len(ds.test), ds.input_shape, ds.n_classes)


def load(name: str, *, data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
         train_fraction: float = 1.0, label_noise: float = 0.0, dtype: torch.dtype = torch.float32) -> Dataset:
    """Load `name`, then keep a seeded `train_fraction` of the training set and replace a seeded
    `label_noise` fraction of its labels by uniformly random ones."""
    if name == "mnist1d":
        full = _mnist1d(cache_dir)
    elif name in sequences.GENERATED:
        return _generated(name, train_fraction, label_noise, dtype)
    elif is_import_path(name):
        full = load_plugged(name, None if data_root is None else str(data_root))
    elif name in READERS:
        if data_root is None:
            raise SpecError("data_root", f"{name} needs data_root: a folder holding {FOLDERS[name]} or those "
                            "files themselves")
        full = READERS[name](data_root)
    else:
        raise SpecError("dataset", f"{name!r} is not one of {', '.join(DATASETS)}, nor an import path module:function")
    train = subset(full.train, train_fraction, stable_seed("subset", name, train_fraction))
    train = noisy_labels(train, label_noise, full.n_classes, stable_seed("labels", name, train_fraction, label_noise))
    return Dataset(name, train.to("cpu", dtype), full.test.to("cpu", dtype), full.n_classes)


def _generated(name: str, train_fraction: float, label_noise: float, dtype: torch.dtype) -> Dataset:
    """A token dataset of `data.sequences`; one without a test set of its own is tested on the examples
    its `train_fraction` leaves out (so the fraction must be below 1)."""
    train, test, n_classes = sequences.GENERATED[name]()
    train, seed = Split(*train), stable_seed("subset", name, train_fraction)
    if label_noise > 0:
        raise SpecError("label_noises", f"{name} takes no label noise (its labels are tokens), got {label_noise}")
    if test is None:
        if train_fraction >= 1.0:
            raise SpecError("train_fractions", f"{name} is tested on the examples not trained on: a train_fraction "
                                               "below 1 is needed")
        test = held_out(train, train_fraction, seed)
    else:
        test = Split(*test)
    return Dataset(name, subset(train, train_fraction, seed).to("cpu", dtype), test.to("cpu", dtype), n_classes)


def held_out(split: Split, fraction: float, seed: int) -> Split:
    """The examples `subset(split, fraction, seed)` leaves out, in their order."""
    keep = torch.zeros(len(split), dtype=torch.bool)
    keep[torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:_kept(split, fraction)]] = True
    return Split(split.x[~keep], split.y[~keep])


def _kept(split: Split, fraction: float) -> int:
    return max(1, int(round(fraction * len(split))))


def subset(split: Split, fraction: float, seed: int) -> Split:
    """A seeded random subset holding round(fraction * N) examples (the split itself if fraction is 1)."""
    if fraction >= 1.0:
        return split
    n = _kept(split, fraction)
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Split(split.x[idx], split.y[idx])


def noisy_labels(split: Split, fraction: float, n_classes: int, seed: int) -> Split:
    """Replace the labels of a seeded `fraction` of the examples by uniform random classes."""
    if fraction <= 0.0:
        return split
    g = torch.Generator().manual_seed(seed)
    n = int(round(fraction * len(split)))
    idx = torch.randperm(len(split), generator=g)[:n]
    y = split.y.clone()
    y[idx] = torch.randint(0, n_classes, (n,), generator=g)
    return Split(split.x, y)


def mixup(x: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Mixup inputs: lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha), perm a random permutation.

    Feed the same returned batch to every model being compared.
    """
    if not alpha > 0:
        raise SpecError("mixup_alpha", f"must be > 0, got {alpha}")
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1.0 - lam) * x[perm]


# ----------------------------------------------------------------------------- MNIST-1D
@functools.lru_cache(maxsize=1)
def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The MNIST-1D arrays of the package's default arguments (generated once per process)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


def _mnist1d(cache_dir) -> Dataset:
    """MNIST-1D with the package's default arguments, cached as a .npz (no pickle) in `cache_dir`."""
    cache = Path(cache_dir) / "mnist1d_default.npz" if cache_dir is not None else None
    arrays = None
    if cache is not None and cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            cache.replace(cache.with_suffix(".corrupt"))
            arrays = None
    if arrays is None:
        arrays = _generate_mnist1d()
        if cache is not None:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write_bytes(cache, buf.getvalue())
    x = torch.as_tensor(arrays["x"], dtype=torch.float64)
    xt = torch.as_tensor(arrays["x_test"], dtype=torch.float64)
    mean, std = x.mean(), x.std()
    return Dataset("mnist1d", Split((x - mean) / std, torch.as_tensor(arrays["y"], dtype=torch.long)),
                   Split((xt - mean) / std, torch.as_tensor(arrays["y_test"], dtype=torch.long)), 10)


# ----------------------------------------------------------------------------- CIFAR-10, CIFAR-100
def _read_cifar_batch(path: Path, label_key: str = "labels", n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, 3, 32, 32) uint8, labels (N,)) of one CIFAR python batch file."""
    kind = "CIFAR-10" if n_classes == 10 else "CIFAR-100"
    try:
        with open(path, "rb") as f:
            d = load_allowed(f, NUMPY_ARRAY_GLOBALS)
    except Exception as exc:  # any unpickling failure, refused global included, means a malformed file
        raise SpecError("data_root", f"{path} is not a {kind} python batch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise SpecError("data_root", f"{path} is not a {kind} python batch file (no dict inside)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get(label_key)
    if data is None or labels is None:
        raise SpecError("data_root", f"{path} lacks the 'data' and '{label_key}' entries of a {kind} batch")
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data, np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if raw.size != len(labels) * 3072:
        raise SpecError("data_root", f"{path}: {raw.size} bytes of pixels for {len(labels)} labels (expected 3072 each)")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise SpecError("data_root", f"{path}: labels outside 0..{n_classes - 1}")
    return raw.reshape(len(labels), 3, 32, 32), labels


CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)


def _folder(root: str | os.PathLike, inner: str, files: tuple[str, ...], what: str) -> Path:
    """`root/inner` if it is a folder, else `root`; it must hold `files`."""
    root = Path(root)
    folder = root / inner if (root / inner).is_dir() else root
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise SpecError("data_root", f"{folder} must hold {what} ({', '.join(files)}); missing: {', '.join(missing)}")
    return folder


def _normalised(pixels: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 images (N, 3, H, W) as float32 in [0, 1], minus the channel mean, over the channel std."""
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (torch.from_numpy(pixels.astype(np.float32) / 255.0) - m) / sd


def read_cifar10(root: str | os.PathLike) -> Dataset:
    """Read CIFAR-10 from `root` or `root/cifar-10-batches-py`, normalised per channel."""
    folder = _folder(root, "cifar-10-batches-py", CIFAR_TRAIN_FILES + CIFAR_TEST_FILES, "the CIFAR-10 python batches")
    parts = [_read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(folder / "test_batch")
    return Dataset("cifar10", Split(_normalised(xtr, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(ytr)),
                   Split(_normalised(xte, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(yte)), 10)


def read_cifar100(root: str | os.PathLike) -> Dataset:
    """Read CIFAR-100 (its 100 fine labels) from `root` or `root/cifar-100-python`, normalised per channel."""
    folder = _folder(root, "cifar-100-python", ("train", "test"), "the CIFAR-100 python files")
    (xtr, ytr), (xte, yte) = (_read_cifar_batch(folder / f, "fine_labels", 100) for f in ("train", "test"))
    return Dataset("cifar100", Split(_normalised(xtr, CIFAR100_MEAN, CIFAR100_STD), torch.from_numpy(ytr)),
                   Split(_normalised(xte, CIFAR100_MEAN, CIFAR100_STD), torch.from_numpy(yte)), 100)


# ----------------------------------------------------------------------------- SVHN
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _read_svhn_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, 3, 32, 32) uint8, labels (N,) in 0..9) of one SVHN .mat file (label 10 is the digit 0)."""
    from scipy.io import loadmat

    try:
        d = loadmat(path)
    except Exception as exc:  # scipy raises several types for a file that is not a MATLAB file
        raise SpecError("data_root", f"{path} is not an SVHN .mat file ({type(exc).__name__}: {exc})") from None
    x, y = d.get("X"), d.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise SpecError("data_root", f"{path} lacks the 'X' and 'y' arrays of an SVHN file")
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise SpecError("data_root", f"{path}: X of shape {x.shape} and y of {y.shape}; expected (32, 32, 3, N) "
                                     "and N labels")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise SpecError("data_root", f"{path}: labels outside 1..10")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), labels % 10


def read_svhn(root: str | os.PathLike) -> Dataset:
    """Read SVHN (cropped digits; the training set without `extra`) from `root` or `root/svhn`."""
    folder = _folder(root, "svhn", SVHN_FILES, "the SVHN cropped-digit files")
    (xtr, ytr), (xte, yte) = (_read_svhn_file(folder / f) for f in SVHN_FILES)
    return Dataset("svhn", Split(_normalised(xtr, SVHN_MEAN, SVHN_STD), torch.from_numpy(ytr)),
                   Split(_normalised(xte, SVHN_MEAN, SVHN_STD), torch.from_numpy(yte)), 10)


READERS = {"cifar10": read_cifar10, "cifar100": read_cifar100, "svhn": read_svhn}


# ----------------------------------------------------------------------------- plugged-in datasets
def _tensors(path: str, part: str, split) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one split a loader returned: a pair of tensors or arrays, or a torch Dataset of (x, y) items."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__") and not isinstance(split, (str, bytes)):
        try:
            items = [split[i] for i in range(len(split))]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])
            y = torch.as_tensor([int(item[1]) for item in items])
        except Exception as exc:  # the Dataset is the user's code
            raise SpecError("dataset", f"{path}: the {part} Dataset's items are not (x, label) pairs "
                                       f"({type(exc).__name__}: {exc})") from None
    else:
        raise SpecError("dataset", f"{path}: the {part} split is a {type(split).__name__}; expected (x, y) or a "
                                   "torch Dataset of (x, label) items")
    try:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
    except Exception as exc:  # e.g. ragged lists
        raise SpecError("dataset", f"{path}: the {part} split is not tensors ({type(exc).__name__}: {exc})") from None
    return x, y


def _checked_split(path: str, part: str, split, n_classes: int) -> Split:
    x, y = _tensors(path, part, split)
    if not x.is_floating_point():
        raise SpecError("dataset", f"{path}: {part} inputs are {x.dtype}; expected floating point (scale and "
                                   "normalise them in the loader)")
    if x.dim() < 2 or len(x) == 0:
        raise SpecError("dataset", f"{path}: {part} inputs of shape {tuple(x.shape)}; expected (N, *input_shape) "
                                   "with N >= 1")
    if y.dim() != 1 or len(y) != len(x):
        raise SpecError("dataset", f"{path}: {part} labels of shape {tuple(y.shape)} for {len(x)} inputs; expected "
                                   f"({len(x)},)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise SpecError("dataset", f"{path}: {part} labels are {y.dtype}; expected integer classes")
    if y.min() < 0 or y.max() >= n_classes:
        raise SpecError("dataset", f"{path}: {part} labels span {int(y.min())}..{int(y.max())}; expected "
                                   f"0..{n_classes - 1}")
    if not torch.isfinite(x).all():
        raise SpecError("dataset", f"{path}: {part} inputs hold NaN or infinite values")
    return Split(x.detach().cpu(), y.detach().cpu().long())


@functools.lru_cache(maxsize=2)
def load_plugged(path: str, data_root: str | None = None) -> Dataset:
    """The dataset a user's loader returns, checked.

    `path` ("module:function") names a loader called as `function(data_root)` (or `function()` if
    it takes no argument) that returns `(train, test, n_classes)`: each split a pair `(x, y)` of
    tensors or arrays (x floating point of shape (N, *input_shape), y integer classes in
    0..n_classes - 1, of shape (N,)) or a torch Dataset of `(x, label)` items; the two splits share
    the input shape. Loaded once per process for each (path, data_root).
    """
    loader = load_object("dataset", path)
    try:
        takes_root = bool(inspect.signature(loader).parameters)
    except (TypeError, ValueError):
        takes_root = True
    returned = call("dataset", f"{path}({data_root!r})", loader, *([data_root] if takes_root else []))
    if not isinstance(returned, (tuple, list)) or len(returned) != 3:
        raise SpecError("dataset", f"{path} returned a {type(returned).__name__}; expected (train, test, n_classes)")
    train, test, n_classes = returned
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise SpecError("dataset", f"{path}: n_classes is {n_classes!r}; expected an integer >= 2")
    n_classes = int(n_classes)
    tr, te = _checked_split(path, "train", train, n_classes), _checked_split(path, "test", test, n_classes)
    if tr.x.shape[1:] != te.x.shape[1:]:
        raise SpecError("dataset", f"{path}: train inputs of shape {tuple(tr.x.shape[1:])} but test inputs of "
                                   f"{tuple(te.x.shape[1:])}")
    return Dataset(path, tr, te, n_classes)
