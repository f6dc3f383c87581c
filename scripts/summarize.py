"""Markdown table of run folders: final test error and early-exit accuracy per layer.

    python scripts/summarize.py runs/results-fc/*
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(paths: list[str]) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in map(Path, paths):
        metrics = p / "metrics.jsonl"
        if not metrics.exists():
            continue
        cfg = json.loads((p / "config.json").read_text())["config"]
        last = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
        key = (cfg["data"]["dataset"], cfg["model"]["network"], cfg["model"]["dropout"],
               cfg["rule"]["name"], last["epoch"])
        groups[key].append(last)
    # Training throughput is left out on purpose: runs here may share the CPU; speed
    # is measured side by side in benchmarks/throughput_memory.py instead.
    print("| dataset | network | dropout | rule | epochs | n | test error % | early-exit test accuracy per layer |")
    print("|---|---|---|---|---|---|---|---|")
    for (ds, net, do, rule, ep), runs in sorted(groups.items()):
        errs = [100 * r["test_error"] for r in runs]
        err = f"{statistics.mean(errs):.2f}" + (f" ± {statistics.stdev(errs):.2f}" if len(errs) > 1 else "")
        exits = runs[0]["test_acc_exits"]
        ex = ", ".join(
            f"{k} {statistics.mean(r['test_acc_exits'][k] for r in runs):.4f}" for k in exits
        ) if rule == "sigprop" else "-"
        print(f"| {ds} | {net} | {do} | {rule} | {ep} | {len(runs)} | {err} | {ex} |")


if __name__ == "__main__":
    main(sys.argv[1:])
