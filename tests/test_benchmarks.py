"""The benchmarks run at a tiny size and write the JSON keys other tools read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from sigprop.engine.memory import SavedTensorMeter


@pytest.mark.parametrize("network,shape,rules", [
    ("fc-2x32", "1x28x28", "sigprop,sigprop-sequential,backprop"),
    ("conv", "1x16x16", "sigprop,sigprop-sparse,backprop"),
])
def test_throughput_memory_tiny(tmp_path, network, shape, rules):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput_memory.py"), "--network",
           network, "--input", shape, "--batch-size", "8", "--steps", "1", "--repeats", "2",
           "--warmup", "1", "--pool", "2", "--threads", "1", "--rules", rules, "--head",
           "classifier", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for rule in rules.split(","):
        r = result["rules"][rule]
        assert isinstance(r["time_per_sample_s"], float) and r["time_per_sample_s"] > 0
        assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0
    s = result["summary"]
    assert 0 < s["memory_ratio"] < 1 and s["throughput_ratio_median"] > 0


def test_sigprop_bench_tiny(tmp_path, capsys):
    """`sigprop bench` at a tiny size: both tables, and the JSON keys of the issue."""
    from sigprop.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--network", "conv", "--input", "1x16x16", "--batch-size", "4",
               "--rules", "backprop,ll-bp,ll-fa,sigprop,dfa", "--targets",
               "dense,sparse,sparse-g2", "--steps", "1", "--repeats", "2", "--warmup", "1",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| Time (ms) |" in text and "| Mem (MiB) |" in text and "| layer |" in text
    assert "| Activations (MiB) |" in text and ", act " in text
    result = json.loads(out.read_text())
    names = ["backprop", "ll-bp", "ll-fa", "sigprop", "sigprop-sparse", "sigprop-sparse-g2",
             "dfa"]
    assert list(result["rules"]) == names
    for name in names:
        r = result["rules"][name]
        assert isinstance(r["time_per_sample_s"], float) and r["time_per_sample_s"] > 0
        assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0
        assert isinstance(r["layers"], list)
        # the activations are the peak less the state (parameters, gradients, Adam's)
        assert 0 < r["activation_memory_bytes"] < r["peak_memory_bytes"]
        if name != "backprop":  # backprop is timed as a whole, as the paper
            assert len(r["layers"]) == 5
            for layer in r["layers"]:
                assert layer["time_per_sample_s"] > 0 and layer["peak_memory_bytes"] > 0
    assert result["rules"]["backprop"]["layers"] == []
    act = {n: result["rules"][n]["activation_memory_bytes"] for n in names}
    assert act["sigprop"] < act["backprop"]  # no input gradients held for a backward pass
    assert "machine" in result and "commit" in result


def test_sigprop_bench_channels_last(tmp_path, capsys):
    """--layout channels-last: every rule's maps NHWC in memory; the same columns."""
    from sigprop.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--network", "conv", "--input", "2x16x16", "--batch-size", "4",
                 "--rules", "backprop,ll-fa,sigprop", "--targets", "dense,sparse",
                 "--layout", "channels-last", "--steps", "1", "--repeats", "1", "--warmup",
                 "1", "--json", str(out)]) == 0
    assert "layout channels-last" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert list(result["rules"]) == ["backprop", "ll-fa", "sigprop", "sigprop-sparse"]
    assert result["args"]["layout"] == "channels-last"


def test_sigprop_bench_errors(capsys):
    from sigprop.cli import main

    for argv, match in [(["bench", "--rules", "nope"], "unknown rule 'nope'"),
                        (["bench", "--targets", "thin"], "--targets takes dense"),
                        (["bench", "--targets", "sparse-g0"], "--targets takes dense"),
                        (["bench", "--input", "3xx32"], "sample shape"),
                        (["bench", "--network", "fc-2x8", "--input", "12", "--layout",
                          "channels-last"], "needs --input CxHxW")]:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err


def test_saved_tensor_meter_counts_each_storage_once_while_held():
    """The meter of `sigprop bench` and the benchmarks: a saved storage counts once, from
    its first save to its release; parameters are not counted; peaks per region."""
    w = torch.randn(8, 4, requires_grad=True)
    x = torch.randn(16, 8, requires_grad=True)
    meter = SavedTensorMeter([w])
    with meter.counting():
        meter.enter("block1")
        y = (x @ w).exp()  # saves x (512 B; w skipped) and y (256 B)
        z = y.sin()  # saves y again: the same storage
        meter.enter("block2")
        loss = (z * z).sum()  # saves z (256 B) twice
    assert meter.peak == meter.live_bytes == 512 + 256 + 256
    assert dict(meter.region_peak) == {"block1": 768, "block2": 1024}
    assert dict(meter.region_bytes) == {"block1": 768, "block2": 256}
    assert meter.packed == 5
    loss.backward()
    assert meter.live_bytes == 0 and not meter.live and meter.peak == 1024


