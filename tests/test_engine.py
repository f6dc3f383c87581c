"""Engine: lr schedules, config loading, run-folder I/O, the Trainer (metrics, NaN
detection, exact resume) on a tiny fake Fashion-MNIST."""

from __future__ import annotations

import contextlib
import io
import itertools
import errno
import json
import math
import os

import pytest
import torch
from helpers import FAKE_TRAIN, small_config

from sigprop.engine import batchmemory, runio
from sigprop.engine.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_toml,
)
from sigprop.engine.trainer import Trainer, build_experiment, evaluate, lr_factor
from sigprop.errors import CheckpointError, ConfigError, StorageError, TrainingError
from sigprop.rules.sigprop import Sigprop

# --------------------------------------------------------------------------- schedules


def test_step_schedule_100_epochs():
    f = [lr_factor("step", e, 100) for e in range(100)]
    assert f[:50] == [1.0] * 50
    assert f[50:75] == [0.25] * 25
    assert f[75:89] == [0.25**2] * 14
    assert f[89:94] == [0.25**3] * 5
    assert f[94:] == [0.25**4] * 6


@pytest.mark.parametrize("epochs", [2, 4, 10, 37, 400])
def test_step_schedule_shape(epochs):
    f = [lr_factor("step", e, epochs) for e in range(epochs)]
    assert f[0] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f))  # never increases
    assert all(round(math.log(v, 0.25)) == pytest.approx(math.log(v, 0.25)) for v in f)
    assert set(f) <= {0.25**k for k in range(5)}
    # a decay happens at the epoch nearest each milestone fraction
    for frac, k in zip((0.50, 0.75, 0.89, 0.94), range(1, 5)):
        e = round(frac * epochs)
        if 0 < e < epochs:
            assert f[e] <= 0.25**k and f[e - 1] >= f[e]
    if epochs == 400:
        assert (f[199], f[200], f[300], f[356], f[376]) == (1.0, 0.25, 0.25**2, 0.25**3, 0.25**4)


def test_first_epoch_uses_base_lr_for_one_epoch_runs():
    assert lr_factor("step", 0, 1) == 1.0


def test_first_epoch_uses_base_lr():
    assert all(lr_factor(s, 0, e) == 1.0 for s in ("step", "cosine", "none")
               for e in range(2, 200))


def test_cosine_and_none_schedules():
    epochs = 8
    f = [lr_factor("cosine", e, epochs) for e in range(epochs)]
    assert f[0] == 1.0
    for e, v in enumerate(f):
        assert v == pytest.approx(0.5 * (1 + math.cos(math.pi * e / epochs)))
    assert f[4] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(f)) and f[-1] > 0
    assert [lr_factor("none", e, epochs) for e in range(epochs)] == [1.0] * epochs


# --------------------------------------------------------------------------- config


def write_toml(path, text):
    path.write_text(text)
    return path


def test_toml_loading_and_flag_precedence(tmp_path):
    p = write_toml(tmp_path / "c.toml", """
[data]
batch_size = 32
data_dir = "/somewhere"
[model]
network = "fc-2x64"
dropout = 0.1
[rule]
name = "sigprop"
lr = 1e-3
signal_learned = false
logit_scale = 0.5
[train]
epochs = 3
schedule = "cosine"
""")
    cfg = apply_overrides(Config(), load_toml(p))
    assert cfg.data.batch_size == 32 and cfg.data.data_dir == "/somewhere"
    assert cfg.model.network == "fc-2x64" and cfg.model.dropout == 0.1
    assert cfg.rule.name == "sigprop" and cfg.rule.lr == 1e-3
    opts = cfg.rule.resolved()
    assert opts.signal_learned is False and opts.logit_scale == 0.5
    assert cfg.train.epochs == 3 and cfg.train.schedule == "cosine"
    assert cfg.data.eval_batch_size == Config().data.eval_batch_size  # untouched default
    # flags (strings, as argparse gives them) win over the file
    cfg2 = apply_overrides(cfg, {"train": {"epochs": "5"}, "rule": {"lr": "0.01"},
                                 "data": {"data_dir": "/other"}}, text=True)
    assert cfg2.train.epochs == 5 and cfg2.rule.lr == 0.01 and cfg2.data.data_dir == "/other"
    assert cfg2.model.network == "fc-2x64" and cfg2.train.schedule == "cosine"
    assert cfg.train.epochs == 3  # the original is not mutated
    cfg2.validate()
    assert config_from_dict(cfg2.to_dict()) == cfg2  # round trip through JSON-able dict
    assert config_from_dict(json.loads(json.dumps(cfg2.to_dict()))) == cfg2


