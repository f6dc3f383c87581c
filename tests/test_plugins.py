"""Plugins: the example package of docs/EXTENDING.md (examples/sigprop-plugin-example),
installed into a temporary folder with pip, registers its rule through the entry-point
group ``sigprop.plugins``; every command then takes it as a built-in rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, SRC

EXAMPLE = ROOT / "examples" / "sigprop-plugin-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the example plugin as pip installs it (code and entry points)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("example") / EXAMPLE.name  # pip builds in the folder
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if proc.returncode != 0:
        pytest.fail(f"pip could not install the example plugin: {proc.stderr[-2000:]}")
    assert list(target.glob("sigprop_example-*.dist-info/entry_points.txt"))
    return target


def _sigprop(site: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sigprop", *map(str, args)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_lists_the_plugin_rule_and_its_option(site):
    out = _sigprop(site, "train", "--help")
    assert out.returncode == 0, out.stderr
    assert "top-k" in out.stdout and "--trainable-blocks K" in out.stdout
    assert "options of top-k" in out.stdout


def test_plugin_rule_trains_resumes_and_evaluates(site, fake_fashion, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--data-dir", fake_fashion, "--network", "fc-3x32", "--batch-size", 64,
            "--no-progress", "--rule", "top-k", "--trainable-blocks", 2, "--lr", "5e-3",
            "--run-dir", run]
    out = _sigprop(site, *base, "--epochs", 1)
    assert out.returncode == 0, out.stderr
    record = json.loads((run / "config.json").read_text())["config"]["rule"]
    assert record["name"] == "top-k" and record["trainable_blocks"] == 2
    out = _sigprop(site, *base, "--epochs", 2, "--resume")
    assert out.returncode == 0, out.stderr
    acc = float(out.stdout.strip().splitlines()[-1].split()[2])
    assert acc > 0.5  # the fake data's classes are learnable in 2 epochs
    out = _sigprop(site, "eval", run, "--data-dir", fake_fashion)
    assert out.returncode == 0 and "rule top-k" in out.stdout, out.stderr
    # its option is checked where it enters, as a built-in rule's
    out = _sigprop(site, *base[:-2], "--trainable-blocks", 9, "--run-dir", tmp_path / "bad")
    assert out.returncode == 2 and "trainable_blocks 9 exceeds" in out.stderr
    assert not (tmp_path / "bad").exists()
    out = _sigprop(site, "train", "--rule", "sigprop", "--trainable-blocks", 1,
                   "--data-dir", fake_fashion, "--run-dir", tmp_path / "bad2")
    assert out.returncode == 2 and "is an option of top-k, not of rule 'sigprop'" in out.stderr


def test_bench_measures_the_plugin_rule(site):
    out = _sigprop(site, "bench", "--network", "fc-2x32", "--input", "1x8x8", "--rules",
                   "backprop,top-k", "--steps", 1, "--repeats", 1, "--warmup", 0,
                   "--batch-size", 16)
    assert out.returncode == 0, out.stderr
    assert "top-k" in out.stdout


def test_reproduce_names_the_plugin_rule(site, fake_fashion, tmp_path):
    exp = tmp_path / "plugin-table.toml"
    exp.write_text("""
name = "plugin-table"
title = "top-k against backprop"
source = "an example"
metric = "test_error"

[defaults]
data = { dataset = "fashion-mnist", batch_size = 64 }
model = { network = "fc-2x32" }
rule = { lr = 5e-3, trainable_blocks = 2 }

[[columns]]
key = "backprop"
label = "BP"
rule = { name = "backprop" }

[[columns]]
key = "top-k"
label = "top-2"
rule = { name = "top-k" }

[[rows]]
key = "fc"
label = "FC 2x32"
paper = { backprop = "n/a", top-k = "n/a" }

