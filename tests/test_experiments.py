"""The paper's tables as experiments: files checked, reproductions that resume, reports
that equal the runs' metrics and mark what is missing, and plots that are real PNGs."""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from helpers import one_error_line

import sigprop.engine.trainer  # noqa: F401  (bind Trainer before tests capture stdout)
from sigprop.cli import _overrides, _parser, main
from sigprop.engine import runio
from sigprop.engine.config import Config, apply_overrides
from sigprop.errors import ConfigError, TrainingError
from sigprop.experiments import builtin_names, load_experiment, plots, reproduce, write_report
from sigprop.experiments.report import collect

pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible

# A small experiment on the fake Fashion-MNIST: two rows, two rules, seconds per run.
SMALL = """\
name = "{name}"
title = "A small table"
source = "nowhere"
metric = "test_error"
gaps = [["sigprop", "backprop"]]
row_heading = "network"

[defaults]
data = {{ dataset = "fashion-mnist", batch_size = 64, eval_batch_size = 100 }}
rule = {{ lr = 5e-3 }}

[[columns]]
key = "backprop"
label = "BP"
rule = {{ name = "backprop" }}

[[columns]]
key = "sigprop"
label = "SP"
rule = {{ name = "sigprop", loss = "dot" }}

[[rows]]
key = "fc-2x32"
label = "FC 2x32"
model = {{ network = "fc-2x32" }}
paper = {{ backprop = [10.0, 0.5], sigprop = 11.0 }}

[[rows]]
key = "fc-1x16"
label = "FC 1x16"
model = {{ network = "fc-1x16" }}
paper_dataset = "MNIST"
paper = {{ backprop = 3.0, sigprop = "n/a" }}

[budgets.full]
seeds = [0, 1, 2]
train = {{ epochs = 20 }}

[budgets.quick]
seeds = [0, 1]
train = {{ epochs = {quick_epochs} }}

[budgets.smoke]
seeds = [0]
data = {{ train_limit = 256 }}
train = {{ epochs = 1 }}
"""


def small_file(folder: Path, name: str = "small", quick_epochs: int = 2, edit=None) -> Path:
    text = SMALL.format(name=name, quick_epochs=quick_epochs)
    if edit is not None:
        text = edit(text)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def run_quietly(exp, budget, out, data_dir, **kw):
    with open(os.devnull, "w") as devnull:
        return reproduce(exp, budget, out, data_dir=str(data_dir), progress=False, log=devnull,
                         **kw)


# --------------------------------------------------------------------------- the files


def test_builtin_experiments_read_and_cover_table6():
    names = builtin_names()
    assert {"table6-mnist", "table6-fmnist", "table6-cifar10", "table6-cifar100"} <= set(names)
    for name in names:
        exp = load_experiment(name)
        assert exp.name == name
        for budget in ("full", "quick", "smoke"):
            assert exp.runs(budget)
    fm = load_experiment("table6-fmnist")
    assert [r.key for r in fm.rows] == ["fc-2x800", "fc-3x800", "fc-4x800", "fc-2x800-do",
                                        "fc-3x1000-do"]
    assert [c.key for c in fm.columns] == ["backprop", "fa", "dfa", "sigprop", "shallow"]
    # the paper's MNIST numbers, marked as another data set
    assert fm.rows[0].paper["backprop"].mean == 1.60 and fm.rows[0].paper["shallow"] is None
    assert fm.row_paper_dataset(fm.rows[0]) == "MNIST"
    assert fm.row_paper_dataset(fm.rows[-1]) == "CIFAR-10"
    # quick is docs/studies/fc-accuracy.md's setting: full data, 10 epochs, seeds 0 and 1
    quick = fm.runs("quick")
    assert {p.seed for p in quick} == {0, 1}
    assert all(p.config.train.epochs == 10 and p.config.data.train_limit is None for p in quick)
    mnist = load_experiment("table6-mnist")
    assert mnist.paper_dataset is None and mnist.datasets("full") == ["mnist"]


def test_cell_commands_rebuild_the_cell_config(in_tmp):
    """The command the report gives for a cell trains exactly that cell's configuration."""
    import shlex

    from sigprop.engine.config import train_command
    from sigprop.experiments.report import _ALWAYS
    from sigprop.experiments.manifest import planned_config

    exp = load_experiment("table6-fmnist")
    for plan in exp.runs("quick")[:6]:
        cfg = planned_config(plan, in_tmp / "out", data_dir="/data", device=None, progress=True)
        words = shlex.split(train_command(cfg, always=_ALWAYS))
        ns = _parser().parse_args(words[1:])
        rebuilt = apply_overrides(Config(), _overrides(ns), text=True)
        assert rebuilt == cfg


