"""The command line: spec from a preset, a file and flags -> job scripts -> (run) -> table -> plots.

    python example_experiment.py --preset demo --metrics train            # write bash_scripts/demo/train.sh
    python example_experiment.py --preset demo --metrics train --generate-slurm-scripts
    python example_experiment.py --preset demo --metrics loss_acc dist --run
    python example_experiment.py --preset demo --run --plot                # the whole study

Exit status 0 on success, 1 when some jobs failed (the rest completed), 2 for bad input, 130 after
Ctrl-C (one line: rerun the same command to resume; every file on disk is whole).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path

from phasediagram.catalog import method_table, metric_table
from phasediagram.diagnosis import diagnose
from phasediagram.errors import INTERRUPTED, CorruptFile, SpecError
from phasediagram.execution.executors import Executor, InProcess, LocalPool, Submitit, pool_size
from phasediagram.execution.jobs import TRAIN, dataset_for
from phasediagram.execution.local_pool import start_pool
from phasediagram.execution.runtime import (
    check_device,
    freeze_alive,
    in_forked_process,
    keep_freed_memory,
    parse_device,
)
from phasediagram.execution.scripts import SlurmOptions
from phasediagram.resolve import check
from phasediagram.spec.experiment import ExperimentSpec
from phasediagram.spec.presets import PRESET_SPECS, PRESETS, preset
from phasediagram.study import Study, merged_spec, remove_stale_temporaries

EXECUTORS = ("inprocess", "local", "slurm", "submitit-local")


class ArgumentError(SpecError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that raises (so every bad input leaves through one path with exit status 2)."""

    def error(self, message):
        raise ArgumentError("arguments", message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="example_experiment.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="Lists accept presets: --widths reference, --batch-sizes efficient_fine, --lrs coarse|fine, "
                      "--weight-decays coarse|fine.\n\n" + commands_help())
    p.add_argument("--list-metrics", action="store_true", help="print the metric registry as a table and exit")
    p.add_argument("--list-methods", action="store_true", help="print the optimizers and regularizers and exit")
    s = p.add_argument_group("the spec (a preset, then a file, then these flags; later ones win)")
    s.add_argument("--preset", choices=sorted(PRESET_SPECS), default=None,
                   help="start from a named spec (demo: the embedded MNIST-1D ResNet grid)")
    s.add_argument("--spec", help="a JSON or YAML spec file")
    s.add_argument("--name", help="experiment name (folder under checkpoint/ and bash_scripts/)")
    s.add_argument("--arch", help="model family: mlp, resnet1d, resnet18, transformer, transformer_seq, or an import "
                                   "path module:function")
    s.add_argument("--dataset", help="mnist1d, modular_addition, reversal (generated locally), cifar10, cifar100, "
                                      "svhn, or an import path module:function")
    s.add_argument("--data-root", help="folder holding cifar-10-batches-py, cifar-100-python or the SVHN .mat files")
    s.add_argument("--widths", nargs="+", help="load axis: model widths, or a preset name")
    s.add_argument("--batch-sizes", nargs="+", help="temperature axis: batch sizes, or a preset name")
    s.add_argument("--lrs", nargs="+", help="learning rates, or a preset name")
    s.add_argument("--weight-decays", nargs="+", help="weight decays, or a preset name")
    s.add_argument("--train-fractions", nargs="+", help="fractions of the training set (a load axis)")
    s.add_argument("--label-noises", nargs="+", help="fractions of random labels (a load axis)")
    s.add_argument("--load-axis", help="width | train_fraction | label_noise")
    s.add_argument("--temperature-axis", help="batch_size | lr | weight_decay")
    s.add_argument("--seeds", nargs="+", help="seeds, e.g. 0 1 2")
    s.add_argument("--epochs", help="training epochs")
    s.add_argument("--schedule", help="constant | step (x lr_decay_factor at lr_decay_at of the epochs) | cosine")
    s.add_argument("--optimizer", help="training method: sgd, sam, entropy_sgd, replicated_sgd")
    s.add_argument("--optimizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the optimizer (repeatable)")
    s.add_argument("--regularizer", help="none, infomcr, nrs")
    s.add_argument("--regularizer-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the regularizer (repeatable)")
    s.add_argument("--metric-option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="an option of a metric, e.g. hessian.top_k=3 (repeatable)")
    s.add_argument("--ensemble", help="auto | on | off: train the seeds of a cell, and compute their Hessians, "
                                      "as ensemble models (auto: in groups where faster; on: all in one)")
    s.add_argument("--dtype", help="float32 | float64")
    s.add_argument("--autocast", help="off | bf16: the training forward and loss under bfloat16 autocast (float32)")
    s.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic torch algorithms in every job (bit-reproducible on one GPU; docs/gpu.md)")
    s.add_argument("--track", nargs="*", metavar="KEY=VALUE", default=None,
                   help="track the landscape during training (spec `track`): alone, the defaults; else its options, "
                        "e.g. quantities=[loss,lambda_max,trace] every_steps=10")
    s.add_argument("--max-runs", help="the most (cell, seed) runs the grid may have (default 100000)")
    s.add_argument("--metric-checkpoint", help="final | best: the checkpoint the metrics read (best: lowest "
                                               "training loss, as the reference study)")

    w = p.add_argument_group("what to do")
    w.add_argument("--metrics", nargs="+", metavar="STAGE",
                   help="stages to write (and run): 'train' and/or metric names; default: train and the spec's metrics")
    w.add_argument("--run", action="store_true", help="execute the jobs here instead of only writing them")
    w.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="inprocess | local (a pool of worker processes: one-thread ones on the CPU, "
                        "--workers-per-gpu per GPU with --device cuda; default) | slurm (submitit) | submitit-local")
    w.add_argument("--workers", type=int, default=None, help="local pool size on the CPU (default: number of cores)")
    w.add_argument("--device", default=None,
                   help="torch device of the jobs, every executor: cpu (default; cuda for Slurm tasks with --gpus), "
                        "cuda (the local pool: every visible GPU), cuda:N")
    w.add_argument("--workers-per-gpu", type=int, default=1,
                   help="with --device cuda: local pool workers per GPU, each with its share of the cores (default 1)")
    w.add_argument("--plot", action="store_true", help="collect the results table and draw the phase plot")
    w.add_argument("--root", default=".", help="folder holding checkpoint/ and bash_scripts/ (default .)")
    w.add_argument("--table", help="draw the figures from this results table (of this experiment) instead of "
                                   "collecting the job results")
    w.add_argument("--status", action="store_true", help="print each stage's jobs: done, missing, failed, running")
    w.add_argument("--verify", action="store_true", help="check every checkpoint, curve state and result file; "
                                                         "move damaged ones aside (the next --run redoes them)")

    c = p.add_argument_group("cluster (Slurm)")
    c.add_argument("--generate-slurm-scripts", action="store_true", help="also write <stage>.sbatch job arrays")
    c.add_argument("--submit", action="store_true", help="sbatch the generated arrays, metrics after training")
    c.add_argument("--jobs-per-task", type=int, default=1, help="jobs packed into one array task (default 1)")
    c.add_argument("--array-parallelism", type=int, help="at most this many array tasks at once (%%P)")
    c.add_argument("--time", help="#SBATCH --time, e.g. 02:00:00 (--executor slurm: 60 minutes per task if not "
                                  "given; tasks requeue on timeout and resume)")
    c.add_argument("--cpus-per-task", type=int, help="#SBATCH --cpus-per-task")
    c.add_argument("--mem", help="#SBATCH --mem, e.g. 8G")
    c.add_argument("--gpus", type=int, help="#SBATCH --gpus")
    c.add_argument("--partition", help="#SBATCH --partition")
    c.add_argument("--account", help="#SBATCH --account")
    c.add_argument("--qos", help="#SBATCH --qos")
    c.add_argument("--env-setup", help="a line run before each task, e.g. 'source .venv/bin/activate'")
    c.add_argument("--python", help="python named in the scripts (default: this interpreter's absolute path, or "
                                    "`python` with --env-setup)")
    return p


