#!/usr/bin/env python
"""glibc allocator settings against sigprop's one-process step, 1 and 2 threads.

    python benchmarks/allocator_settings.py                 # fc-4x1000, batch 128, 2 rounds

Each setting runs in a fresh process (mallopt applies to the whole process): ``full``
is what the CLI applies (engine/perf.py: mmap off, 1 GiB trim threshold), ``no-mmap-max``
the same but with mmap left on for blocks over 32 MiB, ``untuned`` glibc's defaults.
Per setting: samples/s of 3 segments with 2 threads (the pipelined step), then 2 with 1
thread, and the page faults of all of them (getrusage). Rounds alternate the settings;
compare within a round only (this machine drifts by +-20% between segments).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = ("full", "no-mmap-max", "untuned")


def measure(setting: str, network: str, steps: int) -> None:
    import layer_parallel as lp

    if setting == "full":
        from sigprop.engine.perf import tune_allocator

        tune_allocator()
    elif setting == "no-mmap-max":
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        mallopt(-2, 64 << 20)  # M_TOP_PAD
    args = argparse.Namespace(seed=0, network=network, input="1x28x28", classes=10,
                              batch_size=128)
    rule = lp._build(args)
    x, y = lp._batch(args)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    two = [lp.time_single(rule, x, y, 2, steps, 10) for _ in range(3)]
    one = [lp.time_single(rule, x, y, 1, steps, 10) for _ in range(2)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(f"{setting:<12} 2 threads {[round(v) for v in two]}  1 thread "
          f"{[round(v) for v in one]}  page faults {faults}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="fc-4x1000")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--_setting", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._setting:
        measure(args._setting, args.network, args.steps)
        return 0
    from sigprop.resources import cpu_capability

    print(f"{args.network}, batch 128, torch {torch.__version__}; CPU kernels: {cpu_capability()}")
    for _ in range(args.rounds):
        for setting in SETTINGS:
            subprocess.run([sys.executable, __file__, "--_setting", setting, "--network",
                            args.network, "--steps", str(args.steps)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