BAD_FILES = [
    (lambda t: t.replace('metric = "test_error"', 'metric = "test_error"\ncolour = "red"'),
     "unknown key 'colour' in the file"),
    (lambda t: t.replace('model = { network = "fc-2x32" }', 'model = { netwrk = "fc-2x32" }'),
     "unknown key model.netwrk"),
    (lambda t: t.replace('rule = { name = "sigprop",', 'rule = { name = "sigprp",'),
     "unknown rule 'sigprp'"),
    (lambda t: t.replace('model = { network = "fc-1x16" }', 'model = { network = "mlp-1x16" }'),
     "unknown network 'mlp'"),
    (lambda t: t.replace('paper = { backprop = [10.0, 0.5], sigprop = 11.0 }',
                         'paper = { backprop = [10.0, 0.5] }'),
     "the paper value of column 'sigprop' is missing"),
    (lambda t: t.replace('paper = { backprop = 3.0, sigprop = "n/a" }\n', ''),
     "row 'fc-1x16' lacks its paper numbers"),
    (lambda t: t.replace('sigprop = 11.0 }', 'sigprop = 11.0, dfa = 12.0 }'),
     "paper names 'dfa', which is no column"),
    (lambda t: t.replace('sigprop = 11.0 }', 'sigprop = "11%" }'),
     "paper.sigprop must be a number"),
    (lambda t: t.replace('[budgets.smoke]', '[budgets.smok]'), "unknown budget [budgets.smok]"),
    (lambda t: t.replace('seeds = [0, 1, 2]', 'seeds = []'), "seeds must be a non-empty list"),
    (lambda t: t.replace('gaps = [["sigprop", "backprop"]]', 'gaps = [["sigprop", "bp"]]'),
     "gaps names 'bp', which is no column"),
    (lambda t: t.replace('train = { epochs = 20 }', 'train = { epochs = 0 }'),
     "train.epochs must be a positive integer"),
    (lambda t: t.replace('key = "fc-1x16"', 'key = "FC 1x16"'), "must be lowercase letters"),
    (lambda t: t.replace('key = "fc-1x16"', 'key = "fc-2x32"'), "row 'fc-2x32' appears twice"),
    (lambda t: t.replace('[budgets.full]', '[budgets.full'), "is not valid TOML"),
]


@pytest.mark.parametrize("edit,match", BAD_FILES)
def test_bad_experiment_file_is_one_clear_error(in_tmp, capsys, edit, match):
    path = small_file(in_tmp, edit=edit)
    with pytest.raises(ConfigError, match=re.escape(match)) as err:
        load_experiment(str(path))
    assert str(path) in str(err.value)
    rc = main(["reproduce", str(path), "--budget", "smoke", "--out", "out"])
    line = one_error_line(capsys, rc)
    assert match.split("'")[0] in line
    assert not (in_tmp / "out").exists()  # nothing made


# runs that `sigprop train` would refuse, or that a reproduction could not honour: every
# planned run is checked before the output folder or its manifest is made
BAD_PLANS = [
    (lambda t: t.replace('train = { epochs = 1 }', 'train = { epochs = 1, stages = 2 }'),
     "stages, split and replicas are settings of `sigprop train`"),
    (lambda t: t.replace('rule = { lr = 5e-3 }', 'rule = { lr = 5e-3 }\ntrain = { replicas = 2 }'),
     "stages, split and replicas are settings of `sigprop train`"),
    (lambda t: t.replace('rule = { lr = 5e-3 }', 'rule = { lr = 5e-3 }\ntrain = { device = "cuda:7" }'),
     "cuda"),
    (lambda t: t.replace('eval_batch_size = 100 }', 'eval_batch_size = 100, data_dir = "/nowhere" }'),
     "needs dataset 'fashion-mnist', which is not here"),
    (lambda t: t.replace('rule = { name = "sigprop", loss = "dot" }', 'rule = { name = "ep-loopback" }'),
     "rule ep-loopback on fc-2x32"),
    (lambda t: t.replace('train = { epochs = 1 }', 'train = { epochs = "1" }'),
     "train.epochs: expected int"),
    (lambda t: t.replace('rule = { name = "backprop" }', 'rule = { name = "backprop", head = "classifier" }'),
     "head (--head) is an option of sigprop"),
]


