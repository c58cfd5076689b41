"""Resume reproduces the uninterrupted training bit for bit, whatever was interrupted or corrupted.

A cell's seeds trained as one ensemble step as one model, so a member's rounding depends on the
ensemble it was in (tested below: the same seeds trained apart differ in float32). The faults are
placed deliberately: a kill between two members' `last.pt` writes, between moving `last.pt` to
`prev.pt` and writing the new one, a corrupt `last.pt`, a corrupt `final.pt` after the cell
finished, and a kill after one member diverged. Reference: the same cell trained without
interruption in another folder. Equality: every tensor of `final.pt` and `best.pt`, `torch.equal`,
in float32.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from phasediagram.data.datasets import Dataset, Split
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout
from phasediagram.training import ensemble, train

SEEDS = (0, 1, 2)
EPOCHS = 4
QUIET = {"log": lambda *_: None}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def make_dataset(n: int = 192) -> Dataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n + 64, 40, generator=g)
    y = (x @ torch.randn(40, 10, generator=g)).argmax(1)
    return Dataset("mnist1d", Split(x[:n], y[:n]), Split(x[n:], y[n:]), 10)


def make_spec(arch: str, ensemble_mode: str = "on") -> ExperimentSpec:
    return ExperimentSpec(name="t", arch=arch, widths=(4 if arch == "resnet1d" else 8,), batch_sizes=(32,),
                          lrs=(0.1,), seeds=SEEDS, epochs=EPOCHS, dtype="float32", metrics=(),
                          ensemble=ensemble_mode)


class Killed(Exception):
    pass


def kill_at(seed: int, epoch: int, trained: list | None = None):
    """on_epoch callback: record (seed, epoch) and raise Killed once `seed` has written `epoch`."""

    def on_epoch(cell, s, e):
        if trained is not None:
            trained.append((s, e))
        if (s, e) == (seed, epoch):
            raise Killed

    return on_epoch


def same_checkpoints(a: Layout, b: Layout, cell, seeds=SEEDS) -> bool:
    for seed in seeds:
        for kind in ("final", "best"):
            ca, cb = checkpoints.load(a.checkpoint(cell, seed, kind)), checkpoints.load(b.checkpoint(cell, seed, kind))
            if ca["status"] != cb["status"] or ca["epoch"] != cb["epoch"] or ca["history"] != cb["history"]:
                return False
            if any(not torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"]):
                return False
    return True


def no_training_states(layout: Layout, cell) -> bool:
    return not any(layout.checkpoint(cell, s, kind).exists() for s in SEEDS for kind in train.RESUMABLE)


@pytest.fixture(params=["resnet1d", "mlp"])
def setup(request, tmp_path):
    spec = make_spec(request.param)
    cell = spec.cells()[0]
    data = make_dataset()
    ref = Layout(tmp_path / "ref", "t")
    assert ensemble.train_cell_auto(spec, cell, ref, data, **QUIET) == {s: "ok" for s in SEEDS}
    return spec, cell, data, ref, Layout(tmp_path / "run", "t")


def test_members_trained_apart_differ_in_float32(tmp_path):
    """Why a group must resume as the group it was: seeds trained one per ensemble end elsewhere."""
    spec, data = make_spec("resnet1d"), make_dataset()
    cell = spec.cells()[0]
    together, apart = Layout(tmp_path / "together", "t"), Layout(tmp_path / "apart", "t")
    ensemble.train_cell_auto(spec, cell, together, data, **QUIET)
    for seed in SEEDS:
        ensemble.train_members(spec, cell, [seed], apart, data, **QUIET)
    assert not same_checkpoints(together, apart, cell)


def test_kill_between_members_writes(setup):
    """Seed 0 wrote epoch 2, seeds 1 and 2 did not: seed 0 goes back to its prev.pt (epoch 1), the
    group retrains epoch 2 once more for seed 0 only, and ends as the uninterrupted run."""
    spec, cell, data, ref, run = setup
    trained: list = []
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(0, 2, trained), **QUIET)
    assert [checkpoints.load(run.checkpoint(cell, s, "last"))["epoch"] for s in SEEDS] == [2, 1, 1]
    assert ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(-1, -1, trained), **QUIET) == {
        s: "ok" for s in SEEDS}
    assert same_checkpoints(run, ref, cell)
    assert no_training_states(run, cell)
    expected = sorted([(s, e) for s in SEEDS for e in range(1, EPOCHS + 1)] + [(0, 2)])
    assert sorted(trained) == expected  # only seed 0's epoch 2 twice


def test_kill_between_moving_last_to_prev_and_writing_last(setup):
    """Seed 1 had moved its last.pt (epoch 1) to prev.pt when the kill came: it resumes from prev.pt."""
    spec, cell, data, ref, run = setup
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(0, 2), **QUIET)
    run.checkpoint(cell, 1, "last").replace(run.checkpoint(cell, 1, "prev"))
    ensemble.train_cell_auto(spec, cell, run, data, **QUIET)
    assert same_checkpoints(run, ref, cell)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_last_of_one_member(setup, damage):
    """All members at epoch 3, seed 2's last.pt damaged: the group goes back to epoch 2 (prev.pt)."""
    spec, cell, data, ref, run = setup
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(2, 3), **QUIET)
    path = run.checkpoint(cell, 2, "last")
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        del blob[len(blob) // 2:]
    else:
        blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    logs: list = []
    ensemble.train_cell_auto(spec, cell, run, data, log=logs.append)
    assert any("moved aside" in line for line in logs)
    assert same_checkpoints(run, ref, cell)


def test_corrupt_final_of_one_member_after_the_cell_finished(setup):
    """Seed 1's final.pt damaged after all three finished: seed 1 is retrained with its group, seeds 0
    and 2 replayed without writing (their files untouched), and seed 1 ends as it did."""
    spec, cell, data, ref, run = setup
    shutil.copytree(ref.exp_dir, run.exp_dir)
    others = {s: run.checkpoint(cell, s, "final").read_bytes() for s in (0, 2)}
    path = run.checkpoint(cell, 1, "final")
    path.write_bytes(path.read_bytes()[:-50])
    trained: list = []
    assert ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(-1, -1, trained), **QUIET) == {
        s: "ok" for s in SEEDS}
    assert same_checkpoints(run, ref, cell)
    assert all(run.checkpoint(cell, s, "final").read_bytes() == blob for s, blob in others.items())
    assert sorted(trained) == [(1, e) for e in range(1, EPOCHS + 1)]  # only seed 1 recorded its epochs again


