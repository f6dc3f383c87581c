"""The benchmarks run at a tiny size and write the JSON keys other tools read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for rule in rules.split(","):
        r = result["rules"][rule]
        assert isinstance(r["time_per_sample_s"], float) and r["time_per_sample_s"] > 0
        assert isinstance(r["peak_memory_bytes"], int) and r["peak_memory_bytes"] > 0
    s = result["summary"]
    assert 0 < s["memory_ratio"] < 1 and s["throughput_ratio_median"] > 0
