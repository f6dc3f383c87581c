"""The contract under hostile input, through the command line: every bad value, path or
file stops with one line on stderr and exit code 2, before anything is changed or left
half-written; checkpoints never run code; explicit data locations are used or fail; a
run folder holds one training at a time; resume changes only what it may."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import _idx, one_error_line, write_fake_fashion

import sigprop.engine.trainer  # noqa: F401  (imported at collection: see test_cli.py)
from sigprop.cli import main

FAST = ["--network", "fc-2x32", "--batch-size", "64", "--no-progress", "--lr", "5e-3"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, isolated_data):
    monkeypatch.chdir(tmp_path)
    return tmp_path




def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes (the lock file aside)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture
def finished(fake_fashion, in_tmp, capsys):
    """A finished 2-epoch run on the fake data."""
    run = in_tmp / "run"
    assert main(["train", "--data-dir", str(fake_fashion), "--epochs", "2", "--run-dir",
                 str(run), "--train-limit", "256", *FAST]) == 0
    capsys.readouterr()
    return run


# --------------------------------------------------------------------------- security


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


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("case", ["nonexistent", "empty folder", "a file", "missing one file",
                                  "data file is a folder"])
def test_explicit_data_dir_is_used_or_fails(in_tmp, capsys, fake_fashion, case):
    import shutil

    where = in_tmp / "data"
    if case == "empty folder":
        where.mkdir()
    elif case == "a file":
        where.write_text("x")
    elif case in ("missing one file", "data file is a folder"):
        shutil.copytree(fake_fashion, where)
        (where / "train-labels-idx1-ubyte.gz").unlink()
        if case == "data file is a folder":
            (where / "train-labels-idx1-ubyte.gz").mkdir()
    line = one_error_line(capsys, main(["train", "--data-dir", str(where), "--run-dir", "r",
                                        *FAST]))
    assert str(where) in line
    if case.startswith(("missing", "data file")):
        assert "train-labels-idx1-ubyte" in line
    assert not (in_tmp / "r").exists()  # nothing left behind


def test_eval_with_explicit_missing_data_dir_fails(finished, capsys):
    line = one_error_line(capsys, main(["eval", str(finished), "--data-dir", "/nonexistent"]))
    assert "/nonexistent" in line


def test_sigprop_data_env_is_used_or_fails(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("SIGPROP_DATA", str(in_tmp / "nowhere"))
    line = one_error_line(capsys, main(["train", "--run-dir", "r", *FAST]))
    assert "SIGPROP_DATA" in line and "nowhere" in line
    monkeypatch.setenv("SIGPROP_DATA", "d" * 5000)
    one_error_line(capsys, main(["train", "--run-dir", "r", *FAST]))
    assert not (in_tmp / "r").exists()


def test_config_records_the_files_read(finished, fake_fashion):
    import hashlib

    files = json.loads((finished / "config.json").read_text())["data_files"]
    assert set(files) == {"train", "test"}
    for rec in files["train"] + files["test"]:
        path = Path(rec["path"])
        assert path.parent == fake_fashion.resolve() or path.parent == fake_fashion
        assert rec["bytes"] == path.stat().st_size
        assert rec["md5"] == hashlib.md5(path.read_bytes()).hexdigest()
    assert {Path(r["path"]).name for r in files["test"]} == {
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}


def test_resume_on_other_data_is_refused(finished, in_tmp, capsys):
    other = write_fake_fashion(in_tmp / "other", seed=5)
    before = snapshot(finished)
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(finished),
                                        "--epochs", "3", "--data-dir", str(other),
                                        "--no-progress"]))
    assert "differ from the files this run was trained on" in line
    assert snapshot(finished) == before


def test_empty_test_split_fails_before_training(in_tmp, capsys):
    folder = write_fake_fashion(in_tmp / "d")
    empty = _idx(torch.zeros(0, 28, 28, dtype=torch.uint8).numpy(), 0x803)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(empty))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx(torch.zeros(0, dtype=torch.uint8).numpy(), 0x801)))
    t0 = time.perf_counter()
    line = one_error_line(capsys, main(["train", "--data-dir", str(folder), "--run-dir", "r",
                                        *FAST]))
    assert "no images" in line and time.perf_counter() - t0 < 10
    assert not (in_tmp / "r").exists()


# --------------------------------------------------------------------------- run folder


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {src!r})
    from sigprop.engine.runfolder import RunFolder
    held = RunFolder.acquire({run!r})
    print("held", flush=True)
    time.sleep(60)
""")


