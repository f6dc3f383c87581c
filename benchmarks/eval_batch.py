#!/usr/bin/env python
"""Evaluation batch size against evaluation speed: the batch a run chooses (cut to fit,
:mod:`sigprop.engine.batchmemory`) beside the batch asked for, timed side by side in one
process, so the cut's cost in speed is seen.

    python benchmarks/eval_batch.py                              # snn-conv sp-voltage
    python benchmarks/eval_batch.py --network conv --rule sigprop --sizes 100,250,1000

Per batch size, ``--repeats`` interleaved segments, each evaluating ``--samples`` synthetic
images (the order rotates every repeat); the figure is the median segment's samples/s and
each size's ratio to the first size's is the median of the per-repeat ratios. Also prints
the evaluation batch the run would choose and its measured bytes per sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from sigprop.data import dataset_spec
from sigprop.engine import batchmemory
from sigprop.engine.config import Config
from sigprop.engine.trainer import build_config_rule
from sigprop.resources import cpu_capability


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--network", default="snn-conv")
    ap.add_argument("--rule", default="sp-voltage")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--sizes", default="", help="batch sizes (default: the chosen one, 1000)")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = Config()
    cfg.data.dataset, cfg.model.network, cfg.rule.name = args.dataset, args.network, args.rule
    cfg.validate()
    device = torch.device("cpu")
    rule = build_config_rule(cfg, device)
    shape = dataset_spec(args.dataset).shape
    chosen = batchmemory.choose(rule, shape, 1000, args.samples, device)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        sorted({chosen.size, min(1000, args.samples)})
    print(f"{args.network} {args.rule}, {args.samples} samples, torch {torch.__version__}, "
          f"CPU {cpu_capability()}, {torch.get_num_threads()} thread(s)")
    print(chosen.line())
    rule.set_training(False)
    x = torch.randn(args.samples, *shape)
    y = torch.randint(0, 10, (args.samples,))

    def segment(batch: int) -> float:
        t0 = time.perf_counter()
        for i in range(0, args.samples, batch):
            rule.eval_step(x[i:i + batch], y[i:i + batch])
        return args.samples / (time.perf_counter() - t0)

    segment(sizes[0])  # warm-up
    rates: dict[int, list[float]] = {s: [] for s in sizes}
    for r in range(args.repeats):
        order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
        for s in order:
            rates[s].append(segment(s))
    base = sizes[0]
    rows = []
    for s in sizes:
        ratio = statistics.median(a / b for a, b in zip(rates[s], rates[base]))
        rows.append({"batch": s, "samples_per_s": statistics.median(rates[s]),
                     "ratio": ratio, "bytes": chosen.fixed + s * chosen.per_sample})
        print(f"  batch {s:5d}: {statistics.median(rates[s]):8.1f} samples/s "
              f"(range {min(rates[s]):.1f}-{max(rates[s]):.1f}), x{ratio:.2f} batch {base}'s; "
              f"charged {(chosen.fixed + s * chosen.per_sample) / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"network": args.network, "rule": args.rule, "cpu": cpu_capability(),
                       "threads": torch.get_num_threads(), "chosen": chosen.record(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
