"""Resuming a run through the command line changes only what it may: a shorter run,
other settings, other data or a damaged config.json are one line that leaves the
folder as it was; a config file that changes what resume may change is applied and
recorded."""

from __future__ import annotations

import json

import pytest
from helpers import one_error_line, snapshot, write_fake_fashion

from sigprop.cli import main

pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


def test_resume_on_other_data_is_refused(finished, in_tmp, capsys):
    other = write_fake_fashion(in_tmp / "other", seed=5)
    before = snapshot(finished)
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                        "--epochs", "3", "--data-dir", str(other),
                                        "--no-progress"]))
    assert "differ from the files this run was trained on" in line
    assert snapshot(finished) == before


def test_resume_cannot_shorten_a_run(finished, capsys):
    before = snapshot(finished)
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                        "--epochs", "1", "--no-progress"]))
    assert "fewer than the 2 epochs" in line
    assert snapshot(finished) == before


@pytest.mark.parametrize("flag,value", [("--lr", "0.1"), ("--network", "fc-2x64"),
                                        ("--rule", "backprop"), ("--seed", "5"),
                                        ("--dropout", "0.2"), ("--batch-size", "32")])
def test_resume_refuses_what_it_cannot_change(finished, capsys, flag, value):
    before = snapshot(finished)
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                        "--epochs", "3", flag, value, "--no-progress"]))
    assert "settings differ from the run's" in line
    assert snapshot(finished) == before


def test_resume_with_config_file_is_checked_too(finished, in_tmp, capsys):
    (in_tmp / "c.toml").write_text('[model]\nnetwork = "fc-1x8"\n')
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                        "--config", "c.toml", "--no-progress"]))
    assert "model.network 'fc-2x32' -> 'fc-1x8'" in line
    # a file changing only what resume may change is applied, and recorded
    (in_tmp / "c.toml").write_text("[train]\nepochs = 3\ncheck_every = 7\n")
    assert main(["train", "--resume", "--run-dir", str(finished), "--config", "c.toml",
                 "--no-progress"]) == 0
    assert "changed: train.epochs 2 -> 3; train.check_every 50 -> 7" in capsys.readouterr().out
    record = json.loads((finished / "config.json").read_text())
    assert record["config"]["train"]["epochs"] == 3
    assert record["resumes"][-1]["after_epoch"] == 2
    assert record["resumes"][-1]["changed"]["train.check_every"] == [50, 7]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"[1, 2]", b"{}", b'{"config": 3}',
                                     b'{"config": {"data": {}}}'])
def test_damaged_config_json_is_one_line(finished, capsys, content):
    (finished / "config.json").write_bytes(content)
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                        "--no-progress"]))
    assert "config.json" in line
    assert (finished / "config.json").read_bytes() == content