def test_kill_after_a_member_diverged(tmp_path):
    """Seed 1 diverges at the first step of epoch 1 (a NaN put into its epoch-1 state in both folders);
    the run is killed after seed 0 wrote epoch 2: the resumed group replays seed 1 from its kept
    last.pt up to its divergence, so seeds 0 and 2 end as without the kill."""
    spec, data = make_spec("resnet1d"), make_dataset()
    cell = spec.cells()[0]
    ref, run = Layout(tmp_path / "ref", "t"), Layout(tmp_path / "run", "t")
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, ref, data, on_epoch=kill_at(2, 1), **QUIET)
    last = ref.checkpoint(cell, 1, "last")
    ckpt = checkpoints.load(last)
    ckpt["model"]["stem.0.weight"].view(-1)[0] = float("nan")
    checkpoints.save(last, ckpt)
    shutil.copytree(ref.exp_dir, run.exp_dir)
    assert ensemble.train_cell_auto(spec, cell, ref, data, **QUIET) == {0: "ok", 1: "diverged", 2: "ok"}
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(0, 2), **QUIET)
    assert run.checkpoint(cell, 1, "last").exists()  # kept: the group may need to replay seed 1
    assert ensemble.train_cell_auto(spec, cell, run, data, **QUIET) == {0: "ok", 1: "diverged", 2: "ok"}
    assert same_checkpoints(run, ref, cell, seeds=(0, 2))
    diverged = [checkpoints.load(layout.checkpoint(cell, 1, "final")) for layout in (run, ref)]
    assert diverged[0]["diverged_at"] == diverged[1]["diverged_at"] == {"epoch": 1, "step": 0}
    assert no_training_states(run, cell)


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_sequential_and_auto_resume_exactly(tmp_path, mode):
    """The same faults with seeds trained one by one (off) or in auto's groups: exact as well."""
    spec, data = make_spec("resnet1d", mode), make_dataset()
    cell = spec.cells()[0]
    ref, run = Layout(tmp_path / "ref", "t"), Layout(tmp_path / "run", "t")
    ensemble.train_cell_auto(spec, cell, ref, data, **QUIET)
    with pytest.raises(Killed):
        ensemble.train_cell_auto(spec, cell, run, data, on_epoch=kill_at(1, 2), **QUIET)
    path = run.checkpoint(cell, 1, "last")
    path.write_bytes(path.read_bytes()[:100])
    ensemble.train_cell_auto(spec, cell, run, data, **QUIET)
    run.checkpoint(cell, 0, "final").write_bytes(b"")
    ensemble.train_cell_auto(spec, cell, run, data, **QUIET)
    assert same_checkpoints(run, ref, cell)