LIST_FIELDS = {"widths": int, "batch_sizes": int, "lrs": float, "weight_decays": float, "train_fractions": float,
               "label_noises": float, "seeds": int}


def _number(field: str, text: str, kind: type):
    try:
        value = float(text)
    except ValueError:
        raise SpecError(field, f"{text!r} is not a number") from None
    if kind is int:
        if not value.is_integer():
            raise SpecError(field, f"{text!r} is not an integer")
        return int(value)
    return value


def _option_value(text: str):
    """'3' -> 3, '0.1' -> 0.1, 'true' -> True, anything else stays text (YAML scalar rules)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _key_values(field: str, items: list[str]) -> dict:
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise SpecError(field, f"{item!r} is not of the form KEY=VALUE")
        out[k] = _option_value(v)
    return out


def spec_from_args(args: argparse.Namespace) -> ExperimentSpec:
    data: dict = {}
    if args.preset:
        data.update(PRESET_SPECS[args.preset])
    if args.spec:
        data.update(ExperimentSpec.from_file(args.spec).to_dict())
    scalar = {"name": str, "arch": str, "dataset": str, "data_root": str, "load_axis": str,
              "temperature_axis": str, "schedule": str, "optimizer": str, "regularizer": str, "ensemble": str,
              "dtype": str, "metric_checkpoint": str, "autocast": str}
    for field in scalar:
        value = getattr(args, field)
        if value is not None:
            data[field] = value
    if args.deterministic:
        data["deterministic"] = True
    if args.track is not None:
        given = data.get("track")
        data["track"] = {**(given if isinstance(given, dict) else {}), **_key_values("track", args.track)}
    if args.epochs is not None:
        data["epochs"] = _number("epochs", args.epochs, int)
    if args.max_runs is not None:
        data["max_runs"] = _number("max_runs", args.max_runs, int)
    for field, kind in LIST_FIELDS.items():
        values = getattr(args, field)
        if values is None:
            continue
        if len(values) == 1 and field in PRESETS and not values[0].lstrip("-").replace(".", "", 1).replace(
                "e", "", 1).isdigit():
            data[field] = preset(field, values[0])
        else:
            data[field] = [_number(field, v, kind) for v in values]
    if args.optimizer_option:
        data["optimizer_options"] = {**data.get("optimizer_options", {}),
                                     **_key_values("optimizer_options", args.optimizer_option)}
    if args.regularizer_option:
        data["regularizer_options"] = {**data.get("regularizer_options", {}),
                                       **_key_values("regularizer_options", args.regularizer_option)}
    metric_options = {k: dict(v) for k, v in data.get("metric_options", {}).items()}
    for item in args.metric_option:
        dotted, eq, v = item.partition("=")
        metric, dot, opt = dotted.partition(".")
        if not (eq and dot and metric and opt):
            raise SpecError("metric_options", f"{item!r} is not of the form METRIC.KEY=VALUE")
        metric_options.setdefault(metric, {})[opt] = _option_value(v)
    if metric_options:
        data["metric_options"] = metric_options
    if args.metrics:
        extra = [m for m in args.metrics if m != TRAIN]
        data["metrics"] = list(dict.fromkeys([*data.get("metrics", ExperimentSpec.metrics), *extra]))
    if "name" not in data:
        data["name"] = "demo"
    return check(ExperimentSpec.from_dict(data))


def slurm_options(args, root: Path) -> SlurmOptions:
    """The cluster options of the command line, each checked (`SlurmOptions`). The tasks' python is
    --python, else the env-setup's `python` when --env-setup is given, else this interpreter's
    absolute path; a file --env-setup sources by a relative path must exist under the study root,
    where the tasks run. Their device is --device where jobs run as tasks (`uses_tasks`)."""
    python = args.python or ("python" if args.env_setup else sys.executable)
    options = SlurmOptions(jobs_per_task=args.jobs_per_task, parallelism=args.array_parallelism, time=args.time,
                           cpus_per_task=args.cpus_per_task, mem=args.mem, gpus=args.gpus, partition=args.partition,
                           account=args.account, qos=args.qos, env_setup=args.env_setup, python=python,
                           device=args.device if uses_tasks(args) else None)
    if args.env_setup:
        try:
            words = shlex.split(args.env_setup)
        except ValueError as exc:
            raise SpecError("env_setup", f"{args.env_setup!r} is not a shell command line ({exc})") from None
        for command, target in zip(words, words[1:]):
            if command in ("source", ".") and not os.path.isabs(target) and not (Path(root) / target).exists():
                raise SpecError("env_setup", f"{target!r} does not exist under the study root {Path(root).resolve()} "
                                             "(the tasks run there): give an absolute path or one relative to --root")
    return options


def uses_pool(args) -> bool:
    """Whether `--run` runs the jobs in a local pool of worker processes (`local_pool.run_pool`): one of
    several workers (cores, or GPUs x --workers-per-gpu)."""
    return args.executor == "local" and pool_size(args.workers, args.device or "cpu", args.workers_per_gpu) > 1


def uses_tasks(args) -> bool:
    """Whether jobs may run as array or submitit tasks (`SlurmOptions`): Slurm scripts, --submit, or a
    submitit executor."""
    return args.executor in ("slurm", "submitit-local") or args.submit or args.generate_slurm_scripts


def check_devices(args) -> None:
    """--device, --workers and --workers-per-gpu, before anything is written (whether or not the jobs run
    here): the device's spelling, and that this machine has it unless the jobs run on a cluster only
    (Slurm scripts, --submit, --executor slurm), whose nodes have the GPUs a login node may lack
    (`SlurmOptions` checks --gpus there)."""
    if args.workers_per_gpu < 1:
        raise SpecError("workers_per_gpu", f"{args.workers_per_gpu} must be an integer >= 1")
    if args.workers is not None and args.workers < 1:
        raise SpecError("workers", f"{args.workers} must be an integer >= 1 (or left out: one per core)")
    device = args.device or "cpu"
    on_cluster = args.executor == "slurm" or args.submit or args.generate_slurm_scripts
    if (args.run and args.executor != "slurm") or not on_cluster:
        check_device(device)
    else:
        parse_device(device)


def executor_for(args, pool=None) -> Executor:
    """The executor `--executor` names (`pool`: the worker pool started for `uses_pool`)."""
    if uses_pool(args):
        return LocalPool(args.workers, pool, args.device or "cpu", args.workers_per_gpu)
    if args.executor in ("inprocess", "local"):
        return InProcess(args.device or "cpu")
    return Submitit(args.executor, slurm_options(args, Path(args.root)))


def run_stages(study: Study, stages, args, pool=None) -> int:
    """Run the stages with the chosen executor; print one line per stage; return the failures."""
    start = time.perf_counter()
    reports = study.run(stages, executor_for(args, pool))
    failed = 0
    for stage, report in reports.items():
        print(f"{stage}: {report.done} done, {report.skipped} skipped, {len(report.failed)} failed", flush=True)
        for job, exc in report.failed:
            print(f"  FAILED {job.id}: {exc}", file=sys.stderr)
            if getattr(exc, "trace", ""):
                print(exc.trace, file=sys.stderr, end="")
        failed += len(report.failed)
    print(f"ran {len(stages)} stage(s) in {time.perf_counter() - start:.1f} s")
    return failed


def collect(study: Study):
    """Collect every job's rows (plus each cell's phase rows) into results.csv."""
    df = study.table()
    print(f"table: {os.path.relpath(study.layout.table_path)} ({len(df)} rows)")
    return df


def draw(study: Study, df) -> None:
    """The study's figures and tables (`Study.save_figures`), the correlations and Hessian densities
    drawn by a forked process (`in_forked_process`) while this one draws the phase diagram."""
    study.save_figures(df, side=in_forked_process)


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] and words[0] in COMMANDS:
        return COMMANDS[words[0]][0](words[1:])
    try:
        args = build_parser().parse_args(argv)
        if args.list_metrics or args.list_methods:
            print((metric_table() if args.list_metrics else "") + (method_table() if args.list_methods else ""), end="")
            return 0
        if not args.root:
            raise SpecError("root", "must not be empty (use . for the current folder)")
        check_devices(args)
        study = Study(spec_from_args(args), args.root)
        study.layout.check_writable_tree()
        with (start_pool(args.workers, args.device or "cpu", args.workers_per_gpu) if args.run and uses_pool(args)
              else contextlib.nullcontext()) as pool:
            return _check_write_run_draw(args, study, pool)
    except (SpecError, CorruptFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            print(f"error: cannot write{where}: {exc.strerror} (disk, quota or file size limit full); files written before "
                  "are intact, rerun the same command once there is room", file=sys.stderr)
        else:
            print(f"error: cannot write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()


def interrupted() -> int:
    """Ctrl-C: the one line and exit status 130 (128 + SIGINT). Every write is atomic and removes its
    temporary file when interrupted, and every job is resumable, so the rerun completes the work."""
    print(INTERRUPTED, file=sys.stderr)
    return 130


FIGURE_FORMATS = ("png", "pdf", "svg")


def build_diagnose_parser() -> argparse.ArgumentParser:
    p = Parser(prog="phasediagram diagnose", description="Place trained models (seeds of one setting) on a finished "
               "study's phase map: their phase metrics, phase, and what the phase suggests.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoints (.pt) of one setting, one per seed")
    p.add_argument("--study", help="the study's folder, <root>/checkpoint/<name>")
    p.add_argument("--root", default=".", help="with --name: the folder holding checkpoint/ (default .)")
    p.add_argument("--name", help="with --root: the study's experiment name")
    p.add_argument("--device", default="cpu", help="torch device the metrics run on (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as each job of the default local pool: float32 values then "
                        "equal the study's own)")
    p.add_argument("--figure", help="write the phase map with the models' marker here (.png, .pdf or .svg)")
    p.add_argument("--reference", help="instead of a study, a published reference of labelled cells: model-diagnosis "
                   "(ResNet18 on CIFAR-10, Zhou et al. 2024); --root then holds data/")
    p.add_argument("--question", action="append", metavar="Q",
                   help="ask only this failure-source question (temperature, width_vs_temperature, "
                        "data_vs_temperature; repeatable; default: every one the reference answers)")
    p.add_argument("--dataset", help="with --reference: the data the models were trained on (default: the reference's)")
    p.add_argument("--data-root", help="with --reference: the folder holding that dataset's files (as the spec's "
                                       "data_root; CIFAR-10: cifar-10-batches-py)")
    return p


def diagnose_command(argv) -> int:
    """`phasediagram diagnose CHECKPOINT ... --study DIR`: print the models' metrics, phase and advice;
    bad input gives one line and exit status 2, with nothing written."""
    try:
        args = build_diagnose_parser().parse_args(argv)
        if (args.study is not None) + (args.name is not None) + (args.reference is not None) != 1:
            raise SpecError("study", "give the study as --study <root>/checkpoint/<name> or as --root R --name N, or "
                                     "a published --reference")
        if args.figure and Path(args.figure).suffix.lower().lstrip(".") not in FIGURE_FORMATS:
            raise SpecError("figure", f"{args.figure!r} must end in one of .{', .'.join(FIGURE_FORMATS)}")
        if args.reference is not None and args.figure:
            raise SpecError("figure", "--figure draws a study's phase map: give --study, not --reference")
        if args.reference is None and (args.dataset is not None or args.data_root is not None):
            raise SpecError("dataset", "--dataset and --data-root go with --reference (a study measures on its own "
                                       "dataset)")
        from phasediagram.failure import diagnose_failure

        device = check_device(args.device)
        if args.reference is not None:
            failure = diagnose_failure(args.checkpoints, args.reference, args.root, device, args.threads,
                                       args.question, args.dataset, data_root=args.data_root)
            print(failure.summary())
            return 0
        study = Path(args.study) if args.study else Path(args.root) / "checkpoint" / args.name
        result = diagnose(args.checkpoints, study, device=device, threads=args.threads)
        failure = diagnose_failure(args.checkpoints, study, device=device, threads=args.threads,
                                   questions=args.question, measured=result.rows)
        print(result.summary())
        print(failure.summary(with_phase=False))
        if args.figure:
            from phasediagram.analysis.plots import save_figure

            fmt = Path(args.figure).suffix.lower().lstrip(".")
            for path in save_figure(result.figure(), args.figure, formats=(fmt,)):
                print(f"figure: {os.path.relpath(path)}")
        return 0
    except (SpecError, CorruptFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or 'diagnose'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()


# the commands other than the study's own (main's options): {name: (function of its arguments, its parser)};
# `main` dispatches on the first word, and `--help` lists them
COMMANDS = {"diagnose": (diagnose_command, build_diagnose_parser)}


def commands_help() -> str:
    """The other commands, as `--help` lists them: each with its parser's description."""
    lines = ["other commands (each with its own --help):"]
    for name, (_, parser) in COMMANDS.items():
        lines.append(textwrap.fill(f"{name}: {parser().description}", width=100, initial_indent="  ",
                                   subsequent_indent="    "))
    return "\n".join(lines)


