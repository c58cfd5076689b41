"""Generated job scripts: golden files of the bash and Slurm text, the CLI's option -> #SBATCH mapping,
and values with spaces or shell metacharacters that must stay data (never become commands).

Regenerate the golden files after an intended change with `UPDATE_GOLDEN=1 pytest tests/test_scripts.py`
and review the diff.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phasediagram import cli
from phasediagram.errors import SpecError
from phasediagram.execution.scripts import SlurmOptions, bash_script, sbatch_flags, slurm_script, time_minutes
from phasediagram.storage.layout import Layout

GOLDEN = Path(__file__).parent / "golden"
ROOT = Path("/srv/phase study")  # a root with a space: quoted in --chdir
LAYOUT = Layout(ROOT, "golden")
ALL_OPTIONS = SlurmOptions(jobs_per_task=4, parallelism=16, time="02:00:00", cpus_per_task=2, mem="8G", gpus=1,
                           partition="gpu", account="my-lab", qos="normal",
                           env_setup="source .venv/bin/activate", python="python3")

CASES = {  # golden file -> text generated now
    "train.sh": lambda: bash_script(LAYOUT, "train", 3),
    "train_minimal.sbatch": lambda: slurm_script(LAYOUT, "train", 4),
    "train_all_options.sbatch": lambda: slurm_script(LAYOUT, "train", 910, ALL_OPTIONS),
    "loss_acc_packed.sbatch": lambda: slurm_script(LAYOUT, "loss_acc", 10, SlurmOptions(jobs_per_task=3)),
}


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from its golden file (UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    check_golden(name, CASES[name]())


def sbatch_lines(text: str) -> list[str]:
    """The #SBATCH options as sbatch reads them (its parser honours '...' and "..." quoting like POSIX sh)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            words = shlex.split(line[len("#SBATCH"):], comments=False, posix=True)
            assert len(words) == 1, f"{line!r} must be exactly one option"
            out.append(words[0])
    return out


def test_cli_maps_options_to_sbatch_lines(tmp_path, mnist_cache):
    """`--time 1:30:00 --cpus-per-task 4 ...` -> the matching #SBATCH lines (golden, root replaced by <ROOT>)."""
    shutil.copytree(mnist_cache, tmp_path / "data")
    argv = ["--root", str(tmp_path), "--name", "clijob", "--arch", "mlp", "--widths", "4", "8", "--batch-sizes",
            "32", "64", "128", "--seeds", "0", "1", "--epochs", "1", "--metrics", "train", "loss_acc",
            "--generate-slurm-scripts", "--jobs-per-task", "2", "--array-parallelism", "3", "--time", "1:30:00",
            "--cpus-per-task", "4", "--mem", "16G", "--gpus", "2", "--partition", "long", "--account", "lab",
            "--qos", "high", "--env-setup", "module load cuda", "--python", "python3.11"]
    assert cli.main(argv) == 0
    for stage in ("train", "loss_acc"):
        text = (tmp_path / "bash_scripts" / "clijob" / f"{stage}.sbatch").read_text()
        check_golden(f"cli_{stage}.sbatch", text.replace(str(tmp_path), "<ROOT>"))
    flags = sbatch_lines((tmp_path / "bash_scripts" / "clijob" / "train.sbatch").read_text())
    assert flags == [
        "--job-name=clijob-train", "--array=0-2%3", f"--chdir={tmp_path}",
        "--output=bash_scripts/clijob/slurm_logs/train_%A_%a.out",
        "--error=bash_scripts/clijob/slurm_logs/train_%A_%a.err",
        "--time=1:30:00", "--cpus-per-task=4", "--mem=16G", "--gpus=2", "--partition=long", "--account=lab",
        "--qos=high"]
    assert (tmp_path / "bash_scripts" / "clijob" / "slurm_logs").is_dir()  # Slurm does not create it


def test_optional_lines_only_when_given():
    flags = sbatch_lines(slurm_script(LAYOUT, "train", 4))
    assert [f.split("=")[0] for f in flags] == ["--job-name", "--array", "--chdir", "--output", "--error"]
    assert "--array=0-3" in flags


@pytest.mark.parametrize("n_jobs,per_task,array", [(1, 1, "0-0"), (4, 1, "0-3"), (4, 2, "0-1"), (5, 2, "0-2"),
                                                   (910, 10, "0-90")])
