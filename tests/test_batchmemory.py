"""The evaluation batch: the live-bytes meter against hand counts, the measured bytes a
sample adds, the cut to what a batch may hold, and a run's record of it."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import one_error_line

from sigprop.cli import main
from sigprop.engine import batchmemory
from sigprop.errors import ConfigError
from sigprop.networks import build_network
from sigprop.rules import build_rule


def test_live_bytes_counts_what_operations_allocate_until_freed():
    x = torch.ones(1000)  # made outside: not counted
    with batchmemory.LiveBytes() as meter:
        a = x * 2  # 4000 bytes
        b = a + 1  # 8000 live
        v = b.view(10, 100)  # a view: nothing new
        v.mul_(3)  # in place: nothing new
        del a  # 4000 live
        c = torch.zeros(500, dtype=torch.float64)  # 8000 live
        assert meter.live_bytes == 8000
        del b, v  # the storage's last tensor gone: 4000 live
        assert meter.live_bytes == 4000
        d = x[:10]  # a view of a tensor made outside: nothing
        assert meter.live_bytes == 4000
    assert meter.peak == 8000
    assert c.numel() and d.numel()


def _rule(net="fc-2x32", shape=(1, 8, 8), name="sigprop"):
    torch.manual_seed(0)
    return build_rule(name, build_network(net, shape, 10), 10)


def test_measured_bytes_grow_with_the_network_and_leave_no_trace():
    small, big = _rule("fc-2x32"), _rule("fc-2x256")
    small.set_training(True)
    state = torch.get_rng_state()
    per_small, _ = batchmemory.measure(small, (1, 8, 8), torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())  # the run's random stream untouched
    assert small.modules.training  # its mode restored
    per_big, _ = batchmemory.measure(big, (1, 8, 8), torch.device("cpu"))
    # each block output is at least a float32 per unit, charged SLACK times
    assert per_small >= batchmemory.SLACK * 4 * 32
    assert per_big > 4 * per_small


def test_the_batch_is_cut_to_the_limit_in_equal_batches(monkeypatch):
    rule = _rule()
    per, fixed = batchmemory.measure(rule, (1, 8, 8), torch.device("cpu"))
    whole = batchmemory.choose(rule, (1, 8, 8), 1000, 10_000, torch.device("cpu"))
    assert (whole.size, whole.asked) == (1000, 1000)
    assert "cut" not in whole.line()
    few = batchmemory.choose(rule, (1, 8, 8), 1000, 30, torch.device("cpu"))
    assert few.size == 30 and not few.cut and "cut" not in few.line()
    # room for 263 samples: 1000 is evaluated as 4 batches of 250
    monkeypatch.setattr(batchmemory, "EVAL_BYTES", fixed + 263 * per + per // 2)
    cut = batchmemory.choose(rule, (1, 8, 8), 1000, 10_000, torch.device("cpu"))
    assert cut.size == 250 and cut.asked == 1000
    assert cut.nbytes <= batchmemory.limit_bytes("cpu")
    assert "cut from 1000" in cut.line() and "changes no result" in cut.line()
    assert cut.record() == {"size": 250, "asked": 1000, "cut": True,
                            "bytes_per_sample": per, "bytes_fixed": fixed}
    monkeypatch.setattr(batchmemory, "EVAL_BYTES", fixed + per // 2)
    with pytest.raises(ConfigError, match="one evaluation sample .* choose a smaller"):
        batchmemory.choose(rule, (1, 8, 8), 1000, 10_000, torch.device("cpu"))


def test_a_run_prints_and_records_its_evaluation_batch(fake_fashion, in_tmp, capsys,
                                                       monkeypatch):
    monkeypatch.setattr(batchmemory, "EVAL_BYTES", 300_000)
    run = in_tmp / "run"
    assert main(["train", "--data-dir", str(fake_fashion), "--epochs", "1", "--run-dir",
                 str(run), "--train-limit", "128", "--network", "fc-2x32",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    record = json.loads((run / "config.json").read_text())["eval_batch"]
    assert record["asked"] == 1000 and record["cut"] and 1 <= record["size"] < 1000
    assert f"evaluation batch: {record['size']}, cut from 1000" in out


def test_a_network_whose_single_sample_cannot_fit_stops_before_training(
        fake_fashion, in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(batchmemory, "EVAL_BYTES", 1)
    line = one_error_line(capsys, main([
        "train", "--data-dir", str(fake_fashion), "--epochs", "1", "--run-dir",
        str(in_tmp / "run"), "--train-limit", "128", "--network", "fc-2x32",
        "--no-progress"]))
    assert "one evaluation sample" in line
    assert not (in_tmp / "run").exists()


def _cfg(network="fc-2x32", rule="sigprop"):
    from sigprop.engine.config import Config

    cfg = Config()
    cfg.model.network, cfg.rule.name = network, rule
    return cfg


def test_a_training_step_is_measured_on_a_fresh_rule_per_sample():
    from sigprop.engine.trainer import build_config_rule

    cpu = torch.device("cpu")
    state = torch.get_rng_state()
    small, _ = batchmemory.measure_train(
        lambda: build_config_rule(_cfg("fc-2x32"), cpu, sequential=True), (1, 28, 28), 10, cpu)
    assert torch.equal(state, torch.get_rng_state())
    # (fc-2x256's peak, 10,400 bytes a sample since BatchNorm's backward lost its
    # temporary, no longer exceeds fc-2x32's, which the input rows set)
    big, _ = batchmemory.measure_train(
        lambda: build_config_rule(_cfg("fc-2x1024"), cpu, sequential=True), (1, 28, 28), 10, cpu)
    # the pipeline's update thread is off in the probe's copy (its allocations are unseen)
    assert not build_config_rule(_cfg("fc-2x256"), cpu, sequential=True).pipelines
    # at least the input and each block's output, float32, a sample, charged SLACK times
    assert small >= batchmemory.SLACK * 4 * (784 + 32 + 32)
    assert big > small
    # the gradients and the optimiser's state (parameter-shaped) are not the batch's
    three, four = torch.ones(3), torch.ones(4)
    with batchmemory.LiveBytes({(3,)}) as meter:
        a, b = three * 2, four * 2
    assert meter.peak == 16 and a.numel() == 3 and b.numel() == 4


def test_a_training_batch_that_cannot_fit_stops_before_training(
        fake_fashion, in_tmp, capsys, monkeypatch):
    from sigprop import resources
    from sigprop.engine.trainer import build_config_rule

    cpu = torch.device("cpu")
    per, fixed = batchmemory.measure_train(
        lambda: build_config_rule(_cfg(), cpu, sequential=True), (1, 28, 28), 10, cpu)
    # room for the parameters and half the batch
    room = (fixed + 512 * per) / resources.USABLE_FRACTION
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": room)
    line = one_error_line(capsys, main([
        "train", "--data-dir", str(fake_fashion), "--epochs", "1", "--run-dir",
        str(in_tmp / "run"), "--network", "fc-2x32", "--batch-size", "1024",
        "--no-progress"]))
    assert "a training batch of 1024 samples" in line and "measured" in line
    assert "lower --batch-size" in line
    assert not (in_tmp / "run").exists()