@pytest.mark.parametrize("edit,match", BAD_PLANS)
def test_every_planned_run_is_checked_before_anything(in_tmp, capsys, fake_fashion, edit, match):
    path = small_file(in_tmp, edit=edit)
    # --data-dir would replace the file's own data location: left out for that case
    where = [] if "data_dir" in edit("") + edit("eval_batch_size = 100 }") else \
        ["--data-dir", str(fake_fashion.parent)]
    rc = main(["reproduce", str(path), "--budget", "smoke", "--out", "out", *where])
    line = one_error_line(capsys, rc)
    assert match in line
    assert not (in_tmp / "out").exists()


def test_a_shared_option_applies_to_the_columns_that_take_it(in_tmp, fake_fashion):
    """``head`` in the defaults: sigprop's runs take it, backprop's leave it out."""
    path = small_file(in_tmp, edit=lambda t: t.replace('rule = { lr = 5e-3 }',
                                                       'rule = { lr = 5e-3, head = "classifier" }'))
    plans = load_experiment(str(path)).runs("smoke")
    rules = {p.column.key: p.config.rule.to_dict() for p in plans}
    assert rules["sigprop"]["head"] == "classifier" and "head" not in rules["backprop"]


def test_unknown_experiment_and_name_mismatch(in_tmp):
    with pytest.raises(ConfigError, match="unknown experiment 'table7'; choose one of: .*table6"):
        load_experiment("table7")
    path = small_file(in_tmp, name="small")
    path.rename(in_tmp / "other.toml")
    with pytest.raises(ConfigError, match="differs from the file's name 'other'"):
        load_experiment(str(in_tmp / "other.toml"))


def test_list_names_experiments_runs_and_data(in_tmp, capsys, fake_fashion):
    assert main(["reproduce", "--list", "--data-dir", str(fake_fashion)]) == 0
    out = capsys.readouterr().out
    for name in builtin_names():
        assert f"{name}: " in out
    assert f"data: fashion-mnist, found in {fake_fashion}" in out
    assert "data: cifar10, not found (sigprop data download cifar10" in out
    assert "smoke: 25 runs (seeds 0" in out and "quick: 50 runs" in out


def test_missing_dataset_is_one_line_before_anything(in_tmp, capsys):
    rc = main(["reproduce", "table6-mnist", "--budget", "smoke", "--out", "out"])
    line = one_error_line(capsys, rc)
    assert "table6-mnist needs dataset 'mnist'" in line
    assert "sigprop data download mnist" in line
    assert not (in_tmp / "out").exists()


# --------------------------------------------------------------------------- reproducing


def final_error(run_dir: Path) -> float:
    return 100 * (1 - runio.read_history(run_dir)[-1]["test_acc"])


