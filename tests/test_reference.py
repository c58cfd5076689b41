"""The importer of the reference study's published results, on the real archive, and its safety."""

from __future__ import annotations

import io
import itertools
import pickle
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from phasediagram.analysis import phases, plots, reference, table

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "taxonomy_results" / "results.tar.gz"
TREE = "different_knobs_subset_10/bs_{bs}/lr_decay/ResNet18_w{w}/metrics"
WIDTHS = (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128)
BATCH_SIZES = (16, 19, 24, 27, 32, 44, 64, 92, 128, 180, 256, 364, 512, 724, 1024)

pytestmark = pytest.mark.skipif(not ARCHIVE.exists(), reason=f"reference archive not found at {ARCHIVE}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="module")
def imported(tree):
    return reference.import_tree(tree)


@pytest.fixture(scope="module")
def classified(imported):
    return phases.classify(imported)


def cell_mean(df, bs, w, metric, split):
    sel = df[(df.batch_size == bs) & (df.width == w) & (df.metric == metric) & (df.split == split)
             & (df.status == "ok") & df.coord.isna()]
    return sel.value.mean()


def test_every_cell_and_quantity_is_imported(imported):
    assert set(imported.width) == set(WIDTHS) and set(imported.batch_size) == set(BATCH_SIZES)
    assert imported.cell.nunique() == 210 and (imported.experiment == "reference").all()
    assert set(imported.lr) == {0.1} and set(imported.weight_decay) == {5e-4}
    scalar = imported[imported.coord.isna() & (imported.status == "ok")]
    counts = scalar.groupby(["source", "split", "metric"]).size().to_dict()
    assert counts == {("loss_acc", "train", "loss"): 1050, ("loss_acc", "train", "acc"): 1050,
                      ("loss_acc", "test", "loss"): 910, ("loss_acc", "test", "acc"): 910,
                      ("hessian", "train", "top_abs_eigenvalue"): 1050, ("hessian", "train", "trace"): 1050,
                      ("dist", "-", "dist"): 2100, ("CKA", "train", "cka_logits"): 2100,
                      ("CKA", "train", "cka_softmax"): 2100, ("curve", "train", "mc"): 210}
    pairs = imported[imported.source == "dist"]
    assert (pairs.seed < pairs.seed_b).all() and pairs.groupby("cell").size().eq(10).all()
    # bs 19 and 27 were published without loss_acc_test.pkl: rows marked missing, cells blank
    missing = imported[imported.status == "missing"]
    assert set(missing.batch_size) == {19, 27} and set(missing.split) == {"test"} and missing.value.isna().all()
    grid = plots.cell_grid(imported, plots.CORE[0], list(WIDTHS), list(BATCH_SIZES), "width", "batch_size")
    assert grid.loc[[19, 27]].isna().all().all() and grid.drop([19, 27]).notna().all().all()


@pytest.mark.parametrize("bs,w", [(16, 1), (128, 16), (1024, 128), (44, 64)])
def test_cell_means_equal_the_files(tree, imported, bs, w):
    folder = tree / TREE.format(bs=bs, w=w)
    train = reference.load_pickle(folder / "loss_acc.pkl")
    test = reference.load_pickle(folder / "loss_acc_test.pkl")
    hess = reference.load_pickle(folder / "hessian.pkl")
    dist = reference.load_pickle(folder / "model_dist.pkl")["model_distance"]
    cka = reference.load_pickle(folder / reference.CKA_FILE)["representation_similarity"]
    seeds = range(5)
    off = [(i, j) for i, j in itertools.product(seeds, seeds) if i != j]  # the reference notebook's pairs
    expected = {
        ("loss", "train"): np.mean([train[s]["loss"] for s in seeds]),
        ("acc", "train"): np.mean([train[s]["accuracy"] for s in seeds]),
        ("acc", "test"): np.mean([test[s]["accuracy"] for s in seeds]),
        ("loss", "test"): np.mean([test[s]["loss"] for s in seeds]),
        ("top_abs_eigenvalue", "train"): np.mean([hess[s]["top_eigenvalue"][0] for s in seeds]),
        ("trace", "train"): np.mean([hess[s]["trace"] for s in seeds]),
        ("dist", "-"): np.mean([dist[i][j]["dist"] for i, j in off]),
        ("cka_logits", "train"): np.mean([cka[i][j][0] for i, j in off]),
        ("cka_softmax", "train"): np.mean([cka[i][j][-1] for i, j in off]),
    }
    with np.load(folder / "curve_test.npz", allow_pickle=False) as z:
        e = z["tr_err"]
        u = np.argmax(np.abs(e - (e[0] + e[4]) / 2))
        expected[("mc", "train")] = (e[0] + e[4]) / 2 - e[u]
        ts, te_err = z["ts"].copy(), z["te_err"].copy()
    for (metric, split), value in expected.items():
        assert cell_mean(imported, bs, w, metric, split) == pytest.approx(value, rel=1e-6), (metric, split)
    curve = imported[(imported.batch_size == bs) & (imported.width == w) & (imported.metric == "err")
                     & (imported.split == "test")].sort_values("coord")
    assert np.allclose(curve.coord, ts) and np.allclose(curve.value, te_err)


def test_the_reference_structure(imported):
    acc = table.cell_means(imported, "acc", "test")
    best_bs, best_w = acc.stack().idxmax()
    assert best_w >= 64 and 32 <= best_bs <= 128  # the best model: wide, moderately small batch
    assert acc.loc[:, 128].mean() > acc.loc[:, 1].mean() + 25
    mc = table.cell_means(imported, "mc", "train")
    assert (mc.loc[:, [1, 2]] < -5).all().all()  # strongly poorly connected at the smallest widths
    assert (mc.loc[64:, 128].abs() < 0.1).all()  # well connected when wide and cold
    assert (mc.loc[16, 8:] > 1).all()  # hot: the endpoints are not minima
    loss = table.cell_means(imported, "loss", "train")
    assert (loss.loc[:, 1] > 1).all() and (loss.loc[64:, 128] < 0.01).all()


def test_the_phase_partition_on_the_archive(classified, imported):
    grid = classified.pivot(index="batch_size", columns="width", values="phase")
    assert phases.counts(classified) == {"I": 63, "II": 46, "III": 34, "IV-A": 41, "IV-B": 26}
    assert (classified.note == "").all()
    assert set(grid[1]) == set(grid[2]) == {"I"}  # narrow: poorly connected and sharp at every temperature
    assert set(grid.loc[16, 16:]) == {"II"} and set(grid.loc[24, 8:]) == {"II"}  # small batch: II
    assert set(grid.loc[512:, 4:11].stack()) == {"III"}  # medium width, large batch: poorly connected, flat
    assert set(grid.loc[512:, 23:].stack()) == {"IV-A"}  # wide and cold: well connected, dissimilar
    assert set(grid.loc[64:180, 45:].stack()) == {"IV-B"}  # wide, moderate batch: similar
    acc = table.cell_means(imported, "acc", "test")
    assert grid.loc[acc.stack().idxmax()] == "IV-B"  # the best test accuracy lies in IV-B
    mean_acc = {p: acc.stack()[grid.stack().reindex(acc.stack().index) == p].mean() for p in phases.PHASES}
    assert max(mean_acc, key=mean_acc.get) == "IV-B" and min(mean_acc, key=mean_acc.get) == "I"
    width_of = classified.groupby("phase").width.median()
    assert width_of["I"] < width_of["III"] < width_of["IV-A"]


def test_the_figure_from_the_archive(imported, tmp_path):
    res = plots.phase_figure(imported)
    paths = plots.save_figure(res, tmp_path / "reference.png", formats=("png",), dpi=60)
    assert res.titles[:8] == ["(a) test accuracy (%)", "(b) log10 training loss",
                              "(c) log10 largest-magnitude Hessian eigenvalue", "(d) log10 Hessian trace (Hutchinson)",
                              "(e) mode connectivity (error %)", "(f) CKA similarity",
                              "(g) L2 distance between seeds", "(h) phases"]
    assert res.notes == [] and paths[0].stat().st_size > 50_000


# ----------------------------------------------------------------------------- safety
class _Touch:
    """Unpickling this would create `path` (Path.touch): the loader must refuse before calling it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


class _Print:
    def __reduce__(self):
        return print, ("unpickled and ran print",)


def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "hessian.pkl"
    bad.write_bytes(pickle.dumps({0: {"trace": _Touch(marker)}}))
    with pytest.raises(reference.UnsafePickleError, match=r"refusing to unpickle .*hessian\.pkl.*pathlib"):
        reference.load_pickle(bad)
    assert not marker.exists()
    bad.write_bytes(pickle.dumps([_Print()], protocol=0))
    with pytest.raises(reference.UnsafePickleError, match=r"__builtin__\.print"):
        reference.load_pickle(bad)
    assert "unpickled" not in capsys.readouterr().out
    bad.write_bytes(pickle.dumps(np.arange(3)))  # arrays are not plain values of a metric file
    with pytest.raises(reference.UnsafePickleError, match="_reconstruct"):
        reference.load_pickle(bad)
    bad.write_bytes(pickle.dumps(np.dtype("f8")))  # an allowed global, but not a plain value
    with pytest.raises(reference.UnsafePickleError, match="unexpected object of type"):
        reference.load_pickle(bad)


def test_a_malicious_pickle_inside_a_cell_folder_stops_the_import(tree, tmp_path):
    marker = tmp_path / "pwned"
    cell = tmp_path / "root" / TREE.format(bs=64, w=8)
    cell.mkdir(parents=True)
    for f in (tree / TREE.format(bs=64, w=8)).iterdir():
        (cell / f.name).write_bytes(f.read_bytes())
    (cell / "model_dist.pkl").write_bytes(pickle.dumps({"model_distance": _Touch(marker)}))
    with pytest.raises(reference.UnsafePickleError):
        reference.import_tree(tmp_path / "root")
    assert not marker.exists()
    assert reference.main([str(tmp_path / "root"), "--out", str(tmp_path / "t.csv")]) == 2
    assert not marker.exists() and not (tmp_path / "t.csv").exists()


def test_unexpected_content_and_duplicate_cells_are_reported(tree, tmp_path):
    cell = tmp_path / "a" / TREE.format(bs=64, w=8)
    cell.mkdir(parents=True)
    (cell / "hessian.pkl").write_bytes(pickle.dumps({0: {"top": 1.0}}))
    with pytest.raises(ValueError, match="unexpected content"):
        reference.import_tree(tmp_path / "a")
    (cell / "hessian.pkl").unlink()
    twin = tmp_path / "a" / "another" / "bs_64" / "x" / "ResNet18_w8" / "metrics"
    twin.mkdir(parents=True)
    with pytest.raises(ValueError, match="two result folders for batch size 64 and width 8"):
        reference.import_tree(tmp_path / "a")


def test_numpy_scalars_become_plain_numbers(tmp_path):
    f = tmp_path / "h.pkl"
    f.write_bytes(pickle.dumps({0: {"top_eigenvalue": [np.float32(2.5)], "trace": np.float64(1.5)}}))
    value = reference.load_pickle(f)
    assert value == {0: {"top_eigenvalue": [2.5], "trace": 1.5}}
    assert type(value[0]["trace"]) is float and type(value[0]["top_eigenvalue"][0]) is float


def test_an_object_array_in_a_curve_file_is_refused(tree, tmp_path):
    cell = tmp_path / TREE.format(bs=64, w=8)
    cell.mkdir(parents=True)
    np.savez(cell / "curve_test.npz", ts=np.linspace(0, 1, 5), tr_err=np.array([1, 2, 3, 2, 1], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        reference.import_tree(tmp_path)


def test_mode_connectivity_definition():
    assert reference.mode_connectivity([10, 30, 10]) == -20  # a barrier
    assert reference.mode_connectivity([10, 4, 10]) == 6  # below the endpoints
    assert reference.mode_connectivity([10, 11, 10]) == -1
    # t* ranges over the endpoints too (as in the reference notebook): on a monotone curve the
    # first endpoint is the argmax and mc is half the endpoints' difference
    assert reference.mode_connectivity([10, 11, 12]) == 1
    assert reference.mode_connectivity([2, 2.5, 8]) == pytest.approx(3.0)


def test_archive_import_and_command_line(tree, tmp_path):
    small = tmp_path / "small.tar.gz"
    with tarfile.open(small, "w:gz") as tar:
        for bs, w in ((64, 8), (64, 16), (256, 8), (256, 16)):
            tar.add(tree / TREE.format(bs=bs, w=w), arcname=TREE.format(bs=bs, w=w))
    df = reference.import_path(small)
    assert df.cell.nunique() == 4 and set(df.width) == {8, 16}
    out = tmp_path / "out.csv"
    assert reference.main([str(small), "--out", str(out), "--experiment", "ref"]) == 0
    back = table.read(out, "ref")
    assert len(back[back.source == "phase"]) == 4
    assert len(back) == len(df) + 4


def test_an_archive_leading_outside_is_refused(tmp_path):
    evil = tmp_path / "evil.tar"
    name = f"outside-{tmp_path.name}.txt"
    with tarfile.open(evil, "w") as tar:
        data = b"x"
        info = tarfile.TarInfo(f"../{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tarfile.FilterError):
        reference.import_path(evil)
    assert not (Path(tempfile.gettempdir()) / name).exists()
    with pytest.raises(FileNotFoundError, match="no reference result folders"):
        reference.import_tree(tmp_path)
