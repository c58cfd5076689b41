"""Security: no pickle in our files, checkpoints load as weights only, paths stay inside the study."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re

import pytest
import torch

from phasediagram import cli
from phasediagram.errors import SpecError
from phasediagram.storage import checkpoints
from phasediagram.storage.layout import Layout

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "workspace" / "phasediagram"


def test_package_never_unpickles_except_through_the_allow_list():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "safepickle.py" and re.search(r"(?<![\w.])pickle\.(load|loads|Unpickler)\b", text):
            offenders.append(path.name)
        for line in text.splitlines():
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}: {line.strip()}")
    assert not offenders


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"model": Payload(str(marker)), "model_args": {}, "cell": {}, "seed": 0, "epoch": 0,
                "status": "ok"}, buf)
    import hashlib

    payload = buf.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(checkpoints.MAGIC + hashlib.sha256(payload).digest() + payload)  # a valid checksum even
    with pytest.raises(checkpoints.CorruptFile, match="unreadable payload"):
        checkpoints.load(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(checkpoints.CorruptFile, match="not a phasediagram checkpoint"):
        checkpoints.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../up", "/abs", "a/b", "..", "x" * 65, "", "-lead"])
def test_experiment_names_cannot_leave_the_study(tmp_path, capsys, name):
    assert cli.main(["--name", name, "--root", str(tmp_path), "--preset", "tiny"]) == 2
    assert "name:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_symlinked_experiment_folder_leading_outside_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "study"
    (root / "checkpoint").mkdir(parents=True)
    os.symlink(outside, root / "checkpoint" / "tiny")
    assert cli.main(["--preset", "tiny", "--root", str(root)]) == 2
    assert "leads outside" in capsys.readouterr().err
    assert not any(outside.iterdir())


def test_layout_refuses_escaping_relative_paths(tmp_path):
    layout = Layout(tmp_path, "x")
    for bad in ("../y", "/etc/passwd", "a/../../b"):
        with pytest.raises(SpecError):
            layout.inside(layout.exp_dir, bad)
    assert layout.inside(layout.exp_dir, "fig.png") == layout.exp_dir / "fig.png"
