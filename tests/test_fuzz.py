"""Fuzzing: every spec and every command line gives a valid spec or a clear error, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phasediagram import cli
from phasediagram.errors import SpecError
from phasediagram.spec.experiment import ExperimentSpec

FIELDS = [f for f in ExperimentSpec.__dataclass_fields__]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 5000), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["mlp", "resnet1d", "cifar10", "mnist1d", "step", "sgd",
                                                           "loss_acc", "dist", "width", "lr", "efficient_fine"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
specs = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), values, max_size=6)
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_FILES = settings(FUZZ, max_examples=300)  # each example writes and parses a file


@FUZZ
@given(specs)
def test_spec_loader_gives_a_spec_or_a_spec_error(data):
    try:
        spec = ExperimentSpec.from_dict(data)
    except SpecError as exc:
        assert str(exc) and exc.field
        return
    assert ExperimentSpec.from_dict(json.loads(spec.to_json())) == spec


@FUZZ
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin1"))),
       st.sampled_from([".json", ".yaml"]))
def test_spec_files_give_a_spec_or_a_spec_error(tmp_path_factory, text, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        ExperimentSpec.from_file(path)
    except SpecError as exc:
        assert str(exc)


FLAGS = ["--name", "--arch", "--dataset", "--widths", "--batch-sizes", "--lrs", "--weight-decays", "--seeds",
         "--epochs", "--schedule", "--optimizer", "--regularizer", "--metrics", "--metric-option",
         "--optimizer-option", "--regularizer-option", "--train-fractions", "--label-noises", "--load-axis",
         "--temperature-axis", "--ensemble", "--dtype", "--executor", "--jobs-per-task", "--array-parallelism",
         "--preset", "--generate-slurm-scripts", "--time", "--mem", "--partition", "--env-setup", "--bogus"]
WORDS = ["0", "1", "2", "-3", "2.5", "1e9", "nan", "inf", "x", "", "mlp", "resnet1d", "vgg", "train", "loss_acc",
         "dist", "hessian", "CKA", "sam", "infomcr", "demo", "tiny", "reference", "efficient_fine", "coarse",
         "hessian.top_k=0", "CKA.mixup_alpha=-1", "rho=0.1", "a=b=c", "lr", "width", "../x", "a b; rm -rf /",
         "$(id)", "16", "64", "4096"]


@FUZZ
@given(st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(WORDS)), max_size=10))
def test_command_line_gives_success_or_exit_2(tmp_path_factory, argv):
    root = tmp_path_factory.getbasetemp() / "cli"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*argv, "--root", str(root), "--name", "fuzz"] if "--name" not in argv
                        else [*argv, "--root", str(root)])
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("error: ") and "Traceback" not in err.getvalue()


yaml_atoms = st.sampled_from(["1", "x", "mlp", "[4, 8]", "null", "&a 3", "*a", "&b [1, *b]", "{k: v}", "'q'",
                              "!!python/object:os.system x", "name", "epochs"])


@st.composite
def yaml_documents(draw):
    """YAML built from nested flow and block collections, anchors, aliases and repeated keys."""
    depth = draw(st.integers(0, 60))
    inner = draw(yaml_atoms)
    flow = draw(st.booleans())
    if flow:
        return "name: " + "[" * depth + inner + "]" * depth + "\n" + draw(st.sampled_from(["", "name: y\n"]))
    lines = [f"{'  ' * i}{draw(st.sampled_from(['a', 'name', 'epochs']))}:" for i in range(depth)]
    return "\n".join([*lines, "  " * depth + inner]) + "\n" + draw(st.sampled_from(["", "x: *a\n", "a: &a 1\n"]))


@FUZZ_FILES
@given(yaml_documents())
def test_nested_and_aliased_yaml_gives_a_spec_or_a_spec_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz_nested.yaml"
    path.write_text(text)
    try:
        ExperimentSpec.from_file(path)
    except SpecError as exc:
        assert str(exc) and len(str(exc)) < 3000


TABLE_COLUMNS = ["experiment", "cell", "width", "batch_size", "lr", "weight_decay", "train_fraction", "label_noise",
                 "seed", "seed_b", "split", "metric", "coord", "value", "status", "source", "kind"]
cells = st.one_of(st.sampled_from(["", "0", "1", "4", "2.5", "-1", "nan", "inf", "x", "ok", "diverged", "value",
                                   "fuzz", "train", "loss", "1e308", '"', ",", "\n"]), st.text(max_size=6))


@FUZZ_FILES
@given(st.lists(st.sampled_from(TABLE_COLUMNS), min_size=0, max_size=20),
       st.lists(st.lists(cells, min_size=17, max_size=17), max_size=4))
def test_table_reader_gives_a_table_or_a_spec_error(tmp_path_factory, columns, rows):
    import csv

    from phasediagram.analysis import table

    path = tmp_path_factory.getbasetemp() / "fuzz_table.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns or TABLE_COLUMNS)
        for row in rows:
            writer.writerow(row[:len(columns or TABLE_COLUMNS)])
    try:
        df = table.read(path, "fuzz")
    except SpecError as exc:
        assert str(exc).startswith("table: ")
        return
    assert list(df["width"].dropna()) == [int(w) for w in df["width"].dropna()]
    assert set(df["status"]) <= {"ok", "diverged", "missing"}


@FUZZ_FILES
@given(st.fixed_dictionaries({}, optional={
    "jobs_per_task": st.one_of(st.integers(-3, 5), st.booleans(), st.text(max_size=3)),
    "parallelism": st.one_of(st.none(), st.integers(-3, 5)),
    "time": st.one_of(st.none(), st.sampled_from(["-5", "90", "1-00", "02:00:00", "x", "1:2:3:4", "\n"]),
                      st.text(max_size=8)),
    "cpus_per_task": st.one_of(st.none(), st.integers(-2, 3), st.floats()),
    "mem": st.one_of(st.none(), st.sampled_from(["8G", "junk", "500M", "-1G", ""]), st.text(max_size=5)),
    "gpus": st.one_of(st.none(), st.integers(-2, 3)),
    "partition": st.one_of(st.none(), st.text(max_size=8)),
    "env_setup": st.one_of(st.none(), st.text(max_size=10)),
    "python": st.one_of(st.just("python"), st.text(max_size=8))}))
def test_slurm_options_give_a_script_or_a_spec_error(options):
    from phasediagram.execution.scripts import SlurmOptions, slurm_script
    from phasediagram.storage.layout import Layout

    try:
        checked = SlurmOptions(**options)
    except SpecError as exc:
        assert str(exc) and exc.field
        return
    script = slurm_script(Layout(__import__("pathlib").Path("/tmp/fuzzroot"), "fuzz"), "train", 3, checked)
    assert all("\n" not in line and "\r" not in line for line in script.splitlines())
    assert script.startswith("#!")