def console(argv=None) -> int:
    """`main` for a process that ends when it returns (through `phasediagram.__main__.console`: the
    `phasediagram` script, example_experiment.py, `python -m phasediagram`): what is then still alive is frozen (`freeze_alive`), so the
    interpreter's exit skips it in its last garbage collection (bench/bench_exit.py)."""
    status = main(argv)
    freeze_alive()
    return status


def reads_only(args) -> bool:
    """Whether the command only reads the study (drawing, status, verification): then it writes
    neither spec.json nor the scripts."""
    writes = args.run or args.submit or args.generate_slurm_scripts
    return bool(args.plot or args.table or args.status or args.verify) and not writes


def read_table(args, study: Study):
    """--table, validated (`analysis.table.read`), with each cell's phase rows; a row count that differs
    from the study's result files is reported."""
    from phasediagram.analysis import phases, table

    df = table.read(args.table, study.spec.name)
    on_disk = table.count_rows(study.layout, study.spec.name)
    own = int((df["source"] != phases.PHASE_SOURCE).sum())
    if on_disk and own != on_disk:
        print(f"warning: {args.table} holds {own} result rows, the study's result files {on_disk}: it is not "
              "the current table (--plot without --table collects it)", file=sys.stderr)
    return phases.with_phases(df[df["source"] != phases.PHASE_SOURCE])


