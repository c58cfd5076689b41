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
