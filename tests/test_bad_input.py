"""Bad input: a clear message naming what is wrong and what is allowed, exit status 2, no files."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from phasediagram import cli

from .test_data import write_cifar_folder

BASE = ["--name", "bad", "--arch", "mlp", "--widths", "4", "--batch-sizes", "64", "--seeds", "0", "1", "--epochs", "1"]


def run(root, *argv):
    return cli.main([*BASE, "--root", str(root), *argv])


@pytest.mark.parametrize("argv, words", [
    (["--arch", "vgg"], "arch: 'vgg' is not one of mlp, resnet1d, resnet18"),
    (["--dataset", "imagenet"], "dataset: 'imagenet' is not one of mnist1d, cifar10"),
    (["--metrics", "train", "sharpness"], "metrics: 'sharpness' is not one of loss_acc, dist"),
    (["--optimizer", "adam"], "optimizer: 'adam' is not one of sgd, sam, entropy_sgd, replicated_sgd"),
    (["--regularizer", "dropout"], "regularizer: 'dropout' is not one of none, infomcr, nrs"),
    (["--widths"], "--widths: expected at least one argument"),
    (["--widths", "0"], "widths: 0 is out of range (allowed: 1 <= value"),
    (["--widths", "-4"], "widths: -4 is out of range"),
    (["--widths", "2.5"], "widths: '2.5' is not an integer"),
    (["--widths", "four"], "widths: 'four' is neither a list of numbers nor a preset; presets: reference"),
    (["--widths", "4", "four"], "widths: 'four' is not a number"),
    (["--widths", "4", "4"], "widths: duplicated values [4]"),
    (["--batch-sizes", "0"], "batch_sizes: 0 is out of range"),
    (["--batch-sizes", "64", "64"], "batch_sizes: duplicated values [64]"),
    (["--batch-sizes", "8000"], "batch_sizes: [8000] exceed the training set (4000 examples"),
    (["--seeds", "-1", "1"], "seeds: -1 is out of range (allowed: 0 <= value <= 2147483647)"),
    (["--seeds", "0", "99999999999"], "seeds: 99999999999 is out of range"),
    (["--epochs", "0"], "epochs: 0 is out of range"),
    (["--metric-option", "hessian.lanczos_iters=0"], "metric_options.hessian.lanczos_iters"),
    (["--metric-option", "CKA.mixup_alpha=0"], "metric_options.CKA.mixup_alpha"),
    (["--metric-option", "CKA.mixup_alpha=-1"], "metric_options.CKA.mixup_alpha"),
    (["--metric-option", "loss_acc.colour=red"], "unknown option(s) ['colour']"),
    (["--metric-option", "nonsense"], "not of the form METRIC.KEY=VALUE"),
    (["--optimizer", "sam", "--optimizer-option", "rho=-1"], "optimizer_options.rho"),
    (["--optimizer-option", "speed=3"], "optimizer_options: unknown option(s) ['speed']"),
    (["--name", "../outside"], "name: '../outside' must be 1-64 characters"),
    (["--executor", "cloud"], "argument --executor: invalid choice: 'cloud'"),
    (["--dataset", "cifar10", "--run"], "cifar10 needs data_root"),
    (["--dataset", "cifar10", "--generate-slurm-scripts", "--submit"], "cifar10 needs data_root"),
    (["--generate-slurm-scripts", "--time", "-5"], "time: '-5' is not a Slurm time"),
    (["--generate-slurm-scripts", "--cpus-per-task", "0"], "cpus_per_task: 0 must be an integer >= 1"),
    (["--generate-slurm-scripts", "--gpus", "-1"], "gpus: -1 must be an integer >= 0"),
    (["--generate-slurm-scripts", "--array-parallelism", "-1"], "parallelism: -1 must be an integer >= 1"),
    (["--generate-slurm-scripts", "--jobs-per-task", "-1"], "jobs_per_task: -1 must be an integer >= 1"),
    (["--generate-slurm-scripts", "--mem", "junk"], "mem: 'junk' is not a Slurm memory size"),
    (["--generate-slurm-scripts", "--partition", "gpu\nrm"], "partition: 'gpu\\nrm' holds a control character"),
    (["--generate-slurm-scripts", "--time", "99:99:99"], "time: '99:99:99' has a field out of range"),
    (["--generate-slurm-scripts", "--time", "1-24"], "time: '1-24' has a field out of range"),
    (["--generate-slurm-scripts", "--mem", "0"], "mem: '0' is not a Slurm memory size: a positive integer"),
    (["--generate-slurm-scripts", "--partition", "a b"], "partition: 'a b' is not a Slurm partition list"),
    (["--workers", "0"], "workers: 0 must be an integer >= 1"),
    (["--workers", "-1"], "workers: -1 must be an integer >= 1"),
    (["--metrics", "CKA", "--metric-option", "CKA.layers=junk"],
     "metric_options.CKA.layers: 'junk' is not a module of MLP; known: net, net.0"),
    (["--env-setup", "source nowhere/bin/activate"], "env_setup: 'nowhere/bin/activate' does not exist under"),
    (["--device", "junk"], "device: 'junk' is not a torch device"),
    (["--device", "cuda"], "device: 'cuda': this torch has no usable CUDA"),
    (["--device", "cuda:7"], "device: 'cuda:7': "),
    (["--device", "meta"], "device: 'meta': only cpu and cuda devices are supported"),
    (["--widths", *map(str, range(1, 401)), "--batch-sizes", *map(str, range(1, 401))],
     "max_runs: the grid has 160000 cells x 2 seeds = 320000 runs, more than max_runs = 100000"),
    (["--max-runs", "1"], "max_runs: the grid has 1 cells x 2 seeds = 2 runs, more than max_runs = 1"),
])
def test_bad_arguments_exit_2_with_a_clear_message_and_no_files(root, capsys, argv, words):
    assert run(root, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err, err
    assert not (root / "checkpoint").exists() and not (root / "bash_scripts").exists()


@pytest.mark.parametrize("text, suffix, words", [
    ("{not json", ".json", "is not valid JSON"),
    ("widths: [4\n", ".yaml", "is not valid YAML"),
    ('{"name": "x", "arch": "mlp", "depth": 3}', ".json", "unknown key(s) ['depth']; allowed keys: name, arch"),
    ("[1, 2]", ".json", "expected a mapping of fields"),
    ("[" * 100_000 + "]" * 100_000, ".json", "nests 100000 levels deep; a spec has at most 32"),
    ('{"name": "x", "metric_options": ' + '{"a": ' * 40 + "1" + "}" * 41, ".json", "nests 41 levels deep"),
    ("[" * 100_000 + "]" * 100_000, ".yaml", "nests more than 32 levels deep (line 1)"),
    ("".join("  " * i + "a:\n" for i in range(40)), ".yaml", "nests more than 32 levels deep (line 32)"),
    ("x" * (1 << 21), ".yaml", "bytes; a spec file has at most 1048576"),
    ("a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)) + "name: *a9\n", ".yaml",
     "uses the alias *a0 (line 2); anchors and aliases are not allowed"),
    ("name: a\nepochs: 3\nepochs: 4\n", ".yaml", "repeats the key 'epochs' (line 3)"),
    ('{"name": "a", "epochs": 3, "epochs": 4}', ".json", "repeats the key(s) ['epochs']"),
    ('{"name": "' + "n" * 100_000 + '"}', ".json", "characters in all)"),
])
def test_bad_spec_files(root, capsys, text, suffix, words):
    path = root / f"spec{suffix}"
    path.write_text(text)
    assert cli.main(["--spec", str(path), "--root", str(root)]) == 2
    assert words in capsys.readouterr().err
    assert not (root / "checkpoint").exists()


def test_dataset_folder_missing_or_malformed(root, capsys, tmp_path_factory):
    nowhere = tmp_path_factory.mktemp("empty")
    assert run(root, "--dataset", "cifar10", "--arch", "resnet18", "--data-root", str(nowhere), "--run") == 2
    err = capsys.readouterr().err
    assert "must hold the CIFAR-10 python batches" in err and "missing: data_batch_1" in err
    folder = tmp_path_factory.mktemp("cifar")
    write_cifar_folder(folder, n_per_batch=20)
    with open(folder / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump({"data": b"\x00" * 10, "labels": [1, 2]}, f)
    assert run(root, "--dataset", "cifar10", "--arch", "resnet18", "--data-root", str(folder), "--run",
               "--batch-sizes", "8", "--widths", "1") == 2
    assert "data_batch_4: 10 bytes of pixels for 2 labels" in capsys.readouterr().err


def test_changing_training_settings_of_an_existing_experiment_is_refused(root, capsys):
    assert run(root) == 0
    assert run(root, "--epochs", "5") == 2
    assert "already exists" in capsys.readouterr().err and "epochs" in capsys.readouterr().err + "epochs"


def test_checkpoint_of_another_arch_or_width_is_refused(root, capsys):
    assert run(root, "--run", "--executor", "inprocess", "--metrics", "train") == 0
    spec_path = root / "checkpoint" / "bad" / "spec.json"
    spec_path.write_text(spec_path.read_text().replace('"arch": "mlp"', '"arch": "resnet1d"'))
    proc = subprocess.run([sys.executable, "-m", "phasediagram.execution.worker", "--experiment-dir",
                           str(root / "checkpoint" / "bad"), "--stage", "loss_acc", "--index", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "holds a mlp of width 4, but the spec says resnet1d of width 4" in proc.stderr
    assert "final.pt" in proc.stderr


def test_results_table_of_another_experiment_is_refused(root, capsys):
    assert run(root, "--run", "--executor", "inprocess") == 0
    capsys.readouterr()
    table = root / "checkpoint" / "bad" / "results.csv"
    assert cli.main([*BASE, "--root", str(root), "--name", "other", "--table", str(table)]) == 2
    assert "holds results of experiment(s) ['bad'], not 'other'" in capsys.readouterr().err
    (root / "foreign.csv").write_text("a,b\n1,2\n")
    assert run(root, "--table", str(root / "foreign.csv")) == 2
    assert "is not a phasediagram results table" in capsys.readouterr().err


def test_worker_bad_input_exits_2(root):
    for argv, words in [(["--experiment-dir", str(root / "nowhere")], "is not of the form <root>/checkpoint/<name>"),
                        (["--experiment-dir", str(root / "checkpoint" / "none")], "generate the jobs first")]:
        proc = subprocess.run([sys.executable, "-m", "phasediagram.execution.worker", *argv, "--stage", "train", "--index",
                               "0"], capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr


def test_root_that_is_a_file_or_empty(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(tmp_path / "file") == 2
    err = capsys.readouterr().err
    assert "root: " in err and "is a file, not a folder" in err and "disk" not in err
    assert cli.main([*BASE, "--root", ""]) == 2
    assert "root: must not be empty" in capsys.readouterr().err



def exiting_loader(data_root):
    """A dataset loader that ends the process its own way."""
    sys.exit(0)


def exiting_builder(width, n_classes, input_shape):
    sys.exit("no model today")


@pytest.mark.parametrize("argv, words", [
    (["--dataset", f"{__name__}:exiting_loader"], f"dataset: {__name__}:exiting_loader(None) raised SystemExit: it "
                                                   "called sys.exit(0)"),
    (["--arch", f"{__name__}:exiting_builder"], "raised SystemExit: it called sys.exit('no model today')"),
])
def test_a_plug_in_calling_sys_exit_is_one_line_and_exit_2(root, capsys, argv, words):
    """A plug-in's sys.exit() does not end the command with the status it chose, silently: one line, exit 2."""
    assert run(root, *argv, "--run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "checkpoint").exists() and not (root / "bash_scripts").exists()