def test_runs_recorded_before_target_dropout_resume_as_they_trained():
    """A config.json without rule.target_dropout is from before the option: its runs
    dropped their targets, so with dropout it reads back as 'on'; without dropout the
    option does nothing and takes today's default."""
    d = Config().to_dict()
    del d["rule"]["target_dropout"]
    assert config_from_dict(d).rule.resolved().target_dropout == "off"  # no dropout
    d["model"]["dropout"] = 0.1
    assert config_from_dict(d).rule.resolved().target_dropout == "on"
    assert "target_dropout" not in d["rule"]  # the caller's dict is left alone
    d["rule"]["target_dropout"] = "off"
    assert config_from_dict(d).rule.resolved().target_dropout == "off"


# a config.json of the layout before rules declared their own options: every rule's
# options in one [rule] table
OLD_RULE_TABLE = {
    "name": "backprop", "lr": 0.0005, "weight_decay": 0.0, "signal": "label",
    "signal_learned": True, "head": "classifier", "loss": "dot", "logit_scale": None,
    "bn_stats": "inputs", "target_dropout": "off", "eta": 1.0, "targets": "dense",
    "sparse_size": None, "sparse_grid": 1, "ll_beta": None, "ll_features": 2048,
    "loopback": "learned", "ep_free_steps": None, "ep_nudge_steps": None, "ep_dt": 0.5,
    "ep_beta": None, "ep_beta_sign": "auto", "ep_lrs": "", "ep_tol": 0.0,
    "exit_targets": "prototypes", "fast_path": "auto", "pipeline": "auto",
    "spike_threshold": None, "amp": "auto"}


@pytest.mark.parametrize("name", ["backprop", "ll-fa", "ep-loopback", "sigprop"])
def test_runs_recorded_with_every_rules_options_still_load(name):
    """Options the recorded rule does not take had no effect on it: they are dropped; its
    own are kept (and any it declares since, at their defaults)."""
    from sigprop.registry import RULES

    d = Config().to_dict()
    d["rule"] = {**OLD_RULE_TABLE, "name": name}
    cfg = config_from_dict(d)
    cfg.validate()
    shared = {"name", "lr", "weight_decay", "amp"}
    scope = {o.name for o in RULES.get(name).option_scope(OLD_RULE_TABLE)}
    assert set(cfg.to_dict()["rule"]) == shared | scope
    for key in scope & set(OLD_RULE_TABLE):
        assert cfg.to_dict()["rule"][key] == OLD_RULE_TABLE[key]


def test_a_rule_refuses_options_that_are_not_its_own():
    cfg = apply_overrides(Config(), {"rule": {"name": "backprop", "head": "classifier"}})
    with pytest.raises(ConfigError, match=r"head \(--head\) is an option of sigprop.*not of "
                                          r"rule 'backprop'; drop it"):
        cfg.validate()
    cfg = apply_overrides(Config(), {"rule": {"eta": 0.5}})  # sigprop, signal label
    with pytest.raises(ConfigError, match=r"eta .* signal loop-error, not of rule 'sigprop' "
                                          r"with signal 'label'"):
        cfg.validate()
    apply_overrides(cfg, {"rule": {"signal": "loop-error", "head": "classifier"}}).validate()


@pytest.mark.parametrize("section,key,value", [
    ("train", "epochs", "1"), ("rule", "lr", "0.1"), ("rule", "signal_learned", "false"),
    ("data", "batch_size", "64"),
])
def test_toml_values_must_have_their_type(section, key, value):
    """A string is converted only when it comes from a flag: ``epochs = "1"`` in a file
    is a mistake to point out, not to guess at."""
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: expected"):
        apply_overrides(Config(), {section: {key: value}})
    apply_overrides(Config(), {section: {key: value}}, text=True)


