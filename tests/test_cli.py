"""The command line, in process: exit codes, one-line errors, run folders, eval, data;
bad values stop before anything is changed; interrupts and errors are one line on
stderr that says how to go on."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import FAKE_TEST, FAKE_TRAIN, FAST, SRC, one_error_line

import sigprop.engine.trainer  # noqa: F401  (see below)
from sigprop.cli import main

# Imported here, at collection time: Trainer's ``out=sys.stdout`` default is bound when
# trainer.py is first imported (a bug, see test_epoch_lines_reach_captured_stdout). If
# that first import happened inside a test (cmd_train imports lazily), every later
# in-process run would print its epoch lines to that test's closed capture stream.

pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


@pytest.mark.parametrize("argv,match", [
    (["train", "--rule", "xfa"], "unknown rule 'xfa'"),
    (["train", "--lr", "-1"], "lr (the Adam learning rate) must be"),
    (["train", "--lr=-0.5"], "lr (the Adam learning rate) must be"),
    (["train", "--lr", "fast"], "rule.lr: expected float"),
    (["train", "--batch-size", "0"], "data.batch_size"),
    (["train", "--epochs", "0"], "train.epochs"),
    (["train", "--dropout", "1"], "model.dropout"),
    (["train", "--config", "missing.toml"], "missing.toml does not exist"),
    (["train", "--network", "mlp-3x10"], "unknown network 'mlp'"),
    (["train", "--network", "fc-3by10"], "bad fully connected architecture 'fc-3by10'"),
    (["train", "--resume"], "--resume needs --run-dir"),
    (["train", "--bogus-flag", "3"], "unrecognized arguments: --bogus-flag"),
    (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train", "--signal", "loop-pred"], "needs --head classifier"),
    (["train", "--head", "mlp"], "head must be"),
    (["train", "--fast-path", "maybe"], "fast_path must be"),
    (["train", "--device", "tpu"], "tpu"),
    (["train", "--schedule", "linear"], "train.schedule"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["eval"], "required"),
    (["eval", "no-such-run"], "no checkpoint"),
    (["data", "check", "imagenet"], "unknown dataset 'imagenet'"),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, in_tmp, argv, match):
    line = one_error_line(capsys, main(argv))
    assert match in line
    assert not (in_tmp / "runs").exists()  # nothing was started


def test_unknown_config_key_in_file(capsys, in_tmp):
    (in_tmp / "c.toml").write_text("[train]\nepochz = 3\n")
    line = one_error_line(capsys, main(["train", "--config", "c.toml"]))
    assert "unknown key train.epochz" in line


def test_missing_dataset_says_where_it_looked(capsys, in_tmp):
    empty = in_tmp / "empty"
    empty.mkdir()
    line = one_error_line(capsys, main(["train", "--data-dir", str(empty), *FAST]))
    assert "data_dir folder" in line and str(empty) in line  # only there: no fallback
    line = one_error_line(capsys, main(["data", "check", "mnist"]))
    assert "'mnist' not found" in line and "looked in" in line


@pytest.fixture
def trained(fake_fashion, in_tmp, capsys):
    """One CLI training run on the fake dataset: (run_dir, stdout)."""
    run = in_tmp / "run"
    rc = main(["train", "--data-dir", str(fake_fashion), "--epochs", "3", "--run-dir",
               str(run), "--seed", "1", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    return run, out


def final_acc(out: str) -> float:
    m = re.search(r"^test accuracy: (\d\.\d{4}) \(error", out, re.MULTILINE)
    assert m, out
    return float(m.group(1))


def test_train_writes_run_folder(trained):
    run, out = trained
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in records)
    acc = final_acc(out)
    assert acc == pytest.approx(records[-1]["test_acc"], abs=5e-5)
    assert acc > 0.8
    for name in ("layer1", "layer2"):
        assert re.search(rf"exit {name}\s+test accuracy \d\.\d{{4}}", out)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 3 and "test_acc_exits.layer2" in rows[0]
    assert [float(r["test_acc"]) for r in rows] == [r["test_acc"] for r in records]
    conf = json.loads((run / "config.json").read_text())["config"]
    assert conf["model"]["network"] == "fc-2x32" and conf["train"]["seed"] == 1
    assert conf["rule"]["lr"] == 5e-3 and conf["train"]["epochs"] == 3
    # a correct count over the fake training set (FAKE_TRAIN samples) is an integer
    assert records[0]["train_acc"] * FAKE_TRAIN == pytest.approx(
        round(records[0]["train_acc"] * FAKE_TRAIN))


def test_eval_reports_training_accuracy(trained, capsys):
    run, out = trained
    assert main(["eval", str(run)]) == 0
    ev = capsys.readouterr().out
    assert final_acc(ev) == final_acc(out)
    assert "epoch 3" in ev and "rule sigprop" in ev
    # the checkpoint file directly, on an explicit device, gives the same
    assert main(["eval", str(run / "checkpoint.pt"), "--device", "cpu"]) == 0
    assert final_acc(capsys.readouterr().out) == final_acc(out)
    exits_train = re.findall(r"exit (\w+)\s+test accuracy (\S+)", out)
    assert re.findall(r"exit (\w+)\s+test accuracy (\S+)", ev) == exits_train


def test_existing_run_dir_needs_resume(trained, capsys):
    run, _ = trained
    before = (run / "metrics.jsonl").read_text()
    line = one_error_line(capsys, main(["train", "--run-dir", str(run), *FAST]))
    assert "--resume" in line and str(run) in line
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_extends_a_finished_run(trained, fake_fashion, capsys):
    run, _ = trained
    rc = main(["train", "--resume", "--run-dir", str(run), "--epochs", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert final_acc(out) == pytest.approx(records[-1]["test_acc"], abs=5e-5)
    conf = json.loads((run / "config.json").read_text())["config"]
    assert conf["train"]["epochs"] == 4 and conf["model"]["network"] == "fc-2x32"  # kept


def test_corrupt_checkpoint_eval_and_resume(trained, capsys):
    run, _ = trained
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "unreadable" in one_error_line(capsys, main(["eval", str(run)]))
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(run),
                                        "--no-progress"]))
    assert "unreadable" in line


def test_config_file_and_flag_precedence(fake_fashion, in_tmp, capsys):
    (in_tmp / "c.toml").write_text(
        f'[data]\ndata_dir = "{fake_fashion}"\ntrain_limit = 128\nbatch_size = 32\n'
        '[model]\nnetwork = "fc-1x16"\n[train]\nepochs = 5\nprogress = false\n')
    rc = main(["train", "--config", "c.toml", "--epochs", "1", "--network", "fc-2x8",
               "--run-dir", "r"])
    assert rc == 0, capsys.readouterr().err
    conf = json.loads((in_tmp / "r" / "config.json").read_text())["config"]
    assert conf["train"]["epochs"] == 1 and conf["model"]["network"] == "fc-2x8"  # flags win
    assert conf["data"]["train_limit"] == 128 and conf["data"]["batch_size"] == 32  # file
    assert len((in_tmp / "r" / "metrics.jsonl").read_text().splitlines()) == 1


def test_default_run_dir_and_other_rules(fake_fashion, in_tmp, capsys):
    rc = main(["train", "--data-dir", str(fake_fashion), "--rule", "backprop", "--epochs", "1",
               "--train-limit", "128", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    runs = list((in_tmp / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("fashion-mnist-fc-2x32-backprop-")
    assert f"run folder: runs/{runs[0].name}" in out
    assert re.search(r"exit output\s+test accuracy", out)


def nan_losses(monkeypatch, rule_class) -> None:
    """Every training step of ``rule_class`` returns nan losses."""
    orig = rule_class.train_step

    def nan_step(self, x, y, index=None):
        losses, correct = orig(self, x, y, index)
        return losses * float("nan"), correct

    monkeypatch.setattr(rule_class, "train_step", nan_step)


def test_training_error_is_one_line(fake_fashion, in_tmp, capsys, monkeypatch):
    from sigprop.rules.backprop import Backprop

    nan_losses(monkeypatch, Backprop)
    line = one_error_line(capsys, main([
        "train", "--data-dir", str(fake_fashion), "--rule", "backprop", "--epochs", "1",
        "--run-dir", "r", *FAST]))
    assert "loss of output became nan at epoch 1, step 1" in line


def test_data_list_and_check(fake_fashion, capsys, monkeypatch):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    names = [x.split()[0] for x in out.splitlines()]
    assert names == ["cifar10", "cifar100", "fashion-mnist", "mnist", "svhn"]
    assert all("not found" in x for x in out.splitlines())
    monkeypatch.setenv("SIGPROP_DATA", str(fake_fashion.parent))
    assert main(["data", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fashion-mnist"))
    assert str(fake_fashion) in line and "not found" not in line
    monkeypatch.delenv("SIGPROP_DATA")
    assert main(["data", "check", "fashion-mnist", "--data-dir", str(fake_fashion)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"fashion-mnist: {fake_fashion}"
    assert f"split train: ok - {FAKE_TRAIN} images" in out
    assert f"split test: ok - {FAKE_TEST} images" in out
    assert "md5 mismatch" in out  # our fake files are not the official ones


def test_data_check_broken_file(tmp_path, fake_fashion, capsys):
    import shutil

    broken = tmp_path / "broken" / "fashion-mnist"
    shutil.copytree(fake_fashion, broken)
    raw = (broken / "t10k-images-idx3-ubyte.gz").read_bytes()
    (broken / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    assert main(["data", "check", "fashion-mnist", "--data-dir", str(broken)]) == 2
    out, err = capsys.readouterr()
    assert "split train: ok" in out and "split test: FAILED" in out  # the report: stdout
    assert err.startswith("sigprop: error: fashion-mnist: split test: ") and err.count("\n") == 1


def test_epoch_lines_reach_captured_stdout(fake_fashion, capsys):
    rc = main(["train", "--data-dir", str(fake_fashion), "--epochs", "1", "--train-limit", "64",
               "--run-dir", "r", *FAST])
    assert rc == 0
    assert "epoch 1/1" in capsys.readouterr().out


def test_resume_of_a_finished_run_changes_nothing(trained, capsys):
    run, out = trained
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", "--run-dir", str(run), "--no-progress"]) == 0
    assert final_acc(capsys.readouterr().out) == final_acc(out)
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_with_incompatible_network_is_one_line(trained, capsys):
    run, _ = trained
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(run),
                                        "--network", "fc-2x64", "--epochs", "4",
                                        "--no-progress"]))
    assert "model.network 'fc-2x32' -> 'fc-2x64'" in line


def test_resume_with_other_head_is_one_line(trained, capsys):
    run, _ = trained
    line = one_error_line(capsys, main(["train", "--resume", "--run-dir", str(run),
                                        "--head", "classifier", "--epochs", "4",
                                        "--no-progress"]))
    assert "rule.head 'target' -> 'classifier'" in line


def test_data_download_failure_is_one_line(in_tmp, capsys, monkeypatch):
    import urllib.error

    import sigprop.data.download as ds

    def offline(url, timeout):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(ds, "URL_OPENER", offline)
    line = one_error_line(capsys, main(["data", "download", "mnist", "--dest", "dl"]))
    assert "downloading https://" in line and "no network here" in line
    assert not list((in_tmp / "dl").rglob("*.part"))


def test_interrupt_exits_130_with_hint(fake_fashion, capsys, monkeypatch):
    from sigprop.engine.trainer import Trainer

    def interrupted(self, exp, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_epoch", interrupted)
    rc = main(["train", "--data-dir", str(fake_fashion), "--run-dir", "r", *FAST])
    err = capsys.readouterr().err.splitlines()
    assert rc == 130 and len(err) == 1 and "--resume" in err[0]


# --------------------------------------------------------------------------- bad values


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

    nan_losses(monkeypatch, Sigprop)
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
