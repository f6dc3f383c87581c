#!/usr/bin/env python
"""Equilibrium propagation on this CPU: training samples/s of the batched relaxation and
update against a per-sample loop of the same code, ep-loopback against ep-symmetric, side
by side in one process, and how close a relaxation step comes to the CPU's matmul rate.

    python benchmarks/ep_dynamics.py                              # hopfield-1x500, batch 20
    python benchmarks/ep_dynamics.py --network hopfield-2x1500 --batch-size 128 --json ep.json
    python benchmarks/ep_dynamics.py --network hopfield-2x1500 --particles 2   # + particles

Per rule and mode, ``--repeats`` interleaved segments of ``--steps`` training steps on
synthetic 1x28x28 batches (the order alternates); the per-sample mode runs the same
number of samples one at a time (batch 1, so BatchNorm-free EP can), which is what a
loop over samples costs. FLOPs: 2 per multiply-add of one Euler step's matmuls (each
layer's input, the loop-back or the symmetric feedback), counted from the shapes; the
matmul rate is a plain ``addmm`` of the first layer's shape, timed the same way.

``--particles E``: each rule trained for E epochs over ``--pool`` batches of synthetic
images (their positions passed as ``index``), twice, interleaved epoch by epoch: from
zero for the rule's fixed free steps (the default), and with persistent particles,
stopping the free phase at ``--tol``; per epoch the samples/s and the free steps a batch
took. The second epoch on is where particles save steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import sigprop
from sigprop.networks import build_network
from sigprop.resources import cpu_capability

INPUT = (1, 28, 28)
CLASSES = 10


def step_macs(rule_name: str, net, n: int) -> int:
    """Multiply-adds of one Euler step of the whole batch."""
    lins = net.linears()
    macs = sum(lin.in_features * lin.out_features for lin in lins)
    if rule_name == "ep-loopback":
        macs += CLASSES * lins[0].out_features  # the loop-back
    else:
        macs += sum(lin.in_features * lin.out_features for lin in lins[1:])  # feedback
    return n * macs


def build(rule_name: str, args):
    torch.manual_seed(0)
    net = build_network(args.network, INPUT, CLASSES)
    rule = sigprop.build_rule(rule_name, net, CLASSES)
    rule.set_training(True)
    return rule


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--network", default="hopfield-1x500")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--steps", type=int, default=5, help="training steps per segment")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    p.add_argument("--particles", type=int, default=0, metavar="E",
                   help="also compare persistent particles over E epochs (0: skip)")
    p.add_argument("--pool", type=int, default=20, help="batches in an epoch (--particles)")
    p.add_argument("--tol", type=float, default=1e-3, help="free-phase residual tolerance")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.batch_size
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, *INPUT, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    rules = {name: build(name, args) for name in ("ep-loopback", "ep-symmetric")}
    modes = [(r, m) for r in rules for m in ("batched", "per-sample")]

    def segment(rule, mode):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            if mode == "batched":
                rule.train_step(x, y)
            else:
                for i in range(n):
                    rule.train_step(x[i:i + 1], y[i:i + 1])
        return args.steps * n / (time.perf_counter() - t0)

    for r, m in modes:  # warm up
        segment(rules[r], m)
    rates = {f"{r} {m}": [] for r, m in modes}
    for k in range(args.repeats):
        for r, m in (modes if k % 2 == 0 else modes[::-1]):
            rates[f"{r} {m}"].append(segment(rules[r], m))
    # the matmul rate of this CPU for the first layer's shape
    lin = rules["ep-loopback"].linears[0]
    a, w, b = torch.rand(n, lin.in_features), lin.weight.T.contiguous(), lin.bias
    reps = 200
    torch.addmm(b, a, w)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.addmm(b, a, w)
    mm_rate = 2 * n * lin.in_features * lin.out_features * reps / (time.perf_counter() - t0)
    out = {"network": args.network, "batch_size": n, "threads": torch.get_num_threads(),
           "matmul_gflop_per_s": mm_rate / 1e9, "cpu_capability": cpu_capability(),
           "rules": {}}
    print(f"CPU kernels: {cpu_capability()}")
    print(f"{args.network}, batch {n}, {torch.get_num_threads()} threads; addmm of "
          f"{n}x{lin.in_features}x{lin.out_features}: {mm_rate / 1e9:.1f} GFLOP/s")
    for r in rules:
        rule = rules[r]
        steps = rule.free_steps + rule.nudge_steps * (2 if rule.sign == "centered" else 1)
        flop = 2 * step_macs(r, rule.network, n)
        b_med = statistics.median(rates[f"{r} batched"])
        s_med = statistics.median(rates[f"{r} per-sample"])
        step_time = n / b_med / steps  # seconds per Euler step (update included)
        achieved = flop / step_time / 1e9
        out["rules"][r] = {
            "batched_samples_per_s": b_med, "per_sample_samples_per_s": s_med,
            "speedup": b_med / s_med, "euler_steps_per_train_step": steps,
            "gflop_per_euler_step": flop / 1e9, "achieved_gflop_per_s": achieved,
            "share_of_matmul_rate": achieved * 1e9 / mm_rate,
            "segments": {m: rates[f"{r} {m}"] for m in ("batched", "per-sample")},
        }
        print(f"{r:13} batched {b_med:8.0f} samples/s, per-sample loop {s_med:7.0f} "
              f"(x{b_med / s_med:.1f}); {steps} Euler steps a training step, "
              f"{flop / 1e6:.1f} MFLOP each -> {achieved:.1f} GFLOP/s "
              f"({100 * achieved * 1e9 / mm_rate:.0f}% of addmm's)")
    ratio = out["rules"]["ep-loopback"]["batched_samples_per_s"] / \
        out["rules"]["ep-symmetric"]["batched_samples_per_s"]
    out["loopback_over_symmetric"] = ratio
    print(f"ep-loopback / ep-symmetric samples/s: {ratio:.2f} (their default step counts)")
    if args.particles:
        out["particles"] = particles(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def particles(args) -> dict:
    """Per rule and epoch: samples/s and free steps a batch took, from zero (fixed steps)
    against persistent particles stopping at --tol, interleaved epoch by epoch."""
    n, pool = args.batch_size, args.pool
    g = torch.Generator().manual_seed(2)
    data = [(torch.rand(n, *INPUT, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
             torch.arange(k * n, (k + 1) * n)) for k in range(pool)]
    out = {}
    for name in ("ep-loopback", "ep-symmetric"):
        variants = {}
        for label, kw in (("from zero", {}),
                          ("particles", {"ep_persistent": "on", "ep_tol": args.tol})):
            torch.manual_seed(0)
            rule = sigprop.build_rule(name, build_network(args.network, INPUT, CLASSES),
                                      CLASSES, **kw)
            rule.set_training(True)
            variants[label] = rule
        rows = {label: [] for label in variants}
        for epoch in range(args.particles):
            for label in (list(variants) if epoch % 2 == 0 else list(variants)[::-1]):
                rule = variants[label]
                t0 = time.perf_counter()
                for x, y, index in data:
                    rule.train_step(x, y, index if rule.uses_sample_index else None)
                rate = n * pool / (time.perf_counter() - t0)
                rows[label].append({"epoch": epoch + 1, "samples_per_s": rate,
                                    "free_steps": rule.epoch_metrics()["free_steps"]})
        for label, rs in rows.items():
            print(f"{name:13} {label:10} " + "  ".join(
                f"epoch {r['epoch']}: {r['samples_per_s']:6.0f} samples/s, "
                f"{r['free_steps']:5.1f} free steps" for r in rs))
        last = {label: rs[-1]["samples_per_s"] for label, rs in rows.items()}
        print(f"{name:13} particles / from zero, last epoch: "
              f"{last['particles'] / last['from zero']:.2f}x")
        out[name] = rows
    return out


if __name__ == "__main__":
    sys.exit(main())