def test_repo_presets_load(pytestconfig):
    presets = list((pytestconfig.rootpath / "configs").glob("*.toml"))
    for p in presets:
        apply_overrides(Config(), load_toml(p)).validate()


@pytest.mark.parametrize("text,match", [
    ("[rule]\nlearning_rate = 0.1\n", r"unknown key rule\.learning_rate"),
    ("[optim]\nlr = 0.1\n", r"unknown config section \[optim\]"),
    ("epochs = 3\n", r"unknown config section \[epochs\]"),
    ("[train]\nepochs = \"three\"\n", r"train\.epochs: expected int"),
    ("[train]\nepochs = 2.5\n", r"train\.epochs: expected int"),
    ("[train]\nepochs = true\n", r"train\.epochs: expected int"),
    ("[rule]\nlr = true\n", r"rule\.lr: expected float"),
    ("[rule]\nsignal_learned = \"maybe\"\n", r"rule\.signal_learned: expected bool"),
    ("[model]\nnetwork = 5\n", r"model\.network: expected str"),
    ("[data]\ntrain_limit = [1]\n", r"data\.train_limit: expected int"),
    ("[rule\nlr = 1\n", "not valid TOML"),
])
def test_toml_errors_name_the_key(tmp_path, text, match):
    p = write_toml(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), load_toml(p))


def test_missing_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize("over,match", [
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"eval_batch_size": -3}}, "data.eval_batch_size"),
    ({"data": {"train_limit": 0}}, "data.train_limit"),
    ({"model": {"dropout": 1.0}}, "model.dropout"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"check_every": 0}}, "train.check_every"),
    ({"train": {"schedule": "linear"}}, "train.schedule"),
    ({"rule": {"lr": -1.0}}, "learning rate"),
    ({"rule": {"signal": "xyz"}}, "signal"),
])
def test_validate_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), over).validate()


def test_string_coercions():
    """Flags arrive as strings and are converted; a TOML or API value must have its type."""
    cfg = apply_overrides(Config(), {"rule": {"signal_learned": "no", "logit_scale": "0.25"},
                                     "data": {"train_limit": "100"}}, text=True)
    opts = cfg.rule.resolved()
    assert opts.signal_learned is False and opts.logit_scale == 0.25
    assert cfg.data.train_limit == 100
    assert apply_overrides(cfg, {"data": {"train_limit": None}}).data.train_limit is None


# --------------------------------------------------------------------------- run io


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    runio.atomic_write_text(p, "one")
    runio.atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(tmp_path) == ["f.txt"]


def checkpoint_state(epoch: int = 1, **extra) -> dict:
    """The layout of a checkpoint the trainer writes (contents made up)."""
    return {"epoch": epoch, "config": Config().to_dict(),
            "rule": {"modules": {}, "optimizers": []}, "rng": torch.get_rng_state(),
            "cuda_rng": None, "history": [{"epoch": e + 1} for e in range(epoch)], **extra}


def test_failed_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    runio.save_checkpoint(p, checkpoint_state(1))

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runio.os, "replace", boom)
    with pytest.raises(StorageError, match=r"cannot write .*checkpoint\.pt \(No space left on "
                                           r"device: the disk is full\)"):
        runio.save_checkpoint(p, checkpoint_state(2))
    monkeypatch.undo()
    assert runio.load_checkpoint(p)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    # an interrupt mid-write is cleaned up the same way
    monkeypatch.setattr(runio.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        runio.atomic_write_text(p, "x")
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    p = tmp_path / "checkpoint.pt"
    state = checkpoint_state(3, t=torch.arange(5))
    runio.save_checkpoint(p, state)
    back = runio.load_checkpoint(p)
    assert back["epoch"] == 3 and torch.equal(back["t"], torch.arange(5))
    assert back["format"] == runio.CHECKPOINT_FORMAT
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match="unreadable"):
        runio.load_checkpoint(p)
    p.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError):
        runio.load_checkpoint(p)
    torch.save({"epoch": 1}, p)  # a torch file, not ours
    with pytest.raises(CheckpointError, match="not a sigprop checkpoint"):
        runio.load_checkpoint(p)
    torch.save([1, 2], p)
    with pytest.raises(CheckpointError, match="not a sigprop checkpoint"):
        runio.load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        runio.load_checkpoint(tmp_path / "missing.pt")


