#!/usr/bin/env python
"""One training step per op: time, FLOPs, bytes touched and share of the step, per rule.

    python benchmarks/step_profile.py                                # VGG8b, CIFAR-shaped, batch 128
    python benchmarks/step_profile.py --rules sigprop,ll-fa,backprop --batch-size 32
    python benchmarks/step_profile.py --network fc-3x1000 --input 1x28x28 --json out.json
    python benchmarks/step_profile.py --rules sigprop --layout channels-last --dropout 0.1 --by-shape

Every ATen op a step runs is intercepted (a ``TorchDispatchMode``), run, and charged
with its wall time (on a CPU an op is finished when it returns), its FLOPs (PyTorch's
own counting rules, ``torch.utils.flop_counter``: convolutions, matmuls and their
gradients; 2 per multiply-add; 0 for the rest) and the bytes of its tensor inputs and
outputs (each storage once per op: what the op must read and write at least, a lower
bound on its memory traffic). Ops are grouped by name over ``--steps`` steps after
``--warmup`` untimed ones; per group: time per step, share of the step, GFLOP and MB
per step, and the achieved GFLOP/s and GB/s, to set each against the machine's floor.

The interception costs a few microseconds per op (the step's op count is printed), so
the step time here is slightly above ``sigprop bench``'s. Sigprop runs its sequential
step (``pipeline="off"``): the pipelined one updates in a second thread, which the
interception does not see. The rules' ratios of time belong to ``sigprop bench``; this
script says where each step's time goes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from sigprop.engine.layout import FORMATS

SKIP = {"detach", "view", "_unsafe_view", "t", "as_strided", "expand", "slice", "select",
        "alias", "unsqueeze", "squeeze", "permute", "transpose", "reshape", "_reshape_alias"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _bytes(args, out) -> int:
    seen, total = set(), 0
    for t in (*_tensors(args), *_tensors(out)):
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            continue
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class OpMeter(TorchDispatchMode):
    """Wall time, FLOPs and bytes per op name (module docstring)."""

    def __init__(self, by_shape: bool = False) -> None:
        super().__init__()
        self.by_shape = by_shape
        self.time = defaultdict(float)
        self.flops = defaultdict(int)
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t
        op = func.overloadpacket.__name__
        name = op
        if self.by_shape:  # the op and its first two tensor inputs' shapes
            shapes = [tuple(t.shape) for t, _ in zip(_tensors((args, kwargs)), range(2))]
            name = f"{op} {' '.join('x'.join(map(str, s)) or '()' for s in shapes)}"
        self.time[name] += dt
        self.calls[name] += 1
        if op not in SKIP:
            self.bytes[name] += _bytes((args, kwargs), out)
        count = flop_registry.get(func.overloadpacket)
        if count is not None:
            self.flops[name] += int(count(*args, **kwargs, out_val=out))
        return out


LAYOUTS = FORMATS  # "nchw" | "channels-last" -> memory format (sigprop.engine.layout)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.lower().split("x"))


def build(rule_name: str, args):
    from sigprop import build_network, build_rule

    torch.manual_seed(args.seed)
    net = build_network(args.network, _shape(args.input), args.classes, args.dropout)
    net = net.to(memory_format=LAYOUTS[args.layout])
    kw = {"pipeline": "off"} if rule_name.startswith("sigprop") else {}
    return build_rule(rule_name, net, args.classes, **kw)


def profile(rule, x, y, steps: int, warmup: int, by_shape: bool = False
            ) -> tuple[OpMeter, float]:
    for _ in range(warmup):
        rule.train_step(x, y)
    rule.sync()
    meter = OpMeter(by_shape)
    t = time.perf_counter()
    with meter:
        for _ in range(steps):
            rule.train_step(x, y)
        rule.sync()
    return meter, (time.perf_counter() - t) / steps


def table(meter: OpMeter, steps: int) -> list[dict]:
    total = sum(meter.time.values()) or 1.0
    rows = []
    for name in sorted(meter.time, key=meter.time.get, reverse=True):
        s = meter.time[name] / steps
        rows.append({"op": name, "ms_per_step": 1e3 * s, "share": meter.time[name] / total,
                     "calls_per_step": meter.calls[name] / steps,
                     "gflop_per_step": meter.flops[name] / steps / 1e9,
                     "mb_per_step": meter.bytes[name] / steps / 1e6,
                     "gflop_per_s": meter.flops[name] / max(meter.time[name], 1e-12) / 1e9,
                     "gb_per_s": meter.bytes[name] / max(meter.time[name], 1e-12) / 1e9})
    return rows


def main(argv=None) -> int:
    from sigprop.resources import cpu_capability

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="vgg8b")
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rules", default="sigprop,backprop")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--top", type=int, default=14, help="ops shown per rule (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="after each block's activation (default 0, as the recorded profiles; "
                        "sigprop bench uses Sec. IV's 0.1)")
    p.add_argument("--layout", default="nchw", choices=tuple(LAYOUTS),
                   help="the conv weights' and input batch's memory layout")
    p.add_argument("--by-shape", action="store_true",
                   help="one row per op and the shapes of its first two tensor inputs "
                        "(which call of an op costs what)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    for flag in ("batch_size", "steps", "classes"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--warmup must be >= 0 and --threads >= 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist")
    from sigprop.registry import RULES

    for name in args.rules.split(","):
        if name not in RULES:
            p.error(f"unknown rule {name!r}; choose from {', '.join(RULES.names())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sigprop.engine.perf import tune_allocator

    tune_allocator()
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, *_shape(args.input), generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    if x.dim() == 4:
        x = x.contiguous(memory_format=LAYOUTS[args.layout])
    elif args.layout != "nchw":
        p.error("--layout channels-last needs image inputs (CxHxW)")
    print(f"CPU kernels: {cpu_capability()}; {torch.get_num_threads()} threads; "
          f"{args.network} on {args.input}, batch {args.batch_size}, {args.layout}, dropout "
          f"{args.dropout}; "
          f"{args.steps} steps after {args.warmup}", flush=True)
    out = {"network": args.network, "input": args.input, "batch_size": args.batch_size,
           "layout": args.layout, "dropout": args.dropout,
           "threads": torch.get_num_threads(), "cpu_capability": cpu_capability(),
           "torch": torch.__version__, "date": _dt.date.today().isoformat(), "rules": {}}
    for name in args.rules.split(","):
        meter, step_s = profile(build(name, args), x, y, args.steps, args.warmup,
                                args.by_shape)
        rows = table(meter, args.steps)
        flops = sum(r["gflop_per_step"] for r in rows)
        mb = sum(r["mb_per_step"] for r in rows)
        ops = sum(r["calls_per_step"] for r in rows)
        print(f"\n{name}: {1e3 * step_s:.0f} ms a step ({1e3 * step_s / args.batch_size:.2f} ms "
              f"a sample), {flops:.1f} GFLOP ({flops / step_s:.1f} GFLOP/s), {mb:.0f} MB "
              f"touched, {ops:.0f} ops")
        shown = rows[:args.top] if args.top > 0 else rows
        width = max([34] + [len(r["op"]) + 2 for r in shown])
        print(f"  {'op':<{width}}{'ms/step':>9}{'share':>7}{'calls':>7}{'GFLOP':>8}{'MB':>8}"
              f"{'GFLOP/s':>9}{'GB/s':>7}")
        for r in shown:
            print(f"  {r['op']:<{width}}{r['ms_per_step']:9.1f}{r['share']:7.1%}"
                  f"{r['calls_per_step']:7.0f}{r['gflop_per_step']:8.2f}{r['mb_per_step']:8.0f}"
                  f"{r['gflop_per_s']:9.1f}{r['gb_per_s']:7.1f}")
        out["rules"][name] = {"step_ms": 1e3 * step_s, "gflop_per_step": flops,
                              "mb_per_step": mb, "ops_per_step": ops, "ops": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    from sigprop.errors import SigpropError

    try:
        sys.exit(main())
    except SigpropError as err:  # a bad network or input shape: one line
        print(f"step_profile.py: error: {err}", file=sys.stderr)
        sys.exit(2)