def _check_write_run_draw(args, study: Study, pool) -> int:
    """main's work once the spec and folder are valid; `pool`: the worker pool, started first so its
    processes import torch while the dataset is checked here. Everything given is checked before
    the first file is written."""
    layout = study.layout
    options = slurm_options(args, layout.root)
    given_table = read_table(args, study) if args.table else None
    if reads_only(args):
        if layout.spec_path.exists():
            study.spec = merged_spec(study.spec, layout)
        elif not args.table:
            raise SpecError("name", f"no study {study.spec.name!r} under {layout.root} (no {layout.spec_path})")
        return _read(args, study, given_table)
    if args.run or args.submit:
        dataset_for(study.spec, study.spec.cells()[0], layout)  # a bad dataset folder fails here
    stages = study.checked_stages(args.metrics)
    slurm = bool(args.generate_slurm_scripts or args.submit)
    if args.executor == "slurm" and not slurm:
        study.check_cluster(stages, options)
    for path in study.write_scripts(stages, options, args.device or "cpu", slurm):
        print(f"wrote {os.path.relpath(path)}")
    failed = 0
    if args.submit:
        study.submit(stages)
    if args.run:
        keep_freed_memory()  # for in-process runs; pool and array workers set it themselves
        failed = run_stages(study, stages, args, pool)
        if pool is not None:
            pool.shutdown()  # before the figures: no idle workers, and no pool threads when a figure forks
    if given_table is not None:
        draw(study, given_table)
    elif args.run or args.plot:
        draw(study, collect(study))
    return 1 if failed else 0


def _read(args, study: Study, given_table) -> int:
    """The read-only actions: --verify, --status, then the figures of --plot or --table."""
    remove_stale_temporaries(study.layout)
    damaged = 0
    if args.verify:
        problems = study.verify()
        for line in problems:
            print(f"damaged: {line}", file=sys.stderr)
        print(f"verify: {len(problems)} damaged file(s) moved aside" + (", redone by the next --run" if problems
                                                                         else ""))
        damaged = len(problems)
    if args.status:
        print(study.status().to_string(index=False))
        for failure in study.failures():
            print(f"failed {failure['job']}: {failure['error']}")
            for line in failure.get("trace", [])[-5:]:
                print(f"    {line}")
    if given_table is not None:
        draw(study, given_table)
    elif args.plot:
        draw(study, collect(study))
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(console())