[budgets.full]
seeds = [0]
[budgets.quick]
seeds = [0]
[budgets.smoke]
seeds = [0]
train = { epochs = 1 }
""")
    out = _sigprop(site, "reproduce", exp, "--budget", "smoke", "--data-dir",
                   fake_fashion.parent, "--out", tmp_path / "out", "--no-progress",
                   cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "top-2" in report and "--rule top-k --lr 0.005 --trainable-blocks 2" in report
    # the defaults' option applies to the column whose rule takes it
    runs = tmp_path / "out" / "runs"
    rule = json.loads((runs / "fc_top-k_s0" / "config.json").read_text())["config"]["rule"]
    assert rule["trainable_blocks"] == 2
    rule = json.loads((runs / "fc_backprop_s0" / "config.json").read_text())["config"]["rule"]
    assert "trainable_blocks" not in rule


def test_a_broken_plugin_is_one_line(tmp_path):
    """A plugin that fails to import: one line naming it and the error, exit 2."""
    site = tmp_path / "broken"
    (site / "broken_plugin").mkdir(parents=True)
    (site / "broken_plugin" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sigprop.plugins]\nbroken = broken_plugin\n")
    out = _sigprop(site, "train", "--help")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "sigprop: error: plugin 'broken' (broken_plugin) failed to import: RuntimeError: "
        "boom; fix it or uninstall its package"]


def _plugin(tmp_path: Path, name: str, code: str) -> Path:
    """A site folder holding one plugin module ``name`` with ``code``."""
    site = tmp_path / name
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(code)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sigprop.plugins]\n{name} = {name}\n")
    return site


RULE_HEAD = """import torch
from sigprop import LearningRule, Option, make_adam, register_rule, register_network
@register_rule("{name}")
class Rule(LearningRule):
    exit_names = ["output"]
    options = ({options})
    def __init__(self, network, num_classes, cfg):
        super().__init__(network, num_classes, cfg)
        self.opt = make_adam(network.parameters(), cfg)
        self.optimizers = [self.opt]
"""


@pytest.mark.parametrize("case, body, args, want", [
    ("clash", "    def _train_step(self, x, y): pass\n    def _exit_scores(self, x): pass\n",
     ["--help"], "option 'lr' is declared twice, differently"),
    ("bare", "", ["--help"], "does not implement _train_step and _exit_scores"),
    ("exits", "import sys; sys.exit(5)\n", ["--help"], "failed to import: SystemExit: 5"),
    ("steps", "    def _train_step(self, x, y): raise RuntimeError('boom')\n"
              "    def _exit_scores(self, x): return [self.network(x)]\n",
     ["train", "--rule", "steps"], "plugin code failed at"),
    ("shapes", "    def _train_step(self, x, y): return torch.zeros(5), 'no'\n"
               "    def _exit_scores(self, x): return [torch.zeros(3)]\n",
     ["train", "--rule", "shapes"], "_train_step returned ((5,), 'str')"),
])
def test_a_plugin_that_breaks_the_contract_is_one_line(tmp_path, fake_fashion, case, body,
                                                       args, want):
    """A plugin's rule that clashes with an option, implements nothing, exits on import,
    raises in its step or returns the wrong shapes: one line naming it, exit 2, and no
    run folder left."""
    options = 'Option("lr", str, "x", "clash"),' if case == "clash" else ""
    code = RULE_HEAD.format(name=case, options=options) + body
    if case == "exits":
        code = body
    site = _plugin(tmp_path, case, code)
    extra = ["--data-dir", fake_fashion, "--train-limit", "64", "--test-limit", "32",
             "--epochs", "1", "--network", "fc-1x8", "--no-progress", "--run-dir",
             tmp_path / "run"] if args[0] == "train" else []
    out = _sigprop(site, *args, *extra)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and want in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_a_network_builder_that_returns_no_network_is_one_line(tmp_path):
    code = ("from sigprop import register_network\n"
            "@register_network('nonet')\ndef build(arch, shape, classes, dropout=0.0):\n"
            "    return 42\n")
    out = _sigprop(_plugin(tmp_path, "nonet", code), "bench", "--network", "nonet",
                   "--input", "1x8x8", "--steps", "1", "--repeats", "1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "sigprop: error: network builder 'nonet' (nonet) returned a int, not a "
        "sigprop.Network; fix the builder or uninstall its plugin"]
