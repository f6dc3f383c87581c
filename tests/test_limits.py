"""Limits where values enter: every size or count a user gives is checked against what
the machine can hold or run, and every text, depth, count and magnitude is bounded,
before anything is allocated, started or written (one line, exit 2)."""

from __future__ import annotations

import pytest
from helpers import one_error_line

from sigprop import resources
from sigprop.cli import main
from sigprop.engine import bench

BENCH = ["bench", "--network", "fc-2x16", "--input", "1x8x8", "--rules", "backprop",
         "--steps", "1", "--repeats", "1", "--warmup", "0"]


pytestmark = pytest.mark.usefixtures("in_tmp")  # from an empty folder, no real dataset visible


def _nothing_made(folder) -> None:
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("argv,match", [
    (["--threads", "100000"], "--threads must be an integer from 1 to"),
    (["--threads", "0"], "--threads must be an integer from 1 to"),
    (["--batch-size", "5000000"], "--batch-size must be an integer from 2"),
    (["--batch-size", "1"], "--batch-size must be an integer from 2"),
    (["--steps", "100000000"], "--steps must be an integer from 1"),
    (["--repeats", "0"], "--repeats must be an integer from 1"),
    (["--warmup", "-1"], "--warmup must be an integer from 0"),
    (["--classes", "1"], "num_classes must be an integer >= 2"),
])
def test_bench_counts_are_bounded(capsys, in_tmp, argv, match):
    line = one_error_line(capsys, main([*BENCH, *argv]))
    assert match in line
    assert capsys.readouterr().out == ""
    _nothing_made(in_tmp)


def test_bench_refuses_what_cannot_fit_before_allocating(capsys, in_tmp, monkeypatch):
    """The estimate (inputs, parameters, one step's activations) against free memory."""
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": 64 * 2**20)
    calls = []
    monkeypatch.setattr(bench.torch, "randn", lambda *a, **k: calls.append(a))
    line = one_error_line(capsys, main([*BENCH, "--batch-size", "100000"]))
    assert "a benchmark of 1 rule(s) at batch 100000 on fc-2x16 would need about" in line
    assert "lower --batch-size" in line and not calls


@pytest.mark.parametrize("argv,match", [
    (["--stages", "2", "--stage-threads", "100000"], "train.stage_threads"),
    (["--stages", "2", "--replicas", "100000"], "would start 200000 processes"),
    (["--epochs", "10000000000000"], "train.epochs must be a positive integer"),
    (["--batch-size", "10000000000000"], "data.batch_size"),
    (["--seed", "99999999999999999999999"], "train.seed"),
    (["--rule", "sp-voltage", "--network", "snn-conv", "--spike-threshold", "1e308"],
     "rule.spike_threshold"),
    (["--rule", "ep-loopback", "--network", "hopfield-1x16", "--ep-free-steps",
      "99999999999999999999"], "rule.ep_free_steps"),
    (["--rule", "ep-loopback", "--network", "hopfield-1x16", "--ep-free-steps", "10000000"],
     "rule.ep_free_steps"),
    (["--rule", "ep-loopback", "--network", "hopfield-1x16", "--ep-dt", "1e308"],
     "rule.ep_dt"),
    (["--rule", "ll-bp", "--ll-features", "1e3"], "rule.ll_features"),
    (["--sparse-grid", "100000", "--targets", "sparse"], "rule.sparse_grid"),
    (["--ep-lrs", "1" * 500, "--rule", "ep-symmetric", "--network", "hopfield-1x16"],
     "rule.ep_lrs is 500 characters long"),
    (["--run-dir", "x" * 300], "File name too long"),
    (["--data-dir", "d" * 5000], "data.data_dir"),
    (["--config", "c" * 300 + ".toml"], "File name too long"),
])
def test_train_values_are_bounded(capsys, in_tmp, fake_fashion, argv, match):
    args = ["train", "--data-dir", str(fake_fashion), "--no-progress", "--train-limit", "64"]
    line = one_error_line(capsys, main([*args, *argv]))
    assert match in line
    _nothing_made(in_tmp)


@pytest.mark.parametrize("text,match", [
    ("a = " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
    ("# " + "x" * (2**20 + 10) + "\n", "larger than 1 MiB"),
    ("[rule]\nlr = \"0.1\"\n", r"rule.lr: expected float"),
    ("[train]\nepochs = \"1\"\n", r"train.epochs: expected int"),
])
def test_config_files_are_bounded(capsys, in_tmp, text, match):
    (in_tmp / "c.toml").write_text(text)
    line = one_error_line(capsys, main(["train", "--config", "c.toml"]))
    assert match in line.replace("\\", "")


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace('title = "', 'title = "' + "T" * 400, 1), "title in the file is"),
    (lambda t: t.replace('label = "BP"', 'label = "' + "L" * 400 + '"', 1), "label in"),
    (lambda t: t.replace('note = """\\', 'note = """' + "n" * 6000, 1), "note in the file"),
])
def test_experiment_texts_are_bounded(capsys, in_tmp, pytestconfig, edit, match):
    base = pytestconfig.rootpath / "src/sigprop/experiments/paper/table6-fmnist.toml"
    text = edit(base.read_text().replace('name = "table6-fmnist"', 'name = "mine"'))
    (in_tmp / "mine.toml").write_text(text)
    line = one_error_line(capsys, main(["reproduce", "mine.toml", "--list"]))
    assert match in line and "characters long" in line


def test_cpu_bounds_read_the_affinity():
    assert resources.max_threads() == 4 * resources.cpu_count() >= 4