def test_two_trainings_into_one_folder(fake_fashion, in_tmp, capsys):
    run = in_tmp / "shared"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(src=SRC, run=str(run))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(capsys, main(["train", "--data-dir", str(fake_fashion),
                                            "--run-dir", str(run), "--epochs", "1", *FAST]))
        assert "in use by another training run" in line and f"pid {holder.pid}" in line
        assert snapshot(run) == {}
    finally:
        holder.kill()  # killed, not released: the OS drops the lock
        holder.wait()
    assert main(["train", "--data-dir", str(fake_fashion), "--run-dir", str(run),
                 "--epochs", "1", "--train-limit", "128", *FAST]) == 0


@pytest.mark.parametrize("case", ["a file", "below a file", "too long", "empty", "spaces",
                                  "cannot be created"])
def test_bad_run_dir_is_one_line_before_data(in_tmp, capsys, case, monkeypatch):
    (in_tmp / "f").write_text("x")
    run_dir = {"a file": "f", "below a file": "f/run", "too long": "x" * 300, "empty": "",
               "spaces": "  ", "cannot be created": "/proc/sigprop-run"}[case]
    read = []
    from sigprop.engine import trainer

    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: read.append(a) or 1 / 0)
    one_error_line(capsys, main(["train", "--run-dir", run_dir, *FAST]))
    assert read == []  # checked before any data is loaded
    assert sorted(p.name for p in in_tmp.iterdir()) == ["f"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to run a child as another user")
def test_unwritable_run_dir_is_one_line():
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="sigprop-ro-"))  # pytest's tmp is private (0700)
    try:
        base.chmod(0o755)
        locked = base / "ro"
        locked.mkdir(mode=0o555)
        code = (f"import sys; sys.path.insert(0, {SRC!r}); from sigprop.cli import main; "
                f"sys.exit(main(['train', '--run-dir', {str(locked / 'run')!r}, "
                "'--no-progress']))")
        try:
            out = subprocess.run([sys.executable, "-c", code], user="nobody",
                                 capture_output=True, check=False, text=True, timeout=120,
                                 env={**os.environ, "HOME": str(base)})
        except PermissionError:
            pytest.skip("this Python is not executable by another user here")
        if "No module named" in out.stderr or "Permission denied: '/root" in out.stderr:
            pytest.skip("the package is not importable as another user here")
        assert out.returncode == 2, out.stderr
        lines = out.stderr.splitlines()
        assert len(lines) == 1 and "cannot create run folder" in lines[0], out.stderr
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_run_dir_without_write_permission(in_tmp, capsys, monkeypatch):
    """The lock file cannot be created (EACCES, as for a non-root user in a 0555
    folder; root bypasses permission bits, so the refusal is simulated)."""
    from sigprop.engine import runfolder

    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith(runfolder.LOCK):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr(runfolder.os, "open", denied)
    (in_tmp / "ro").mkdir()
    line = one_error_line(capsys, main(["train", "--run-dir", "ro", *FAST]))
    assert "run folder ro is not writable (Permission denied)" in line
    line = one_error_line(capsys, main(["train", "--run-dir", "new/run", *FAST]))
    assert "not writable" in line and not (in_tmp / "new").exists()


def test_failed_fresh_run_leaves_no_folder(in_tmp, capsys):
    # no data visible: the run fails after taking its folder, which it then removes
    one_error_line(capsys, main(["train", "--run-dir", "deep/er/run", *FAST]))
    assert not (in_tmp / "deep").exists()


# --------------------------------------------------------------------------- resume


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