def test_array_covers_every_job(n_jobs, per_task, array):
    flags = sbatch_lines(slurm_script(LAYOUT, "train", n_jobs, SlurmOptions(jobs_per_task=per_task)))
    assert f"--array={array}" in flags


# --------------------------------------------------------------------------- injection
NASTY = [
    "a b",
    "x; touch INJECTED",
    "$(touch INJECTED)",
    "`touch INJECTED`",
    "it's",
    'say "hi" #not-a-comment',
    "a\\b",
    "*?[]{}~!&|<>",
]
NASTY_DIR = "dir with 'quotes' \"and\" $(touch INJECTED) `x` ; & | #"


def fake_python(folder: Path, record: Path) -> Path:
    """An executable that records its argv as JSON (stands in for python in the scripts)."""
    exe = folder / "fake py's bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                   f"with open({str(record)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("value", NASTY)
def test_sbatch_values_stay_one_word(value):
    partition = "".join(value.split())  # a partition name holds no whitespace
    options = SlurmOptions(partition=partition, account=value, qos=value, mem="8G", time="10")
    flags = sbatch_lines(slurm_script(Layout(Path("/tmp") / value.replace("/", "_"), "n"), "train", 3, options))
    assert f"--partition={partition}" in flags and f"--account={value}" in flags and f"--qos={value}" in flags


def test_scripts_run_without_injection(tmp_path):
    """Run the generated scripts with bash from a root full of metacharacters: the worker gets exactly
    the intended arguments, and nothing else is executed."""
    root = tmp_path / NASTY_DIR
    root.mkdir()
    record = tmp_path / "argv.jsonl"
    exe = fake_python(root, record)
    layout = Layout(root, "nasty")
    options = SlurmOptions(jobs_per_task=2, partition="x;touch${IFS}INJECTED", account=NASTY[2], qos=NASTY[3],
                           python=str(exe))
    sbatch = slurm_script(layout, "train", 5, options)
    bash = bash_script(layout, "train", 2, python=str(exe))
    layout.scripts_dir.mkdir(parents=True)
    for name, text in (("train.sbatch", sbatch), ("train.sh", bash)):
        path = layout.scripts_dir / name
        path.write_text(text)
        subprocess.run(["bash", "-n", str(path)], check=True)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "3"}
    # Slurm runs a copy of the script from its spool, in --chdir: do the same
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(layout.scripts_dir / "train.sbatch", spool / "slurm_script")
    subprocess.run(["bash", str(spool / "slurm_script")], cwd=root, env=env, check=True)
    subprocess.run(["bash", str(layout.scripts_dir / "train.sh")], cwd=tmp_path, env=env, check=True)
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    worker = ["-m", "phasediagram.execution.worker", "--experiment-dir", "checkpoint/nasty", "--stage", "train"]
    assert calls == [
        [*worker, "--index", "2", "--jobs-per-task", "2", "--threads", "3"],
        [*worker, "--index", "0"],
        [*worker, "--index", "1"],
    ]
    assert not list(tmp_path.rglob("INJECTED")), "a value was executed as a command"
    assert f"--chdir={root}" in sbatch_lines(sbatch)


@pytest.mark.parametrize("field", ["partition", "account", "qos", "env_setup", "python", "time", "mem"])
@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_control_characters_are_refused(field, bad):
    with pytest.raises(SpecError, match=field):
        SlurmOptions(**{field: bad})


def test_newline_in_root_or_name_refused():
    with pytest.raises(SpecError, match="root"):
        slurm_script(Layout(Path("/tmp/a\nb"), "n"), "train", 2)
    with pytest.raises(SpecError, match="name"):
        bash_script(Layout(Path("/tmp"), "a\ntouch x"), "train", 2)


def test_percent_in_root_refused_with_a_clear_error():
    with pytest.raises(SpecError, match="'%'"):
        slurm_script(Layout(Path("/tmp/100%done"), "n"), "train", 2)


@pytest.mark.parametrize("field,value", [("jobs_per_task", 0), ("parallelism", 0), ("cpus_per_task", -1),
                                         ("gpus", -1), ("time", "2 hours"), ("mem", "lots"), ("python", "")])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(SpecError, match=field):
        SlurmOptions(**{field: value})


@pytest.mark.parametrize("text,minutes", [("90", 90), ("0", 0), ("05:30", 6), ("1:00:00", 60), ("2:00:01", 121),
                                          ("1-0", 1440), ("1-2", 1560), ("1-02:30", 1590), ("0-00:00:30", 1)])
def test_time_minutes(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["99:99:99", "1:60:00", "60:60", "10:75", "1-24", "1-23:60", "1-0:0:60",
                                  "1:2:3:4", "1-2-3", ":30", "1:", "-1", "1.5", "2 hours", "", "9999999999"])
def test_times_outside_slurms_forms_or_ranges_are_refused(text):
    """sbatch's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]];
    a field after another is below its unit's size (hours < 24 after days, minutes and seconds < 60)."""
    with pytest.raises(SpecError, match="time"):
        SlurmOptions(time=text)


@pytest.mark.parametrize("text", ["0", "1", "90", "48:00:00", "100:59:59", "0:59", "7-23:59:59", "0-0", "UNLIMITED"])
def test_times_in_slurms_forms_are_accepted(text):
    assert SlurmOptions(time=text).time == text


@pytest.mark.parametrize("field,good,bad", [
    ("mem", ["1", "500M", "8G", "8g", "2T", "16000", "64K"], ["0", "0G", "-1", "8GB", "8 G", "1.5G", "G", "lots"]),
    ("partition", ["gpu", "gpu,long", "debug-2", "a.b_c"], ["a b", "gpu,", ",gpu", "gpu,,long", " gpu", "a\tb"]),
])
def test_memory_and_partitions_in_slurms_grammar(field, good, bad):
    """--mem: a positive integer of megabytes or with a K/M/G/T suffix; --partition: names without
    whitespace, separated by commas."""
    for value in good:
        assert getattr(SlurmOptions(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(SpecError, match=field):
            SlurmOptions(**{field: value})


def test_gpus_select_the_cuda_device():
    text = slurm_script(LAYOUT, "train", 2, SlurmOptions(gpus=1))
    assert text.splitlines()[-1].endswith("--device cuda")
    assert "--device" not in slurm_script(LAYOUT, "train", 2).splitlines()[-1]


def test_flags_list_matches_script():
    assert sbatch_flags(LAYOUT, "train", 910, ALL_OPTIONS) == sbatch_lines(CASES["train_all_options.sbatch"]())


def test_submit_chain_without_sbatch_is_a_clear_error(tmp_path):
    from phasediagram.errors import SubmitError
    from phasediagram.execution.cluster import submit_chain

    layout = Layout(tmp_path, "exp")
    with pytest.raises(SubmitError, match="does not exist; generate it"):
        submit_chain(layout, ["train"])
    layout.scripts_dir.mkdir(parents=True)
    layout.script_path("train", ".sbatch").write_text(slurm_script(layout, "train", 2))
    with pytest.raises(SubmitError, match="not found"):
        submit_chain(layout, ["train"], sbatch=str(tmp_path / "no-sbatch-here"))


def test_submit_chain_orders_training_first_and_chains_metrics(tmp_path):
    """With a stand-in sbatch that records its arguments: train first, metrics with afterany on it."""
    from phasediagram.execution.cluster import submit_chain

    layout = Layout(tmp_path, "exp")
    layout.scripts_dir.mkdir(parents=True)
    for stage in ("train", "loss_acc", "dist"):
        layout.script_path(stage, ".sbatch").write_text(slurm_script(layout, stage, 2))
    record = tmp_path / "calls.jsonl"
    fake = tmp_path / "sbatch"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nwith open({str(record)!r}, 'a') as f:\n"
                    "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    f"print(40 + sum(1 for _ in open({str(record)!r})))\n")
    fake.chmod(0o755)
    ids = submit_chain(layout, ["loss_acc", "train", "dist"], sbatch=str(fake))
    assert ids == {"train": "41", "loss_acc": "42", "dist": "43"}
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls == [
        ["--parsable", str(layout.script_path("train", ".sbatch"))],
        ["--parsable", "--dependency=afterany:41", str(layout.script_path("loss_acc", ".sbatch"))],
        ["--parsable", "--dependency=afterany:41", str(layout.script_path("dist", ".sbatch"))],
    ]