def test_read_json_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        runio.read_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        runio.read_json(tmp_path / "config.json")


def test_write_metrics_jsonl_and_csv(tmp_path):
    import csv

    history = [{"epoch": 1, "test_acc": 0.5, "exits": {"layer1": 0.4}},
               {"epoch": 2, "test_acc": 0.6, "exits": {"layer1": 0.45}}]
    runio.write_metrics(tmp_path, history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == history
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["exits.layer1"] for r in rows] == ["0.4", "0.45"]
    assert [float(r["test_acc"]) for r in rows] == [0.5, 0.6]


# --------------------------------------------------------------------------- trainer


def run_quiet(cfg, run_dir, resume=False):
    return Trainer(cfg, run_dir, resume=resume, out=io.StringIO()).run()


def test_trainer_learns_and_writes_run_folder(fake_fashion, tmp_path):
    cfg = small_config(fake_fashion, rule={"lr": 5e-3}, train={"epochs": 4})
    out = io.StringIO()
    history = Trainer(cfg, tmp_path / "run", out=out).run()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["lr"] for r in history] == pytest.approx(
        [cfg.rule.lr * lr_factor("step", e, 4) for e in range(4)])
    last = history[-1]
    assert last["test_acc"] > 0.9  # the patches are easy
    assert last["test_error"] == pytest.approx(1 - last["test_acc"])
    assert set(last["test_acc_exits"]) == {"layer1", "layer2"}
    assert last["test_acc"] == last["test_acc_exits"]["layer2"]
    assert history[0]["train_loss"] > last["train_loss"]
    files = sorted(os.listdir(tmp_path / "run"))
    assert files == [".lock", "checkpoint.pt", "config.json", "metrics.csv", "metrics.jsonl"]
    jsonl = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == history
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config_from_dict(conf["config"]) == cfg and conf["seed"] == 0
    assert "torch" in conf["versions"]
    ckpt = runio.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 4 and ckpt["history"] == history
    lines = out.getvalue().splitlines()
    if cfg.rule.name == "sigprop":  # first, how its step is computed
        assert lines.pop(0).startswith("sigprop step: written-out local updates")
    assert lines.pop(0).startswith("precision: float32")  # then the precision it chose
    assert lines.pop(0).startswith("evaluation batch: ")  # and the evaluation batch
    assert [x.split()[1] for x in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(f"test_acc {r['test_acc']:.4f}" in x for x, r in zip(lines, history))
    # the checkpoint reproduces the reported accuracy
    exp = build_experiment(cfg, with_train=False)
    exp.rule.load_state_dict(ckpt["rule"])
    assert evaluate(exp.rule, exp.test) == last["test_acc_exits"]
    # a second run into the same folder needs resume
    with pytest.raises(ConfigError, match="--resume"):
        run_quiet(cfg, tmp_path / "run")


def test_trainer_train_limit_and_sample_counts(fake_fashion, tmp_path):
    cfg = small_config(fake_fashion, data={"train_limit": 100}, train={"epochs": 1})
    exp = build_experiment(cfg)
    assert exp.train.num_samples == 100 and exp.test.num_samples == 200
    hist = run_quiet(cfg, tmp_path / "r")
    correct = hist[0]["train_acc"] * 100
    assert correct == pytest.approx(round(correct))  # accuracy over exactly 100 samples


def _nan_at(monkeypatch, global_step, exit_index):
    """Make the sigprop rule report a NaN loss of one exit at one (1-based) global step."""
    orig = Sigprop.train_step
    count = {"n": 0}

    def patched(self, x, y, index=None):
        losses, correct = orig(self, x, y, index)
        if x.shape[0] <= max(batchmemory.PROBE):
            return losses, correct  # the memory probe's steps, on a copy of the rule
        count["n"] += 1
        if count["n"] == global_step:
            losses = losses.clone()
            losses[exit_index] = float("nan")
        return losses, correct

    monkeypatch.setattr(Sigprop, "train_step", patched)


STEPS_PER_EPOCH = FAKE_TRAIN // 64  # 16


@pytest.mark.parametrize("check_every,global_step,exit_index", [
    (50, 3, 1),   # one partial window per epoch
    (3, 5, 0),    # inside the second full window
    (3, 16, 1),   # the last, partial (one-step) window of epoch 1
    (5, 14, 0),   # row 4 of the third window (steps 11-15)
    (1, 19, 1),   # epoch 2, step 3, checked every step
    (4, 32, 0),   # last step of epoch 2, end of a full window
])
def test_nan_loss_names_layer_epoch_and_step(fake_fashion, tmp_path, monkeypatch,
                                             check_every, global_step, exit_index):
    _nan_at(monkeypatch, global_step, exit_index)
    cfg = small_config(fake_fashion, train={"epochs": 3, "check_every": check_every})
    with pytest.raises(TrainingError) as info:
        run_quiet(cfg, tmp_path / "run")
    epoch, step = divmod(global_step - 1, STEPS_PER_EPOCH)
    msg = str(info.value)
    assert f"layer{exit_index + 1}" in msg
    assert f"epoch {epoch + 1}," in msg and f"step {step + 1};" in msg and "nan" in msg
    # the epoch with the NaN is not checkpointed; earlier epochs are
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    if epoch == 0:
        assert not ckpt_path.exists()
    else:
        assert runio.load_checkpoint(ckpt_path)["epoch"] == epoch
        assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == epoch


def test_a_failed_fresh_run_leaves_nothing_and_a_failed_resume_its_records(
        fake_fashion, tmp_path, monkeypatch):
    """A NaN loss before the first checkpoint: the fresh run's files and the folder it
    made are gone (the same command can start again); in a folder that existed, only its
    files. A resume that stops the same way keeps config.json as recorded before."""
    _nan_at(monkeypatch, 3, 0)
    cfg = small_config(fake_fashion, train={"epochs": 1})
    with pytest.raises(TrainingError):
        run_quiet(cfg, tmp_path / "made")
    assert not (tmp_path / "made").exists()
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / runio.METRICS_CSV).write_text("the user's own\n")  # not ours
    monkeypatch.undo()
    _nan_at(monkeypatch, 3, 0)
    with pytest.raises(TrainingError):
        run_quiet(cfg, tmp_path / "given")
    left = {p.name for p in (tmp_path / "given").iterdir()} & set(runio.RUN_FILES)
    assert left == {runio.METRICS_CSV}
    monkeypatch.undo()
    run_quiet(cfg, tmp_path / "run")
    before = (tmp_path / "run" / runio.CONFIG).read_bytes()
    _nan_at(monkeypatch, 1, 0)
    longer = small_config(fake_fashion, train={"epochs": 2})
    with pytest.raises(TrainingError, match="epoch 2, step 1"):
        run_quiet(longer, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / runio.CONFIG).read_bytes() == before
    assert runio.load_checkpoint(tmp_path / "run" / runio.CHECKPOINT)["epoch"] == 1