# --------------------------------------------------------------------------- values


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` and its value."""
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


@pytest.mark.parametrize("argv,match", [
    (["--dropout", "0.9999999"], "model.dropout"),
    (["--seed", "18446744073709551615"], "train.seed"),
    (["--seed", "-1"], "train.seed"),
    (["--weight-decay", "nan"], "rule.weight_decay must be a finite number"),
    (["--weight-decay", "inf"], "rule.weight_decay must be a finite number"),
    (["--lr", "inf"], "rule.lr must be a finite number"),
    (["--lr", "abc"], "rule.lr: expected float"),
    (["--logit-scale", "inf"], "rule.logit_scale must be a finite number"),
    (["--eta", "nan"], "rule.eta must be a finite number"),
    (["--epochs", "٣"], "train.epochs: expected int"),
    (["--lr", "５e-4"], "rule.lr: expected float"),
    (["--network", "fc-3x1000000000"], "fc-3x1000000000"),
    (["--network", "fc-99999999999999999999x2"], "fc-99999999999999999999x2"),
    (["--network", "fc-٣x32"], "fc-٣x32"),
    (["--augment", "crop100000"], "crop padding 100000"),
    (["--batch-size", "1"], "data.batch_size"),
    (["--run-dir", ""], "run_dir is empty"),
    (["--data-dir", ""], "data_dir is empty"),
])
def test_bad_values_stop_before_anything(in_tmp, capsys, argv, match, fake_fashion):
    t0 = time.perf_counter()
    line = one_error_line(capsys, main(["train", "--data-dir", str(fake_fashion),
                                        *_without(FAST, argv[0]), *argv]))
    assert match in line
    assert time.perf_counter() - t0 < 20  # refused, not allocated or looped
    assert not (in_tmp / "runs").exists() and not list(in_tmp.iterdir())


def test_huge_check_every_trains(fake_fashion, in_tmp, capsys):
    assert main(["train", "--data-dir", str(fake_fashion), "--check-every", "1000000000",
                 "--epochs", "1", "--train-limit", "256", "--run-dir", "r", *FAST]) == 0


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe[train]\n", "not UTF-8"),
    (b"[train\n", "not valid TOML"),
    (b"epochs = 3\n", "unknown config section [epochs]"),
])
def test_bad_config_files(in_tmp, capsys, content, match):
    (in_tmp / "c.toml").write_bytes(content)
    assert match in one_error_line(capsys, main(["train", "--config", "c.toml"]))


def test_config_at_a_directory(in_tmp, capsys):
    (in_tmp / "conf").mkdir()
    assert "is a directory" in one_error_line(capsys, main(["train", "--config", "conf"]))


@pytest.mark.parametrize("dest", ["a-file", "a-file/below"])
def test_download_dest_at_a_file(in_tmp, capsys, dest, monkeypatch):
    import sigprop.data.download as ds

    (in_tmp / "a-file").write_text("x")
    calls = []
    monkeypatch.setattr(ds, "URL_OPENER", lambda *a, **k: calls.append(a) or 1 / 0)
    one_error_line(capsys, main(["data", "download", "mnist", "--dest", dest]))
    assert calls == []  # refused before any network access


@pytest.mark.parametrize("flag", ["--stall-timeout", "--deadline"])
@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_download_limits_validated(capsys, flag, value):
    line = one_error_line(capsys, main(["data", "download", "mnist", flag, value]))
    assert flag in line


# --------------------------------------------------------------------------- messages


def test_interrupt_names_the_run_folder(fake_fashion, in_tmp, capsys, monkeypatch):
    from sigprop.engine.trainer import Trainer

    def interrupted(self, exp, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    rc = main(["train", "--data-dir", str(fake_fashion), "--run-dir", "my run", *FAST])
    err = capsys.readouterr().err.splitlines()
    assert rc == 130 and len(err) == 1
    assert "--resume --run-dir 'my run'" in err[0] and "DIR" not in err[0]


def test_interrupted_download_gives_no_training_advice(in_tmp, capsys, monkeypatch):
    import sigprop.data.download as ds

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ds, "URL_OPENER", interrupted)
    rc = main(["data", "download", "mnist", "--dest", "dl"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 130 and len(err) == 1
    assert "--resume" not in err[0] and "download" in err[0]
    assert not list((in_tmp / "dl").rglob("*.part"))


def test_error_with_progress_bar_gets_its_own_line(fake_fashion, in_tmp, capsys, monkeypatch):
    from sigprop.rules.sigprop import Sigprop

    orig = Sigprop.train_step

    def nan_step(self, x, y):
        losses, correct = orig(self, x, y)
        return losses * float("nan"), correct

    monkeypatch.setattr(Sigprop, "train_step", nan_step)
    args = [a for a in FAST if a != "--no-progress"]
    rc = main(["train", "--data-dir", str(fake_fashion), "--run-dir", "r", *args])
    err = capsys.readouterr().err
    assert rc == 2
    before, _, after = err.rpartition("sigprop: error: ")
    assert "became nan" in after and after.count("\n") == 1
    # the bar was cleared: the error starts a line (after a newline or carriage return)
    assert before.endswith("\r") and before.split("\r")[-2].strip() == ""


TRAIN_AND_WAIT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r})
    import sigprop.data.datasets as ds
    from sigprop.cli import main
    ds.SYSTEM_ROOT = ds.CACHE_ROOT = {nowhere!r}
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_stops_cleanly_and_resumes(fake_fashion, in_tmp):
    run = in_tmp / "run"
    code = TRAIN_AND_WAIT.format(src=SRC, nowhere=str(in_tmp / "none"))
    argv = [sys.executable, "-c", code, "train", "--data-dir", str(fake_fashion),
            "--run-dir", str(run), "--epochs", "500"]
    child = subprocess.Popen(argv + FAST, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 90
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (run / "checkpoint.pt").exists()
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "terminated" in lines[0]
    assert f"--resume --run-dir {run}" in lines[0]
    assert not [p for p in run.iterdir() if p.suffix == ".tmp"]  # no half-written file
    done = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert done >= 1
    # the lock went with the process: resume takes the folder at once
    out = subprocess.run([sys.executable, "-c", code, "train", "--resume", "--run-dir",
                          str(run), "--epochs", str(done + 1), "--no-progress"],
                         capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr
    assert f"resuming {run} after epoch {done}" in out.stdout
