"""Reading a checkpoint through the command line (eval, resume): it never runs code
(only plain data is unpickled), and one lacking a key or holding the wrong types stops
with one line on stderr and exit code 2."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import one_error_line

from sigprop.cli import main

pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


class Payload:
    """Unpickling this calls os.system: what a hostile checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_a_checkpoint_never_runs_code(in_tmp, capsys, writer, fake_fashion, finished):
    marker = in_tmp / "pwned"
    evil = {"format": 1, "epoch": 1, "config": {}, "payload": Payload(marker)}
    path = in_tmp / "evil.pt"
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    line = one_error_line(capsys, main(["eval", str(path)]))
    assert "refusing to load" in line or "unreadable" in line
    assert not marker.exists()
    # the same file as a run's checkpoint, on resume
    (finished / "checkpoint.pt").write_bytes(path.read_bytes())
    one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                 "--no-progress"]))
    assert not marker.exists()


def test_checkpoint_refusal_names_the_global(in_tmp, capsys):
    torch.save({"format": 1, "payload": Payload(in_tmp / "m")}, in_tmp / "evil.pt")
    line = one_error_line(capsys, main(["eval", "evil.pt"]))
    assert "refusing to load" in line and "system" in line


@pytest.mark.parametrize("drop", ["config", "rule", "rng", "history", "epoch"])
def test_checkpoint_lacking_a_key_is_one_line(finished, capsys, drop):
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    del state[drop]
    torch.save(state, finished / "checkpoint.pt")
    assert repr(drop) in one_error_line(capsys, main(["eval", str(finished)]))
    assert repr(drop) in one_error_line(capsys, main(
        ["train", "--resume", "--run-dir", str(finished), "--no-progress"]))


def test_checkpoint_with_wrong_types_is_one_line(finished, capsys):
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    state["rule"] = {"modules": [], "optimizers": 3}
    torch.save(state, finished / "checkpoint.pt")
    assert "modules or optimizers" in one_error_line(capsys, main(["eval", str(finished)]))
    state["rule"] = "weights"
    torch.save(state, finished / "checkpoint.pt")
    assert "'rule'" in one_error_line(capsys, main(["eval", str(finished)]))