def test_real_divergence_is_caught(fake_fashion, tmp_path, monkeypatch):
    """A genuinely non-finite loss (inf inputs) raises TrainingError, not a crash later."""
    from sigprop.data import DeviceLoader

    orig = DeviceLoader._normalise

    def poisoned(self, x):
        out = orig(self, x)
        if self.shuffle:  # training batches only
            out[0, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(DeviceLoader, "_normalise", poisoned)
    # the rule's own check of x would stop it first (InputError); this test is the loss's
    from sigprop.rules import LearningRule
    monkeypatch.setattr(LearningRule, "check_finite", False)
    cfg = small_config(fake_fashion, train={"epochs": 1, "check_every": 4})
    with pytest.raises(TrainingError, match=r"layer1 became nan at epoch 1, step 1;"):
        run_quiet(cfg, tmp_path / "run")


def _strip_timing(history):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "samples_per_s")}
            for r in history]


def _interrupt_after(monkeypatch, epochs_done):
    orig = Trainer._epoch

    def patched(self, exp, epoch):
        if epoch == epochs_done:
            raise KeyboardInterrupt
        return orig(self, exp, epoch)

    monkeypatch.setattr(Trainer, "_epoch", patched)


@pytest.mark.parametrize("rule", [
    {"name": "sigprop"},
    {"name": "sigprop", "signal": "label-input", "head": "classifier"},
    {"name": "sigprop", "pipeline": "on"},  # updates on the update thread
    {"name": "sigprop", "signal": "loop-error", "head": "classifier", "pipeline": "on"},
    {"name": "backprop"},
])
def test_resume_replays_exactly(fake_fashion, tmp_path, monkeypatch, rule):
    cfg = small_config(fake_fashion, model={"network": "fc-2x32", "dropout": 0.2}, rule=rule,
                       data={"train_limit": 256}, train={"epochs": 4})
    full = run_quiet(cfg, tmp_path / "full")
    _interrupt_after(monkeypatch, 2)  # a run killed during its third epoch
    with pytest.raises(KeyboardInterrupt):
        run_quiet(cfg, tmp_path / "split")
    assert runio.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 2
    monkeypatch.undo()
    out = io.StringIO()
    resumed = Trainer(cfg, tmp_path / "split", resume=True, out=out).run()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("resuming") and "after epoch 2" in lines[0]
    epochs = [x for x in lines[1:] if x.startswith("epoch")]
    assert [x.split()[1] for x in epochs] == ["3/4", "4/4"]
    assert _strip_timing(resumed) == _strip_timing(full)
    a = runio.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = runio.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["rule"]["modules"].keys() == b["rule"]["modules"].keys()
    for k, v in a["rule"]["modules"].items():
        assert torch.equal(v, b["rule"]["modules"][k]), k
    assert torch.equal(a["rng"], b["rng"])
    jsonl = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert _strip_timing([json.loads(x) for x in jsonl]) == _strip_timing(full)