OK, DIVERGED_AT_1 = {"status": "ok"}, {"status": "diverged", "diverged_at": {"epoch": 1, "step": 5}}


@pytest.mark.parametrize("finals, states, expected", [
    ({0: None, 1: None}, {0: {}, 1: {}}, 0),                                # fresh start
    ({0: None, 1: None}, {0: {2: 1, 3: 1}, 1: {1: 1, 2: 1}}, 2),            # a kill between the writes
    ({0: None, 1: None}, {0: {3: 1}, 1: {1: 1, 2: 1}}, 0),                  # no common epoch: from the start
    ({0: None, 1: OK}, {0: {2: 1, 3: 1}, 1: {}}, 0),                        # an ok run to replay, no state of it
    ({0: None, 1: OK}, {0: {4: 1}, 1: {}}, 4),                              # only the finishing left: no replay
    ({0: None, 1: DIVERGED_AT_1}, {0: {2: 1, 3: 1}, 1: {0: 1, 1: 1}}, 3),   # it diverged before epoch 3
    ({0: None, 1: DIVERGED_AT_1}, {0: {1: 1, 2: 1}, 1: {0: 1, 1: 1}}, 2),
    ({0: None, 1: DIVERGED_AT_1}, {0: {0: 1, 1: 1}, 1: {0: 1, 1: 1}}, 1),   # it trained in epoch 1: replayed
    ({0: None, 1: DIVERGED_AT_1}, {0: {1: 1}, 1: {0: 1}}, 0),               # ... but its epoch-1 state is lost
])
def test_resume_epoch(finals, states, expected):
    assert train.resume_epoch(make_spec("mlp"), finals, states) == expected


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_best_checkpoint_is_rebuilt(setup, damage):
    """best.pt is read only by metrics on the best checkpoint, so it is checked whenever a run's final
    checkpoint is: a damaged or missing one is moved aside and the run retrained to the same weights."""
    spec, cell, data, ref, run = setup
    shutil.copytree(ref.exp_dir, run.exp_dir)
    path = run.checkpoint(cell, 2, "best")
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:200])
    logs: list = []
    assert train.final_status(run, spec, cell, 2, log=logs.append) is None
    assert any("retrained to rebuild it" in line for line in logs)
    ensemble.train_cell_auto(spec, cell, run, data, **QUIET)
    assert same_checkpoints(run, ref, cell)
    assert train.final_status(run, spec, cell, 2, **QUIET) == "ok"


def test_the_table_of_an_interrupted_study_equals_the_uninterrupted_one(tmp_path, monkeypatch, mnist_cache):
    """Through the study: resnet1d seeds trained as one ensemble in float32, killed right after seed 0
    wrote epoch 2, rerun: every value of the table (loss, accuracy, distances) equals the uninterrupted
    study's exactly."""
    from phasediagram import InProcess, Study
    from phasediagram.resolve import check

    spec = check(ExperimentSpec(name="t", arch="resnet1d", widths=(4,), batch_sizes=(64,), lrs=(0.1,), seeds=SEEDS,
                                epochs=3, train_fractions=(0.1,), ensemble="on", metrics=("loss_acc", "dist")))
    tables = []
    for name, kill in (("ref", False), ("run", True)):
        root = tmp_path / name
        shutil.copytree(mnist_cache, root / "data")
        study = Study(spec, root)
        if kill:
            real = train.save_epoch

            def save_then_die(spec_, cell, seed, *args, **kwargs):
                real(spec_, cell, seed, *args, **kwargs)
                if seed == 0 and args[3].epoch == 2:
                    raise Killed

            monkeypatch.setattr(train, "save_epoch", save_then_die)
            assert len(study.run(executor=InProcess())["train"].failed) == 1  # the job died there
            monkeypatch.undo()
        assert all(not r.failed for r in study.run(executor=InProcess()).values())
        df = study.table()
        tables.append(df[["cell", "seed", "seed_b", "split", "metric", "value"]].reset_index(drop=True))
    assert len(tables[0]) > 20
    assert tables[0].equals(tables[1])