def test_saved_tensor_meter_segments_start_when_nothing_is_held():
    meter = SavedTensorMeter([], segment=True)
    a, b = torch.zeros(10), torch.zeros(5)
    held = [meter.pack(a), meter.pack(a[2:])]  # a view shares a's storage
    assert meter.region == "block1" and meter.live_bytes == 40
    del held
    held = [meter.pack(b)]
    assert meter.region == "block2" and dict(meter.region_bytes) == {"block1": 40, "block2": 20}
    del held
    assert meter.live_bytes == 0 and meter.peak == 40 and meter.segments == 2


def test_layer_parallel_splits_by_measured_time_counted_cost_or_hand():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "layer_parallel_bench", ROOT / "benchmarks" / "layer_parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(network="fc-4x64", input="1x8x8", classes=10, batch_size=16,
                              seed=0, stages=2, split=None, split_by="measured",
                              stage_threads=1)
    rule = bench._build(args)
    before = [p.detach().clone() for p in rule.network.parameters()]
    state = torch.random.get_rng_state()
    plan = bench.choose_split(args, rule, 16)
    assert plan["by"] == "measured" and plan["unit"] == "ms"
    assert sum(plan["split"]) == 4 and len(plan["split"]) == 2 and min(plan["split"]) >= 1
    assert len(plan["block_costs"]) == 4 and all(c > 0 for c in plan["block_costs"])
    assert sum(plan["shares"]) == pytest.approx(1.0)
    # the calibration trains a throwaway copy: the benchmarked rule and the random stream
    # are as they were
    assert all(torch.equal(a, b) for a, b in zip(before, rule.network.parameters()))
    assert torch.equal(state, torch.random.get_rng_state())
    args.split_by = "counted"
    assert bench.choose_split(args, rule, 16)["by"] == "counted"
    args.split = "3,1"
    hand = bench.choose_split(args, rule, 16)
    assert hand["by"] == "hand" and hand["split"] == [3, 1]


def test_pooling_and_step_profile_run_tiny(tmp_path):
    pool = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pooling.py"), "--rows",
                           "2", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert pool.returncode == 0, pool.stderr[-2000:]
    assert "forward, ATen / fast" in pool.stdout
    out = tmp_path / "profile.json"
    prof = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"),
                           "--network", "conv", "--input", "1x16x16", "--batch-size", "4",
                           "--rules", "sigprop,backprop", "--steps", "1", "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert prof.returncode == 0, prof.stderr[-2000:]
    result = json.loads(out.read_text())
    for rule in ("sigprop", "backprop"):
        r = result["rules"][rule]
        conv = [o for o in r["ops"] if o["op"].startswith("convolution")]
        assert conv and all(o["gflop_per_step"] > 0 for o in conv)
        assert sum(o["share"] for o in r["ops"]) == pytest.approx(1.0)
    # --by-shape: a row per op and input shapes, the same step time in all
    prof = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_profile.py"),
                           "--network", "conv", "--input", "1x16x16", "--batch-size", "4",
                           "--rules", "sigprop", "--steps", "1", "--threads", "1", "--by-shape",
                           "--top", "0", "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert prof.returncode == 0, prof.stderr[-2000:]
    ops = [o["op"] for o in json.loads(out.read_text())["rules"]["sigprop"]["ops"]]
    assert any(o.startswith("convolution 4x1x16x16 ") for o in ops), ops


def test_layout_benchmark_tiny(tmp_path):
    """benchmarks/layout.py: each rule in both layouts, side by side, with its ratios."""
    out = tmp_path / "layout.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "layout.py"), "--network", "conv",
           "--input", "2x16x16", "--batch-size", "4", "--steps", "1", "--repeats", "2",
           "--rules", "backprop,sigprop", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU kernels:" in proc.stdout and "| sigprop | channels-last |" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"backprop/nchw", "backprop/channels-last",
                                      "sigprop/nchw", "sigprop/channels-last"}
    assert all(len(r["segments"]) == 2 and r["s_per_step"] > 0
               for r in result["results"].values())


def test_conv_kernels_benchmark_tiny(tmp_path):
    """benchmarks/conv_kernels.py: its four tables over VGG8b's layers, every other form
    of the arithmetic equal to the library's (the shifted products, the conv forms of
    L_pred's products, the earlier BatchNorm backward)."""
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "conv_kernels.py"), "--batch", "2",
           "--targets", "1", "--repeats", "1", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU kernels:" in proc.stdout
    result = json.loads(out.read_text())
    assert len(result["rows"]) == 6 and len(result["lpred"]) == 6 and len(result["wgrad"]) == 5
    assert all(r["forward_2"] > 0 and r["wgrad_3"] > 0 for r in result["rows"])
    assert all(d < 1e-4 for r in result["lpred"] for d in r["max_rel_diff"].values())
    assert all(r["max_rel_diff"] < 1e-4 for r in result["wgrad"])
    assert len(result["bn"]) == 6 and all(r["max_rel_diff"] < 1e-4 for r in result["bn"])
    bad = subprocess.run(cmd[:2] + ["--tables", "rows,nope"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode == 2 and "--tables" in bad.stderr