def test_reproduce_then_report_equals_the_runs_metrics(in_tmp, fake_fashion):
    exp = load_experiment(str(small_file(in_tmp)))
    out = in_tmp / "out"
    result = run_quietly(exp, "quick", out, fake_fashion)
    assert result["ran"] == 8 and result["skipped"] == 0 and not result["failed"]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "- SP: rule.name = sigprop, rule.loss = dot" in md  # which variant each ran
    assert len(report["cells"]) == 4
    for cell in report["cells"]:
        errors = [final_error(out / "runs" / r["run"]) for r in cell["runs"]]
        assert cell["n"] == 2 and cell["values"] == pytest.approx(errors, abs=1e-12)
        assert cell["mean"] == pytest.approx(statistics.fmean(errors))
        assert cell["std"] == pytest.approx(statistics.stdev(errors))
        assert f"{cell['mean']:.2f} ± {cell['std']:.2f} (n=2)" in md
    by = {(c["row"], c["column"]): c for c in report["cells"]}
    # same data: the difference to the paper; other data (MNIST): not compared
    bp = by["fc-2x32", "backprop"]
    assert bp["paper"] == {"mean": 10.0, "std": 0.5}
    assert bp["diff"] == pytest.approx(bp["mean"] - 10.0)
    assert by["fc-1x16", "backprop"]["diff"] is None
    assert by["fc-1x16", "sigprop"]["paper"] is None
    assert "| FC 2x32 | same |" in md and "| FC 1x16 | MNIST |" in md
    gap = by["fc-2x32", "sigprop"]["mean"] - bp["mean"]
    assert f"{gap:+.2f} | +1.00 |" in md  # SP - BP: ours, the paper's
    # the commands, the plots, the provenance
    assert "`sigprop train --dataset fashion-mnist" in md and "--seed 1" in md
    assert "![learning curves](plots/curves.png)" in md
    assert "![early exits](plots/exits.png)" in md
    assert "cores" in md and "torch 2." in md and "commit " in md
    for png in ("curves.png", "exits.png"):
        assert_png(out / "plots" / png)
    # `sigprop report` rebuilds the same numbers without training
    (out / "report.md").unlink()
    write_report(out)
    again = json.loads((out / "report.json").read_text())
    assert [c["values"] for c in again["cells"]] == [c["values"] for c in report["cells"]]
    # a path it writes is taken by a folder, or its plots folder by a file: one error,
    # and no file changed
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    with pytest.raises(ConfigError, match="report.md is a folder where the report writes"):
        write_report(out)
    (out / "report.md").rmdir()
    shutil.move(out / "plots", in_tmp / "plots-aside")
    (out / "plots").write_text("")
    with pytest.raises(ConfigError, match="plots is a file where the report puts"):
        write_report(out)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert all(after[p] == t for p, t in before.items() if p in after)


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(np.std(image[..., :3])) > 0.01  # not a blank canvas


