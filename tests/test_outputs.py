"""What the commands write: output locations checked before any work, a write the
system refuses (a full disk, no permission) as one line with what was kept, strict
JSON, and records read back without trust (damaged metrics marked, checkpoints whose
content does not match their digest refused)."""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import FAST, one_error_line

from sigprop.cli import main
from sigprop.engine import runio
from sigprop.errors import CheckpointError

# a reproduction of one short run
ONE_RUN = """\
name = "one"
title = "one run"
source = "nowhere"
metric = "test_error"

[defaults]
data = { dataset = "fashion-mnist", batch_size = 64, train_limit = 256, test_limit = 100 }
model = { network = "fc-1x16" }

[[columns]]
key = "backprop"
label = "BP"
rule = { name = "backprop" }

[[rows]]
key = "fc"
label = "FC"
paper = { backprop = 1.0 }

[budgets.full]
seeds = [0]
[budgets.quick]
seeds = [0]
[budgets.smoke]
seeds = [0]
train = { epochs = 1 }
"""
BENCH = ["bench", "--network", "fc-2x16", "--input", "1x8x8", "--rules", "backprop",
         "--steps", "1", "--repeats", "1", "--warmup", "0", "--batch-size", "8"]


pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


def _train(data: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data-dir", str(data), "--run-dir", str(run), *FAST, *extra])


@pytest.fixture
def read_only(tmp_path):
    """A folder nobody may write to (skipped where permissions do not bind: root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("permission bits do not bind this user (root)")
    yield folder
    folder.chmod(0o755)


# --------------------------------------------------------------------------- locations


@pytest.mark.parametrize("target,match", [
    ("afile/x.json", "would lie below afile, which is a file"),
    ("afolder", "is a folder; give a file name"),
    ("missing/x.json", "its folder missing does not exist"),
    ("", "--json is empty"),
    ("x" * 300 + ".json", "more than the 255 a name may have"),
])
def test_bench_json_location_is_checked_before_the_benchmark(capsys, in_tmp, target, match):
    (in_tmp / "afile").write_text("")
    (in_tmp / "afolder").mkdir()
    line = one_error_line(capsys, main([*BENCH, "--json", target]))
    assert match in line
    assert capsys.readouterr().out == ""  # nothing measured


def test_bench_json_into_a_read_only_folder(capsys, read_only):
    line = one_error_line(capsys, main([*BENCH, "--json", str(read_only / "x.json")]))
    assert "no permission" in line


def test_bench_json_is_strict(in_tmp):
    assert main([*BENCH, "--json", "b.json"]) == 0
    json.loads((in_tmp / "b.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))


@pytest.mark.parametrize("argv,match", [
    (["report", "afile"], "the report folder afile is a file"),
    (["report", ""], "the report folder is empty"),
    (["report", "afile/sub"], "below afile, which is a file"),
    (["plot", "run", "--out", "afile"], "--out afile is a file"),
    (["plot", "run", "--out", "afile/plots"], "below afile, which is a file"),
    (["plot", "afile"], "afile/plots would lie below afile, which is a file"),
    (["reproduce", "table6-fmnist", "--budget", "smoke", "--out", ""], "--out is empty"),
    (["reproduce", "table6-fmnist", "--budget", "smoke", "--out", "afile"],
     "--out afile is a file"),
])
def test_output_locations_are_refused_in_one_line(capsys, in_tmp, argv, match):
    (in_tmp / "afile").write_text("")
    (in_tmp / "run").mkdir()
    line = one_error_line(capsys, main(argv))
    assert match in line


def test_reproduce_refuses_a_training_runs_folder(capsys, in_tmp, fake_fashion):
    assert _train(fake_fashion, in_tmp / "trun", "--epochs", "1") == 0
    capsys.readouterr()
    before = sorted(p.name for p in (in_tmp / "trun").iterdir())
    line = one_error_line(capsys, main(["reproduce", "table6-fmnist", "--budget", "smoke",
                                        "--data-dir", str(fake_fashion.parent), "--out",
                                        "trun"]))
    assert "is a training run's folder" in line
    assert sorted(p.name for p in (in_tmp / "trun").iterdir()) == before


def test_plot_that_draws_nothing_fails(capsys, in_tmp, monkeypatch, fake_fashion):
    assert _train(fake_fashion, in_tmp / "r", "--epochs", "1") == 0
    capsys.readouterr()
    from sigprop.experiments import plots
    monkeypatch.setattr(plots, "learning_curves", lambda *a, **k: None)
    monkeypatch.setattr(plots, "exit_curves", lambda *a, **k: None)
    line = one_error_line(capsys, main(["plot", "r", "--out", "p"]))
    assert "nothing to plot" in line


# --------------------------------------------------------------------------- failed writes


def _disk_full_after(monkeypatch, good_writes: int) -> None:
    """Every atomic write after the first ``good_writes`` fails as on a full disk."""
    real = os.fsync
    count = [0]

    def fsync(fd):
        count[0] += 1
        if count[0] > good_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(runio.os, "fsync", fsync)


def test_a_full_disk_in_a_fresh_run_leaves_nothing(capsys, in_tmp, monkeypatch, fake_fashion):
    _disk_full_after(monkeypatch, 1)  # config.json is written; the first checkpoint fails
    line = one_error_line(capsys, _train(fake_fashion, in_tmp / "new" / "run",
                                         "--epochs", "2"))
    assert "cannot write" in line and "checkpoint.pt" in line and "the disk is full" in line
    assert "nothing of this run was kept" in line
    assert not (in_tmp / "new").exists()  # the folders it made are gone
    assert not list(in_tmp.rglob(".*.tmp"))


def test_a_full_disk_later_keeps_the_last_checkpoint(capsys, in_tmp, monkeypatch, fake_fashion):
    run = in_tmp / "run"
    assert _train(fake_fashion, run, "--epochs", "1") == 0
    kept = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    _disk_full_after(monkeypatch, 1)  # config.json again; the epoch-2 checkpoint fails
    line = one_error_line(capsys, _train(fake_fashion, run, "--epochs", "2", "--resume"))
    assert "the checkpoint after epoch 1 is intact" in line
    assert f"sigprop train --resume --run-dir {run}" in line
    assert (run / "checkpoint.pt").read_bytes() == kept
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()
    assert _train(fake_fashion, run, "--epochs", "2", "--resume") == 0


def test_a_refused_report_write_is_one_line(capsys, in_tmp, monkeypatch, fake_fashion):
    out = in_tmp / "out"
    _finished_reproduction(capsys, out, fake_fashion)
    _disk_full_after(monkeypatch, 0)
    line = one_error_line(capsys, main(["report", str(out)]))
    assert "cannot write" in line and "the disk is full" in line


# --------------------------------------------------------------------------- read back


def _finished_reproduction(capsys, out: Path, fake_fashion: Path) -> None:
    path = out.parent / "one.toml"
    path.write_text(ONE_RUN)
    assert main(["reproduce", str(path), "--budget", "smoke", "--data-dir",
                 str(fake_fashion.parent), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("damage", [
    lambda r: {**r, "test_acc": float("nan")},
    lambda r: {**r, "test_acc": float("-inf")},
    lambda r: {**r, "test_acc": 7.5},
    lambda r: {k: v for k, v in r.items() if k != "test_acc"},
    lambda r: {**r, "test_acc": "0.9"},
])
def test_damaged_metrics_are_marked_in_the_report(capsys, in_tmp, fake_fashion, damage):
    out = in_tmp / "out"
    _finished_reproduction(capsys, out, fake_fashion)
    run = next((out / "runs").iterdir())
    path = run / runio.METRICS_JSONL
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-1] = damage(records[-1])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "unreadable" in report or "damaged" in report
    assert "nan" not in report.lower().replace("n/a", "")
    text = (out / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))


def test_a_huge_seed_in_the_manifest_is_one_line(capsys, in_tmp, fake_fashion):
    out = in_tmp / "out"
    _finished_reproduction(capsys, out, fake_fashion)
    manifest = json.loads((out / "reproduce.json").read_text())
    manifest["runs"].append("fc_backprop_s" + "9" * 5000)
    (out / "reproduce.json").write_text(json.dumps(manifest))
    assert main(["report", str(out)]) == 0  # a run id it does not plan is not reported


@pytest.mark.parametrize("what", ["config.json", "reproduce.json", "stages.json"])
def test_deeply_nested_records_are_one_line(capsys, in_tmp, fake_fashion, what):
    path = in_tmp / what
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        runio.read_json(path)


def _flip_tensor_bytes(path: Path) -> None:
    """Flip two bytes inside the stored data of the checkpoint's largest tensor."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # local header: 30 bytes + name + extra, then the stored bytes
    start = info.header_offset + 30 + len(info.filename.encode()) + \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    mid = start + info.file_size // 2
    data[mid] ^= 0x40
    data[mid + 1] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_found(capsys, in_tmp, fake_fashion):
    run = in_tmp / "run"
    assert _train(fake_fashion, run, "--epochs", "1") == 0
    capsys.readouterr()
    runio.load_checkpoint(run / "checkpoint.pt")  # intact: loads
    _flip_tensor_bytes(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not match the digest"):
        runio.load_checkpoint(run / "checkpoint.pt")
    config = (run / "config.json").read_text()
    line = one_error_line(capsys, _train(fake_fashion, run, "--epochs", "2", "--resume"))
    assert "does not match the digest" in line
    assert (run / "config.json").read_text() == config  # nothing changed before the check
    line = one_error_line(capsys, main(["eval", str(run)]))
    assert "does not match the digest" in line


def test_checkpoints_from_before_digests_still_load(in_tmp, fake_fashion):
    run = in_tmp / "run"
    assert _train(fake_fashion, run, "--epochs", "1") == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["digest"]
    torch.save(state, run / "checkpoint.pt")
    assert runio.load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