def test_resume_depends_on_restored_rng(fake_fashion, tmp_path, monkeypatch):
    """Sensitivity of the resume test: without the saved RNG state, dropout draws differ."""
    cfg = small_config(fake_fashion, model={"network": "fc-2x32", "dropout": 0.2},
                       data={"train_limit": 256}, train={"epochs": 3})
    full = run_quiet(cfg, tmp_path / "full")
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_quiet(cfg, tmp_path / "split")
    monkeypatch.undo()
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    resumed = run_quiet(cfg, tmp_path / "split", resume=True)
    assert _strip_timing(resumed)[:2] == _strip_timing(full)[:2]
    assert resumed[2]["train_loss"] != full[2]["train_loss"]


def test_resume_without_checkpoint_starts_fresh(fake_fashion, tmp_path):
    cfg = small_config(fake_fashion, train={"epochs": 1})
    out = io.StringIO()
    hist = Trainer(cfg, tmp_path / "new", resume=True, out=out).run()
    assert len(hist) == 1 and "starting the run from the beginning" in out.getvalue()
    ref = run_quiet(cfg, tmp_path / "ref")
    assert _strip_timing(hist) == _strip_timing(ref)


def test_corrupt_checkpoint_on_resume(fake_fashion, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match="unreadable"):
        run_quiet(small_config(fake_fashion, train={"epochs": 1}), run, resume=True)


def test_same_seed_same_run_other_seed_differs(fake_fashion, tmp_path):
    cfg = small_config(fake_fashion, model={"network": "fc-2x32", "dropout": 0.1},
                       data={"train_limit": 128}, train={"epochs": 1})
    a = _strip_timing(run_quiet(cfg, tmp_path / "a"))
    b = _strip_timing(run_quiet(cfg, tmp_path / "b"))
    c = _strip_timing(run_quiet(apply_overrides(cfg, {"train": {"seed": 1}}), tmp_path / "c"))
    assert a == b and a != c


def test_trainer_prints_to_current_stdout(fake_fashion, tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        Trainer(small_config(fake_fashion, data={"train_limit": 64}, train={"epochs": 1}),
                tmp_path / "run").run()
    assert "epoch 1/1" in buf.getvalue()


@pytest.mark.parametrize("rule", ["sigprop", "backprop"])
def test_last_batch_of_one_sample(fake_fashion, tmp_path, rule):
    cfg = small_config(fake_fashion, rule={"name": rule}, data={"train_limit": 129},
                       train={"epochs": 1})
    history = run_quiet(cfg, tmp_path / "run")
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