def test_killed_reproduction_skips_finished_and_resumes_interrupted(in_tmp, fake_fashion,
                                                                    monkeypatch):
    """Interrupted in the 2nd epoch of the 2nd run: run 1 is skipped, run 2 continues from
    its checkpoint and ends as an uninterrupted run does, the rest start."""
    from sigprop.engine.trainer import Trainer

    exp = load_experiment(str(small_file(in_tmp, quick_epochs=3)))
    ref = in_tmp / "ref"
    run_quietly(exp, "quick", ref, fake_fashion, seeds=(0,))

    out = in_tmp / "out"
    real_epoch = Trainer._epoch
    calls = []

    def interrupt(self, exp_, epoch):
        calls.append((self.run_dir.name, epoch))
        if len({c[0] for c in calls}) == 2 and epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, exp_, epoch)

    monkeypatch.setattr(Trainer, "_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_quietly(exp, "quick", out, fake_fashion, seeds=(0,))
    monkeypatch.setattr(Trainer, "_epoch", real_epoch)
    first, second = sorted({c[0] for c in calls}, key=[c[0] for c in calls].index)
    finished = (out / "runs" / first / "metrics.jsonl").read_bytes()
    assert len(runio.read_history(out / "runs" / second)) == 1
    assert not (out / "report.md").exists()

    log = in_tmp / "log.txt"
    with open(log, "w") as f:
        result = reproduce(exp, "quick", out, data_dir=str(fake_fashion), seeds=(0,),
                           progress=False, log=f)
    text = log.read_text()
    assert f"finished before, skipped ({out / 'runs' / first})" in text
    resumed = [ln for ln in text.splitlines() if ln.endswith(str(out / "runs" / second))]
    assert len(resumed) == 1 and ": resuming fc-" in resumed[0], text
    assert text.count(": training fc-") == 2  # the other two start afresh
    assert result["skipped"] == 1 and result["ran"] == 3
    assert (out / "runs" / first / "metrics.jsonl").read_bytes() == finished
    for run in (ref / "runs").iterdir():  # every run ends as the uninterrupted one
        a = runio.read_history(run)
        b = runio.read_history(out / "runs" / run.name)
        assert [r["test_acc_exits"] for r in a] == [r["test_acc_exits"] for r in b]
        assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_sigkilled_reproduction_resumes(in_tmp, fake_fashion):
    """A real SIGKILL while the 2nd run trains; the same command finishes the job."""
    path = small_file(in_tmp, quick_epochs=6)
    out = in_tmp / "out"
    cmd = [sys.executable, "-m", "sigprop.cli", "reproduce", str(path), "--budget", "quick",
           "--seeds", "0", "--out", str(out), "--data-dir", str(fake_fashion), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    seen = []
    try:
        for line in proc.stdout:  # bounded: the job ends by itself within seconds
            seen.append(line)
            if line.startswith("epoch 2/") and any(s.startswith("[2/4]") for s in seen):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert any(s.startswith("[2/4]") for s in seen), "".join(seen)
    rc = main(["reproduce", str(path), "--budget", "quick", "--seeds", "0", "--out", str(out),
               "--data-dir", str(fake_fashion), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert all(r["status"] == "finished" and r["epochs"] == 6
               for c in report["cells"] for r in c["runs"])


def test_failed_run_is_marked_and_the_rest_run(in_tmp, fake_fashion, monkeypatch, capsys):
    from sigprop.engine.trainer import Trainer

    real_run = Trainer.run

    def fail_one(self):
        if self.run_dir.name == "fc-2x32_sigprop_s0":
            raise TrainingError("loss of layer2 became nan at epoch 1, step 3; lower the "
                                "learning rate (--lr)")
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", fail_one)
    path = small_file(in_tmp)
    rc = main(["reproduce", str(path), "--budget", "smoke", "--out", "out", "--data-dir",
               str(fake_fashion), "--no-progress"])
    line = one_error_line(capsys, rc)
    assert "1 run(s) failed (fc-2x32_sigprop_s0: loss of layer2 became nan" in line
    report = json.loads((in_tmp / "out" / "report.json").read_text())
    status = {r["run"]: r["status"] for c in report["cells"] for r in c["runs"]}
    assert status["fc-2x32_sigprop_s0"] == "failed"
    assert sum(s == "finished" for s in status.values()) == 3
    md = (in_tmp / "out" / "report.md").read_text()
    assert "| FC 2x32 | same |" in md and "| failed | 11.00 |" in md
    # fixed: the same command runs only the failed run and clears its mark
    monkeypatch.setattr(Trainer, "run", real_run)
    assert main(["reproduce", str(path), "--budget", "smoke", "--out", "out", "--data-dir",
                 str(fake_fashion), "--no-progress"]) == 0
    manifest = json.loads((in_tmp / "out" / "reproduce.json").read_text())
    assert manifest["failed"] == {}


def test_report_marks_missing_partial_and_unreadable_runs(in_tmp, fake_fashion, capsys):
    exp = load_experiment(str(small_file(in_tmp)))
    out = in_tmp / "out"
    run_quietly(exp, "quick", out, fake_fashion)
    runs = out / "runs"
    import shutil

    shutil.rmtree(runs / "fc-2x32_backprop_s1")  # missing
    lines = (runs / "fc-2x32_sigprop_s1" / "metrics.jsonl").read_text().splitlines()
    (runs / "fc-2x32_sigprop_s1" / "metrics.jsonl").write_text(lines[0] + "\n")  # 1 of 2
    (runs / "fc-1x16_sigprop_s0" / "metrics.jsonl").write_text("{not json\n")  # damaged
    shutil.rmtree(runs / "fc-1x16_backprop_s0")
    shutil.rmtree(runs / "fc-1x16_backprop_s1")  # a cell with nothing
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    by = {(c["row"], c["column"]): c for c in report["cells"]}
    assert by["fc-2x32", "backprop"]["n"] == 1
    assert [r["status"] for r in by["fc-2x32", "backprop"]["runs"]] == ["finished", "absent"]
    assert [r["status"] for r in by["fc-2x32", "sigprop"]["runs"]] == ["finished", "partial"]
    assert by["fc-1x16", "sigprop"]["runs"][0]["status"] == "unreadable"
    assert by["fc-1x16", "backprop"]["n"] == 0 and by["fc-1x16", "backprop"]["mean"] is None
    assert "[1 of 2: not run]" in md
    # a partial run shows its value so far beside it, never in the mean
    partial = by["fc-2x32", "sigprop"]["runs"][1]
    so_far = partial["so_far"]
    assert so_far["epoch"] == 1 and so_far["value"] == pytest.approx(
        100 * (1 - json.loads(lines[0])["test_acc"]))
    assert by["fc-2x32", "sigprop"]["n"] == 1 and partial["value"] is None
    assert f"[1 of 2: running 1/2 epochs, so far {so_far['value']:.2f} (epoch 1)]" in md
    assert "| FC 1x16 | MNIST | not run |" in md
    assert "unreadable: " in md and "damaged at line 1" in md
    # the report's plots still draw what there is
    assert_png(out / "plots" / "curves.png")


def test_out_holding_another_reproduction_or_other_runs_is_refused(in_tmp, fake_fashion,
                                                                   capsys):
    path = small_file(in_tmp)
    args = ["--out", "out", "--data-dir", str(fake_fashion), "--no-progress"]
    assert main(["reproduce", str(path), "--budget", "smoke", *args]) == 0
    capsys.readouterr()
    line = one_error_line(capsys, main(["reproduce", str(path), "--budget", "quick", *args]))
    assert "holds the 'smoke' reproduction of 'small'" in line
    # a run folder made with other settings (here: another learning rate)
    edited = small_file(in_tmp, edit=lambda t: t.replace("lr = 5e-3", "lr = 1e-3"))
    line = one_error_line(capsys, main(["reproduce", str(edited), "--budget", "smoke", *args]))
    assert "holds a run with other settings" in line and "rule.lr 0.005 (there) vs 0.001" in line


def test_seeds_flag_adds_runs_and_the_report_counts_them(in_tmp, fake_fashion, capsys):
    path = small_file(in_tmp)
    args = ["--budget", "smoke", "--out", "out", "--data-dir", str(fake_fashion), "--no-progress"]
    assert main(["reproduce", str(path), *args]) == 0
    assert main(["reproduce", str(path), *args, "--seeds", "3"]) == 0
    report = json.loads((in_tmp / "out" / "report.json").read_text())
    assert all(c["n"] == 2 and [r["seed"] for r in c["runs"]] == [0, 3] for c in report["cells"])
    for bad in ("1,1", "x", "-1", "1.5"):
        line = one_error_line(capsys, main(["reproduce", str(path), *args, "--seeds", bad]))
        assert "seed" in line


def test_builtin_smoke_budget_end_to_end(in_tmp, fake_fashion, capsys):
    """The shipped table6-fmnist, smoke budget, on the fake data: every run, the report
    with the paper's numbers and ours, and valid PNGs."""
    rc = main(["reproduce", "table6-fmnist", "--budget", "smoke", "--data-dir",
               str(fake_fashion), "--no-progress"])
    assert rc == 0
    out = in_tmp / "runs" / "reproduce" / "table6-fmnist-smoke"
    md = (out / "report.md").read_text()
    assert "| FC 2x800 | MNIST |" in md and "1.60 ± 0.06" in md and "42.62 ± 0.16" in md
    report = json.loads((out / "report.json").read_text())
    assert len(report["cells"]) == 25 and all(c["n"] == 1 for c in report["cells"])
    assert_png(out / "plots" / "curves.png")
    assert_png(out / "plots" / "exits.png")


# --------------------------------------------------------------------------- plots and CLI


def test_plot_functions_write_readable_pngs(in_tmp):
    hist = [[{"epoch": e, "test_acc": 0.5 + 0.1 * e + 0.01 * s, "train_loss": 2.0 / e,
              "test_acc_exits": {"layer1": 0.4 + 0.1 * e, "layer2": 0.5 + 0.1 * e}}
             for e in (1, 2, 3)] for s in (0, 1)]
    series = [plots.Series("SP", hist), plots.Series("BP", hist[:1])]
    p = plots.learning_curves([plots.Panel("FC", series)], in_tmp / "a" / "c.png", "t")
    assert p == in_tmp / "a" / "c.png"
    assert_png(p)
    e = plots.exit_curves([plots.Panel("FC, SP", series[:1])], in_tmp / "e.png", "exits")
    assert_png(e)
    # nothing to draw: no file
    assert plots.learning_curves([plots.Panel("FC", [])], in_tmp / "none.png", "t") is None
    assert plots.exit_curves([plots.Panel("x", [plots.Series("BP", [[{"epoch": 1,
                              "test_acc": 0.5, "test_acc_exits": {"output": 0.5}}]])])],
                             in_tmp / "none2.png", "t") is None
    assert not (in_tmp / "none.png").exists() and not (in_tmp / "none2.png").exists()


def test_plot_command_draws_runs(in_tmp, fake_fashion, capsys):
    exp = load_experiment(str(small_file(in_tmp)))
    run_quietly(exp, "smoke", in_tmp / "out", fake_fashion)
    runs = in_tmp / "out" / "runs"
    assert main(["plot", str(runs / "fc-2x32_sigprop_s0")]) == 0
    assert_png(runs / "fc-2x32_sigprop_s0" / "plots" / "curves.png")
    assert_png(runs / "fc-2x32_sigprop_s0" / "plots" / "exits.png")
    assert main(["plot", str(runs / "fc-2x32_sigprop_s0"), str(runs / "fc-2x32_backprop_s0"),
                 "--out", "figs"]) == 0
    assert "plot: figs/curves.png" in capsys.readouterr().out
    assert_png(in_tmp / "figs" / "curves.png")
    line = one_error_line(capsys, main(["plot", "nowhere"]))
    assert "nowhere is not a run folder" in line
    (in_tmp / "empty").mkdir()
    line = one_error_line(capsys, main(["plot", "empty"]))
    assert "holds no finished epoch" in line


def test_report_of_a_folder_without_reproduction(in_tmp, capsys):
    (in_tmp / "x").mkdir()
    line = one_error_line(capsys, main(["report", "x"]))
    assert "x holds no reproduction (reproduce.json is missing)" in line
    (in_tmp / "x" / "reproduce.json").write_text("{broken")
    line = one_error_line(capsys, main(["report", "x"]))
    assert "reproduce.json is not valid JSON" in line


def test_collect_reads_what_reproduce_planned(in_tmp, fake_fashion):
    exp = load_experiment(str(small_file(in_tmp)))
    run_quietly(exp, "smoke", in_tmp / "out", fake_fashion)
    exp2, manifest, cells = collect(in_tmp / "out")
    assert exp2.name == "small" and manifest["budget"] == "smoke"
    assert [(c.row.key, c.column.key, len(c.runs)) for c in cells] == [
        ("fc-2x32", "backprop", 1), ("fc-2x32", "sigprop", 1), ("fc-1x16", "backprop", 1),
        ("fc-1x16", "sigprop", 1)]
    assert manifest["invocations"][0]["machine"]["cores"] == os.cpu_count()


def test_only_runs_the_named_rows_and_columns(in_tmp, fake_fashion, capsys):
    exp = load_experiment(str(small_file(in_tmp)))
    run_quietly(exp, "smoke", in_tmp / "out", fake_fashion, only=("fc-1x16",))
    _, manifest, cells = collect(in_tmp / "out")
    assert manifest["runs"] == ["fc-1x16_backprop_s0", "fc-1x16_sigprop_s0"]
    assert [(c.row.key, c.column.key) for c in cells if c.runs] == [
        ("fc-1x16", "backprop"), ("fc-1x16", "sigprop")]
    # a row and a column: that cell; the folder then reports all three
    run_quietly(exp, "smoke", in_tmp / "out", fake_fashion, only=("sigprop", "fc-2x32"))
    _, manifest, cells = collect(in_tmp / "out")
    assert manifest["runs"][-1] == "fc-2x32_sigprop_s0" and len(manifest["runs"]) == 3
    for only, match in ((("conv",), "'conv' names no row or column of 'small'; its rows: "
                                    "fc-2x32, fc-1x16; its columns: backprop, sigprop"),):
        with pytest.raises(ConfigError, match=match):
            run_quietly(exp, "smoke", in_tmp / "out2", fake_fashion, only=only)
    assert not (in_tmp / "out2").exists()
    line = one_error_line(capsys, main(["reproduce", str(small_file(in_tmp)), "--budget",
                                        "smoke", "--only", "x,", "--out", "o"]))
    assert "expected row or column keys" in line


def test_forward_only_experiment_puts_every_peer_on_one_budget():
    exp = load_experiment("forward-only-fmnist")
    rules = {c.overrides["rule"]["name"] for c in exp.columns}
    assert {"backprop", "sigprop", "fa", "dfa", "ff", "pepita", "drtp", "forward-grad"} <= rules
    full = exp.runs("full")
    assert {p.seed for p in full} == {0, 1}
    assert all(p.config.data.train_limit is None for p in full)
    # the fc rows at least 10 epochs (the bar); CONV at 2, its cost
    assert {p.config.train.epochs for p in full if p.row.key != "conv"} == {10}
    assert {p.config.train.epochs for p in full if p.row.key == "conv"} == {2}
    conv = {p.config.rule.name for p in full if p.config.model.network == "conv"}
    assert "ff" not in conv and "pepita" not in conv and "drtp" in conv  # fc-only rules skip it
    # each rule keeps its own settings (its engine defaults): PEPITA's batch of 64
    pep = [p for p in full if p.config.rule.name == "pepita"]
    assert pep and all(p.config.data.batch_size == 64 for p in pep)
