"""The GPU path: the device reaching every executor, the pool's GPU pinning, bf16 autocast, determinism.

On a CPU-only torch the device plumbing is tested with the device check and the job runner replaced
by recorders (no CUDA call is made); the tests that need a GPU skip with their reason.
"""

from __future__ import annotations

import math
import runpy
from concurrent.futures import Future
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from phasediagram import cli
from phasediagram.errors import SpecError
from phasediagram.execution import cluster, executors, inprocess, jobs, local_pool, runtime, worker
from phasediagram.execution.scripts import SlurmOptions, bash_script, slurm_script
from phasediagram.methods.sgd import SGD
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.spec.presets import PRESET_SPECS
from phasediagram.storage.layout import Layout
from phasediagram.training import ensemble, train

from .conftest import tiny_spec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this torch has no usable GPU)")
BASE = ["--name", "dev", "--arch", "mlp", "--widths", "4", "--batch-sizes", "256", "--seeds", "0", "1", "--epochs", "1",
        "--train-fractions", "0.25", "--metrics", "train"]


def data_root(root: Path, mnist_cache: Path) -> Path:
    """`root`, made, with the session's MNIST-1D cache as its data folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").symlink_to(mnist_cache)
    return root


def write_spec(spec: ExperimentSpec, root: Path) -> Layout:
    layout = Layout(root, spec.name)
    layout.spec_path.parent.mkdir(parents=True, exist_ok=True)
    layout.spec_path.write_text(spec.to_json())
    return layout


# --------------------------------------------------------------------------- the pool's slots
def test_cpu_pool_has_one_thread_workers():
    assert runtime.pool_slots("cpu", None, 1, 6, 0) == [("cpu", 1)] * 6
    assert runtime.pool_slots("cpu", 3, 1, 6, 2) == [("cpu", 1)] * 3


def test_cuda_pool_pins_k_workers_to_each_gpu_and_splits_the_cores():
    slots = runtime.pool_slots("cuda", None, 2, 16, 3)
    assert [d for d, _ in slots] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2", "cuda:2"]
    assert [t for _, t in slots] == [3, 3, 3, 3, 2, 2]  # 16 = 6 * 2 + 4: the first four get one more
    assert runtime.pool_slots("cuda:1", None, 3, 8, 2) == [("cuda:1", 3), ("cuda:1", 3), ("cuda:1", 2)]
    assert runtime.pool_slots("cuda", None, 4, 2, 1) == [("cuda:0", 1)] * 4  # never fewer than one thread


@pytest.mark.parametrize("cpus, gpus, per_gpu", [(1, 1, 1), (7, 2, 3), (64, 8, 1), (5, 4, 2), (128, 3, 5)])
def test_slots_cover_every_gpu_evenly_and_use_every_core(cpus, gpus, per_gpu):
    slots = runtime.pool_slots("cuda", None, per_gpu, cpus, gpus)
    assert len(slots) == gpus * per_gpu
    assert all(d == f"cuda:{i // per_gpu}" for i, (d, _) in enumerate(slots))
    threads = [t for _, t in slots]
    assert max(threads) - min(threads) <= 1 and sum(threads) == max(cpus, len(slots))


@pytest.mark.parametrize("args, field", [(("cuda", None, 0, 4, 1), "workers_per_gpu"),
                                         (("cuda", None, 1, 4, 0), "device"),
                                         (("cuda", 3, 1, 4, 2), "workers"),
                                         (("cpu", 0, 1, 4, 0), "workers"),
                                         (("tpu", None, 1, 4, 0), "device")])
def test_bad_pool_settings_name_the_field(args, field):
    with pytest.raises(SpecError, match=field):
        runtime.pool_slots(*args)


# --------------------------------------------------------------------------- devices reach every executor
@pytest.fixture
def recorded(monkeypatch):
    """`run_job` of every executor replaced by a recorder of (job id, device); the device check passes
    any cpu/cuda spelling (as on a machine with enough GPUs), without a CUDA call."""
    calls = []

    def run_job(spec, layout, job, device="cpu", log=print, on_epoch=None, models=None):
        calls.append((job.id, str(device)))
        return "done"

    monkeypatch.setattr(jobs, "run_job", run_job)
    monkeypatch.setattr(inprocess, "check_device", runtime.parse_device)
    monkeypatch.setattr(local_pool, "check_device", runtime.parse_device)
    return calls


def test_inprocess_runs_every_job_on_its_device(tiny, recorded):
    spec, layout = tiny
    reports = executors.InProcess("cuda:1").run(spec, layout, ["train", "loss_acc"])
    assert reports["train"].done == 4 and reports["loss_acc"].done == 4
    assert {device for _, device in recorded} == {"cuda:1"} and len(recorded) == 8


def test_inprocess_refuses_a_device_this_machine_lacks(tiny):
    spec, layout = tiny
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SpecError, match="no usable CUDA"):
        executors.InProcess("cuda").run(spec, layout, ["train"])


class FakePool:
    """A ProcessPoolExecutor whose workers are simulated here: a submit of `_pool_ready` starts the next
    worker (its initializer runs), a task runs at once in the worker started last."""

    made: list = []

    def __init__(self, max_workers, mp_context, initializer, initargs):
        self.max_workers, self.start_method = max_workers, mp_context.get_start_method()
        self.initializer, self.initargs = initializer, initargs
        self.devices: list[str] = []
        FakePool.made.append(self)

    def submit(self, fn, *args):
        future = Future()
        if fn is local_pool._pool_ready:
            self.initializer(*self.initargs)
            self.devices.append(local_pool._worker_device)
            future.set_result(None)
        else:
            future.set_result(fn(*args))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_local_pool_pins_its_workers_to_the_gpus(tiny, recorded, monkeypatch):
    """LocalPool("cuda", workers_per_gpu=2) on a machine with 2 GPUs (faked): 4 spawned workers, worker i
    on cuda:{i // 2} with 2 of the 8 cores each, made current there; their jobs run on their device."""
    spec, layout = tiny
    pinned, threads = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    monkeypatch.setattr(local_pool.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(local_pool, "configure_worker", threads.append)
    monkeypatch.setattr(local_pool, "exit_with", lambda pid: None)
    monkeypatch.setattr(local_pool, "freeze_alive", lambda: None)
    monkeypatch.setattr(local_pool, "ProcessPoolExecutor", FakePool)
    monkeypatch.setattr(local_pool, "_worker_device", "cpu")
    FakePool.made.clear()
    reports = executors.LocalPool(device="cuda", workers_per_gpu=2).run(spec, layout, ["train", "loss_acc"])
    (pool,) = FakePool.made
    assert pool.max_workers == 4 and pool.start_method == "spawn"
    assert pool.devices == pinned == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"] and threads == [2, 2, 2, 2]
    assert reports["train"].done == 4 and reports["loss_acc"].done == 4
    assert {device for _, device in recorded} == {"cuda:1"}  # every task ran in the last worker started


def test_submitit_tasks_run_on_the_given_device(tiny, recorded, monkeypatch):
    spec, layout = tiny
    monkeypatch.setattr(cluster, "configure_worker", lambda threads: None)
    monkeypatch.setattr(cluster, "freeze_alive", lambda: None)
    job_list = jobs.stage_jobs(spec, "train")
    assert {t.device for t in cluster.tasks_of(layout, job_list, SlurmOptions(gpus=2))} == {"cuda"}
    assert {t.device for t in cluster.tasks_of(layout, job_list, SlurmOptions())} == {"cpu"}
    tasks = cluster.tasks_of(layout, job_list, SlurmOptions(gpus=2, device="cuda:1", jobs_per_task=2))
    for task in tasks:
        task()
    assert len(tasks) == 2 and sorted(recorded) == sorted((j.id, "cuda:1") for j in job_list)
    requeued = tasks[0].checkpoint().function
    assert requeued.device == "cuda:1"


def test_scripts_pass_the_device_to_the_worker(tiny):
    _, layout = tiny
    assert "--device" not in bash_script(layout, "train", 2)
    lines = bash_script(layout, "train", 2, device="cuda:1").splitlines()[-2:]
    assert all(line.endswith("--device cuda:1") for line in lines)
    assert slurm_script(layout, "train", 2, SlurmOptions(gpus=2, device="cuda:1")).splitlines()[-1].endswith(
        "--device cuda:1")
    assert slurm_script(layout, "train", 2, SlurmOptions(gpus=1)).splitlines()[-1].endswith("--device cuda")
    assert "--device" not in slurm_script(layout, "train", 2, SlurmOptions(gpus=1, device="cpu"))


@pytest.mark.parametrize("options, words", [({"device": "cuda"}, "needs GPUs in each task"),
                                            ({"device": "cuda:2", "gpus": 2}, "cuda:0 .. cuda:1"),
                                            ({"device": "xla"}, "only cpu and cuda"),
                                            ({"device": "cuda\n"}, "control character")])
def test_bad_task_devices(options, words):
    with pytest.raises(SpecError, match=words):
        SlurmOptions(**options)


def test_cli_writes_cluster_scripts_for_gpus_this_machine_lacks(root, monkeypatch):
    monkeypatch.setattr(cluster, "_ask", lambda argv: None)  # no Slurm to ask about its nodes
    assert cli.main([*BASE, "--root", str(root), "--generate-slurm-scripts", "--gpus", "2", "--device", "cuda:1"]) == 0
    folder = root / "bash_scripts" / "dev"
    assert (folder / "train.sbatch").read_text().splitlines()[-1].endswith("--device cuda:1")
    assert (folder / "train.sh").read_text().splitlines()[-1].endswith("--device cuda:1")


@pytest.mark.parametrize("argv, words", [
    (["--device", "cuda", "--run"], "device: 'cuda': this torch has no usable CUDA"),
    (["--device", "cuda", "--run", "--executor", "inprocess"], "device: 'cuda': this torch has no usable CUDA"),
    (["--device", "cuda:0", "--run", "--executor", "submitit-local", "--gpus", "1"], "no usable CUDA"),
    (["--device", "cuda", "--generate-slurm-scripts"], "device: 'cuda' needs GPUs in each task"),
    (["--device", "tpu", "--generate-slurm-scripts", "--gpus", "1"], "device: 'tpu' is not a torch device"),
    (["--workers-per-gpu", "0", "--run"], "workers_per_gpu: 0 must be an integer >= 1"),
    (["--autocast", "fp8"], "autocast: 'fp8' is not one of off, bf16"),
    (["--autocast", "bf16", "--dtype", "float64"], "autocast: bf16 autocasts float32 operations; it needs dtype"),
])
def test_bad_devices_exit_2_with_one_line_and_no_files(root, capsys, argv, words):
    if torch.cuda.is_available() and "CUDA" in words:
        pytest.skip("this machine has CUDA")
    assert cli.main([*BASE, "--root", str(root), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not (root / "checkpoint").exists() and not (root / "bash_scripts").exists()


def test_worker_checks_its_device(tiny, capsys):
    _, layout = tiny
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["--experiment-dir", str(layout.exp_dir), "--stage", "train", "--index", "0", "--device", "cuda"]
    assert worker.main(argv) == 2
    assert "device: 'cuda': this torch has no usable CUDA" in capsys.readouterr().err
    assert not layout.result_path("train", tiny[0].cells()[0]).exists()


# --------------------------------------------------------------------------- the spec's new fields
def test_default_fields_keep_the_training_hash_of_existing_studies():
    """The hashes recorded by studies made before `autocast` and `deterministic` existed."""
    before = {"demo": "073619beca22e021", "tiny": "a1bd54e51ff36f12", "reference": "3a0aef69c2049913"}
    assert {name: ExperimentSpec.from_dict(PRESET_SPECS[name]).training_hash() for name in before} == before
    old_file = {k: v for k, v in ExperimentSpec.from_dict(PRESET_SPECS["tiny"]).to_dict().items()
                if k not in ("autocast", "deterministic")}
    assert ExperimentSpec.from_dict(old_file).training_hash() == before["tiny"]
    hashes = {ExperimentSpec.from_dict({**PRESET_SPECS["tiny"], **change}).training_hash()
              for change in ({"autocast": "bf16"}, {"deterministic": True},
                             {"autocast": "bf16", "deterministic": True})}
    assert len(hashes) == 3 and before["tiny"] not in hashes


def test_deterministic_must_be_a_flag():
    with pytest.raises(SpecError, match="deterministic: expected true or false"):
        ExperimentSpec(deterministic="yes")


# --------------------------------------------------------------------------- the step's host transfers
def test_sgd_step_is_the_method_step():
    """`sgd_step` (the loss read back later) takes SGD.step's operations: the same losses and weights, bit for bit."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)))
    a, b = (SGD(m, lr=0.1, momentum=0.9, weight_decay=5e-4) for m in models)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        assert [a.step(x, y, 0)] == train.sgd_step(b, x, y, 0)()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_read_later_gives_the_values():
    values = torch.tensor([[1.5, -2.0], [0.25, float("nan")]])
    read = train.read_later(values)
    values.zero_()  # a CPU tensor is read when asked: the caller does not change it meanwhile
    assert train.read_later(torch.tensor([1.5, -2.0]))() == [1.5, -2.0]
    assert read()[:3] == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- bf16 autocast
def trained(spec: ExperimentSpec, root: Path, stages=("train",)) -> tuple[Layout, dict]:
    layout = write_spec(spec, root)
    for stage in stages:
        for job in jobs.stage_jobs(spec, stage):
            assert jobs.run_job(spec, layout, job, "cpu", log=lambda *a: None) == "done"
    cell = spec.cells()[0]
    return layout, {seed: train.load_model(layout.checkpoint(cell, seed, "final"))[0].state_dict()
                    for seed in spec.seeds}


def bf16_spec(**overrides) -> ExperimentSpec:
    return tiny_spec(widths=(8,), batch_sizes=(256,), seeds=(0,), epochs=1, metrics=("loss_acc",), **overrides)


def test_bf16_autocast_trains_float32_weights_close_to_float32_training(tmp_path, mnist_cache, one_thread):
    (tmp_path / "data").symlink_to(mnist_cache)
    _, plain = trained(bf16_spec(name="plain"), tmp_path)
    _, bf16 = trained(bf16_spec(name="bf16", autocast="bf16"), tmp_path)
    _, again = trained(bf16_spec(name="again", autocast="bf16"), tmp_path)
    for name, w in plain[0].items():
        assert bf16[0][name].dtype == torch.float32 and torch.equal(bf16[0][name], again[0][name])
        scale = w.abs().max().item()
        assert 0 < (bf16[0][name] - w).abs().max().item() <= 2e-3 * scale, name  # 1.7e-4 measured


def test_bf16_runs_the_forward_in_bfloat16_and_the_loss_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    inner = []
    model[0].register_forward_hook(lambda m, args, out: inner.append(out.dtype))
    train.autocast_forward(model, torch.bfloat16)
    x = torch.randn(4, 5)
    out = model(x)
    assert inner == [torch.bfloat16] and out.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # left when the forward returned
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 6))
    assert not torch.is_autocast_enabled("cpu")  # and when it raised


def test_bf16_runs_are_measured_in_float32(tmp_path, mnist_cache, one_thread):
    (tmp_path / "data").symlink_to(mnist_cache)
    spec = bf16_spec(name="measured", autocast="bf16")
    layout, _ = trained(spec, tmp_path, stages=("train", "loss_acc"))
    cell = spec.cells()[0]
    model, _ = train.load_model(layout.checkpoint(cell, 0, "final"))
    data = jobs.dataset_for(spec, cell, layout)
    from phasediagram.storage import results

    rows = results.read(layout.result_path("loss_acc", cell))["rows"]
    value = next(r["value"] for r in rows if r["split"] == "train" and r["metric"] == "loss")
    with torch.no_grad():
        exact = F.cross_entropy(model.double()(data.train.x.double()), data.train.y).item()
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = F.cross_entropy(model(data.train.x).float(), data.train.y).item()
    assert abs(value - exact) <= 1e-5 * exact < abs(low - exact)


def test_the_ensemble_form_is_not_used_with_autocast():
    spec = bf16_spec(autocast="bf16", ensemble="on")
    assert ensemble.ensemble_choice(spec, spec.cells()[0])[0] == 0
    assert ensemble.ensemble_choice(bf16_spec(ensemble="on"), spec.cells()[0])[0] == 1


# --------------------------------------------------------------------------- determinism
def test_deterministic_algorithms_within_the_block_only(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    with runtime.deterministic_algorithms(True, "cpu"):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in runtime.os.environ
    with runtime.deterministic_algorithms(True, "cuda"):
        assert runtime.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with runtime.deterministic_algorithms(False, "cuda"):
        assert torch.are_deterministic_algorithms_enabled() == before


def test_a_deterministic_study_trains_deterministically_to_the_same_cpu_numbers(tmp_path, mnist_cache, one_thread):
    (tmp_path / "data").symlink_to(mnist_cache)
    spec = bf16_spec(name="det", deterministic=True)
    layout = write_spec(spec, tmp_path)
    seen = []
    job = jobs.stage_jobs(spec, "train")[0]
    jobs.run_job(spec, layout, job, "cpu", log=lambda *a: None,
                 on_epoch=lambda *a: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    det = train.load_model(layout.checkpoint(spec.cells()[0], 0, "final"))[0].state_dict()
    _, plain = trained(bf16_spec(name="nondet"), tmp_path)
    assert all(torch.equal(det[k], plain[0][k]) for k in det)


# --------------------------------------------------------------------------- the GPU check's comparison
COMPARE = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "gpu_compare.py"), run_name="gpu_compare")


def table(changes: dict | None = None) -> pd.DataFrame:
    rows = [("c1", 0, None, "train", "loss", None, 0.5, "ok", "loss_acc", "value"),
            ("c1", 0, None, "test", "acc", None, 87.5, "ok", "loss_acc", "value"),
            ("c1", 0, 1, "-", "dist", None, 3.25, "ok", "dist", "value"),
            ("c1", 0, None, "train", "density", 0.5, 1e-3, "ok", "hessian", "value"),
            ("c1", 0, None, "train", "hvp_eig", None, 40.0, "ok", "hessian", "diagnostic"),
            ("c1", 0, None, "-", "phase", None, 2.0, "ok", "phase", "value"),
            ("c2", 0, None, "train", "loss", None, math.nan, "diverged", "loss_acc", "value")]
    df = pd.DataFrame(rows, columns=["cell", "seed", "seed_b", "split", "metric", "coord", "value", "status",
                                     "source", "kind"])
    for (i, column), value in (changes or {}).items():
        df.loc[i, column] = value
    return df


def mismatches(cuda: pd.DataFrame, cpu: pd.DataFrame) -> list[str]:
    return COMPARE["compare"](cuda, cpu)[0]


def test_compare_passes_equal_tables_and_values_within_the_tolerance():
    rtol, atol = COMPARE["TOLERANCE"]
    assert mismatches(table(), table()) == []
    assert mismatches(table({(0, "value"): 0.5 * (1 + 0.5 * rtol)}), table()) == []
    assert mismatches(table({(4, "value"): 41.0, (5, "value"): 3.0}), table()) == []  # diagnostics, phases
    summary = COMPARE["compare"](table(), table())[1]
    assert set(summary["source"]) == {"loss_acc", "dist", "hessian"} and summary["rows"].sum() == 5


@pytest.mark.parametrize("changes, words", [
    ({(0, "value"): 0.5 * (1 + 4e-6)}, "|difference|"),
    ({(1, "value"): 87.6}, "87.6 on CUDA, 87.5 on the CPU"),
    ({(3, "value"): 1e-3 + 2e-9}, "|difference|"),
    ({(6, "status"): "ok"}, "status ok on CUDA, diverged on the CPU"),
    ({(2, "seed_b"): 2}, "only in the CUDA table"),
])
def test_compare_finds_each_kind_of_mismatch(changes, words):
    found = mismatches(table(changes), table())
    assert found and all(words in line for line in found[:1]), found


# --------------------------------------------------------------------------- on a GPU
@needs_cuda
def test_read_later_on_cuda_waits_for_the_copy_only():
    values = torch.arange(6.0, device="cuda").reshape(2, 3)
    read = train.read_later(values * 2)
    assert read() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


@needs_cuda
def test_cuda_training_matches_cpu_training(tmp_path, mnist_cache):
    spec = bf16_spec(name="gpu", dtype="float64")
    _, cpu = trained(spec, data_root(tmp_path / "cpu", mnist_cache))
    layout = write_spec(spec, data_root(tmp_path / "cuda", mnist_cache))
    for job in jobs.stage_jobs(spec, "train"):
        jobs.run_job(spec, layout, job, "cuda", log=lambda *a: None)
    gpu = train.load_model(layout.checkpoint(spec.cells()[0], 0, "final"))[0].state_dict()
    for name, w in cpu[0].items():
        torch.testing.assert_close(gpu[name], w, rtol=1e-9, atol=1e-9)


@needs_cuda
def test_deterministic_cuda_runs_are_bit_identical(tmp_path, mnist_cache):
    states = []
    for name in ("first", "second"):
        spec = bf16_spec(name="det", arch="resnet1d", deterministic=True)
        layout = write_spec(spec, data_root(tmp_path / name, mnist_cache))
        for job in jobs.stage_jobs(spec, "train"):
            jobs.run_job(spec, layout, job, "cuda", log=lambda *a: None)
        states.append(train.load_model(layout.checkpoint(spec.cells()[0], 0, "final"))[0].state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@needs_cuda
def test_local_pool_on_cuda_trains_and_measures(tmp_path, mnist_cache):
    (tmp_path / "data").symlink_to(mnist_cache)
    spec = tiny_spec(name="pool")
    layout = write_spec(spec, tmp_path)
    reports = executors.LocalPool(device="cuda", workers_per_gpu=2).run(spec, layout, ["train", "loss_acc"])
    assert all(r.done == len(spec.cells()) and not r.failed for r in reports.values())
