"""Every result row belongs to the checkpoint now on disk.

A result file records the digest of each checkpoint its rows were computed from; a result whose
checkpoint changed since is redone by its stage and left out of the table until then.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from phasediagram.analysis import table
from phasediagram.execution.jobs import Job, dataset_for, run_job, stage_jobs
from phasediagram.metrics.base import evaluate
from phasediagram.storage import checkpoints, results
from phasediagram.storage.layout import Layout
from phasediagram.training import train

from .conftest import tiny_spec


def test_digest_is_the_payloads_sha256(tmp_path):
    path = tmp_path / "c.pt"
    checkpoints.save(path, {"model": {"w": torch.ones(3)}, "model_args": {}, "cell": {}, "seed": 0, "epoch": 1,
                            "status": "ok"})
    blob = path.read_bytes()
    assert checkpoints.digest(path) == hashlib.sha256(blob[len(checkpoints.MAGIC) + 32:]).hexdigest()
    assert checkpoints.digest(tmp_path / "missing.pt") is None
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint at all, but long enough to hold a header......")
    assert checkpoints.digest(tmp_path / "other.pt") is None
    assert checkpoints.digest(tmp_path) is None


def replace_model(path, scale: float) -> None:
    """Write a valid checkpoint at `path` whose weights differ: what a redone run of another model leaves."""
    ckpt = checkpoints.load(path)
    ckpt["model"] = {k: v * scale if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    checkpoints.save(path, ckpt)


def test_results_follow_the_checkpoint_on_disk(tiny):
    spec, layout = tiny
    cell = spec.cells()[0]
    for stage in ("train", *spec.metrics):
        assert run_job(spec, layout, Job(stage, cell)) == "done"
    doc = results.read(layout.result_path("loss_acc", cell))
    assert doc["checkpoints"] == {layout.checkpoint(cell, s, "final").relative_to(layout.exp_dir).as_posix():
                                  checkpoints.digest(layout.checkpoint(cell, s, "final")) for s in spec.seeds}
    assert all(run_job(spec, layout, Job(stage, cell)) == "skipped" for stage in ("train", *spec.metrics))

    replace_model(layout.checkpoint(cell, 1, "final"), 0.5)
    logs: list = []
    df = table.collect(layout, spec.name, log=logs.append)
    assert not (df.cell == cell.id).any()  # every stage of that cell read seed 1's old checkpoint
    assert sum("changed since" in line for line in logs) == 1 + len(spec.metrics)
    for stage in ("train", *spec.metrics):
        assert run_job(spec, layout, Job(stage, cell)) == "done"  # redone: the train rows, then the metrics
    rows = results.read(layout.result_path("loss_acc", cell))["rows"]
    model, _ = train.load_model(layout.checkpoint(cell, 1, "final"))
    expected = evaluate(model, dataset_for(spec, cell, layout).train)[0]
    got = next(r["value"] for r in rows if r["seed"] == 1 and r["split"] == "train" and r["metric"] == "loss")
    assert got == pytest.approx(expected, rel=1e-6)
    assert (table.collect(layout, spec.name).cell == cell.id).any()


def test_metrics_on_the_best_checkpoint_follow_it(root):
    spec = tiny_spec(metric_checkpoint="best", metrics=("loss_acc",))
    layout = Layout(root, spec.name)
    cell = spec.cells()[0]
    assert run_job(spec, layout, Job("train", cell)) == "done"
    assert run_job(spec, layout, Job("loss_acc", cell)) == "done"
    replace_model(layout.checkpoint(cell, 0, "best"), 2.0)
    assert run_job(spec, layout, Job("train", cell)) == "skipped"  # the train rows come from final.pt
    assert run_job(spec, layout, Job("loss_acc", cell)) == "done"


def test_every_stage_is_done_once_on_an_untouched_study(tiny):
    spec, layout = tiny
    for stage in ("train", *spec.metrics):
        for job in stage_jobs(spec, stage):
            assert run_job(spec, layout, job) == "done"
    for stage in ("train", *spec.metrics):
        assert all(run_job(spec, layout, job) == "skipped" for job in stage_jobs(spec, stage))
