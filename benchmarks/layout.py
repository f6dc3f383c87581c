#!/usr/bin/env python
"""Training step time of each rule with NCHW and with channels-last maps, side by side.

    python benchmarks/layout.py                          # VGG8b, batch 128, one thread
    python benchmarks/layout.py --rules backprop,sigprop --repeats 6 --json layout.json

Every rule is built twice from the same seed, once as built (NCHW) and once with its conv
weights and input batches laid out channels-last (NHWC in memory: oneDNN convolves such
maps without reordering them; the maps after follow). Interleaved segments of ``--steps``
steps, the order reversed every repeat, in one process; per rule and layout the median
time per step, and its ratios to backprop's step in the same layout (when backprop is
among the rules) and to its own NCHW step, each the median of the ratios within a repeat
(segments measured minutes apart share a load that the pairs cancel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from sigprop import build_network
from sigprop.engine.layout import FORMATS
from sigprop.resources import cpu_capability
from sigprop.rules import build_rule

LAYOUTS = FORMATS  # "nchw" | "channels-last" -> memory format (sigprop.engine.layout)


def paired(times: list[float], base: list[float]) -> float:
    """The median over repeats of times[r] / base[r]."""
    return statistics.median(t / b for t, b in zip(times, base))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="vgg8b")
    p.add_argument("--input", default="3x32x32", help="sample shape CxHxW")
    p.add_argument("--rules", default="backprop,ll-fa,sigprop")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="steps per timed segment")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(v) for v in args.input.split("x"))
    except ValueError:
        p.error(f"--input takes CxHxW, got {args.input!r}")
    if len(shape) != 3 or min(shape) < 1:
        p.error(f"--input takes CxHxW, got {args.input!r}")
    if min(args.batch_size, args.steps, args.repeats, args.threads) < 1:
        p.error("--batch-size, --steps, --repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, *shape, generator=g),
                torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(2)]
    rules = {}
    for name in args.rules.split(","):
        for layout, fmt in LAYOUTS.items():
            torch.manual_seed(0)
            net = build_network(args.network, shape, 10, dropout=0.1).to(memory_format=fmt)
            opts = {"head": "classifier"} if name == "sigprop" else {}
            rules[(name, layout)] = build_rule(name, net, 10, **opts)
            rules[(name, layout)].set_training(True)
    inputs = {layout: [(x.contiguous(memory_format=fmt), y) for x, y in batches]
              for layout, fmt in LAYOUTS.items()}

    def steps(key, count):
        for k in range(count):
            rules[key].train_step(*inputs[key[1]][k % 2])
        rules[key].sync()

    for key in rules:
        steps(key, 1)  # warm-up: optimizer state, allocator, kernels
    times = {key: [] for key in rules}
    print(f"{args.network}, input {args.input}, batch {args.batch_size}, {args.threads} "
          f"thread(s); CPU kernels: {cpu_capability()}; torch {torch.__version__}", flush=True)
    for r in range(args.repeats):
        for key in (list(rules) if r % 2 == 0 else list(rules)[::-1]):
            t0 = time.perf_counter()
            steps(key, args.steps)
            times[key].append((time.perf_counter() - t0) / args.steps)
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n}/{lay} {times[(n, lay)][-1]:.2f}" for n, lay in rules), flush=True)
    rows = {}
    print("\n| rule | layout | s per step (median, range) | / backprop, same layout | "
          "/ its NCHW step |\n|---|---|---|---|---|")
    for (name, layout), ts in times.items():
        med = statistics.median(ts)
        base = times.get(("backprop", layout))
        vs_bp = paired(ts, base) if base else None
        vs_own = paired(ts, times[(name, "nchw")])
        rows[f"{name}/{layout}"] = {"s_per_step": med, "range": [min(ts), max(ts)],
                                    "segments": ts, "vs_backprop_same_layout": vs_bp,
                                    "vs_own_nchw": vs_own}
        print(f"| {name} | {layout} | {med:.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
              f"{'-' if vs_bp is None else f'{vs_bp:.2f}'} | {vs_own:.2f} |")
    if args.json:
        facts = {"command": " ".join(["python", "benchmarks/layout.py", *(argv or sys.argv[1:])]),
                 "cpu_capability": cpu_capability(), "torch": torch.__version__,
                 "threads": args.threads, "results": rows}
        with open(args.json, "w") as f:
            json.dump(facts, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
