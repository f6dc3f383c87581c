#!/usr/bin/env python
"""Spiking networks on this CPU: training samples/s of the four models of Table V
(bp-surrogate, shallow, sp-surrogate, sp-voltage) and the sigprop models' other settings
(``RULE:SNN_LOSS:SNN_TARGETS``) side by side in one process, with 16-bit autocast on and
off, and where a step's time goes.

    python benchmarks/snn_throughput.py                         # snn-conv, 1x28x28, batch 128
    python benchmarks/snn_throughput.py --amp on,off --steps 2 --repeats 5 --json snn.json
    python benchmarks/snn_throughput.py --models bp-surrogate,sp-voltage:voltage-leaky:current

Per model and amp setting, ``--repeats`` interleaved segments of ``--steps`` training
steps on one synthetic batch (the order rotates every repeat); the figure is the median
segment's samples/s, with the range, and each model's ratio to bp-surrogate's (same amp)
is the median of the per-repeat ratios. MACs per sample: the synapses' forward
multiply-adds over the 4 steps (the first block's once: its input is static), counted
from the shapes; a training step costs about 3x that for backprop (forward, input and
weight gradients) and about 2x for the sigprop models (no input gradients), plus the
sigprop models' 10 target rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import sigprop
from sigprop.engine.perf import tune_allocator
from sigprop.networks import build_network
from sigprop.resources import cpu_capability, half_precision_pays

# each sigprop setting named (a bare rule name runs that rule's current defaults): the
# literal readings, then the settings measured for the defaults
MODELS = ("bp-surrogate", "shallow", "sp-surrogate:surrogate:input", "sp-voltage:voltage:input",
          "sp-surrogate:surrogate:current", "sp-surrogate:surrogate-leaky:current",
          "sp-voltage:voltage-leaky:current")
CLASSES = 10


def forward_macs(net) -> int:
    """Multiply-adds of one sample's forward pass through the synapses and the head."""
    macs = 0
    for block, shape in zip(net.blocks, net.block_shapes):
        syn = block.synapse
        steps = 1 if block.first else shape[0]
        if isinstance(syn, torch.nn.Conv2d):
            h, w = shape[2] * (2 if block.pool is not None else 1), \
                shape[3] * (2 if block.pool is not None else 1)
            per = syn.in_channels * syn.out_channels * syn.kernel_size[0] * syn.kernel_size[1]
            macs += steps * per * h * w
        else:
            macs += steps * syn.in_features * syn.out_features
    head = net.head.linear
    return macs + net.steps * head.in_features * head.out_features


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default="1x28x28", help="CxHxW")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--models", default=",".join(MODELS),
                   help="RULE or RULE:SNN_LOSS[:SNN_TARGETS], comma-separated")
    p.add_argument("--amp", default="on,off", help="on, off or both (on,off)")
    p.add_argument("--steps", type=int, default=2, help="training steps per segment")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="cpu", help="cpu | cuda (fp16 autocast and a GradScaler with amp on)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()  # as `sigprop train` does
    shape = tuple(int(v) for v in args.input.split("x"))
    models = args.models.split(",")
    amps = args.amp.split(",")
    g = torch.Generator().manual_seed(1)
    device = torch.device(args.device)
    x = torch.randn(args.batch_size, *shape, generator=g).to(device)
    y = torch.randint(0, CLASSES, (args.batch_size,), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rules = {}
    for model in models:
        for amp in amps:
            torch.manual_seed(0)
            name, *setting = model.split(":")
            extra = dict(zip(("snn_loss", "snn_targets"), setting))
            rule = sigprop.build_rule(name, build_network("snn-conv", shape, CLASSES),
                                      CLASSES, amp=amp, **extra).to(device)
            rule.set_training(True)
            for _ in range(args.warmup):
                rule.train_step(x, y)
            rules[(model, amp)] = rule
    macs = forward_macs(next(iter(rules.values())).network)

    def segment(rule) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            rule.train_step(x, y)
        sync()
        return args.steps * args.batch_size / (time.perf_counter() - t0)

    rates = {k: [] for k in rules}
    keys = list(rules)
    for r in range(args.repeats):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            rates[k].append(segment(rules[k]))
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)

    rows = {}
    capability = cpu_capability()
    auto = half_precision_pays(args.device)
    print(f"snn-conv, input {args.input}, batch {args.batch_size}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; CPU: {capability}; "
          f"forward {macs / 1e6:.0f} M multiply-adds a sample\n"
          f"amp auto would choose: {'16-bit' if auto[0] else 'float32'} ({auto[1]})\n")
    print("| model | amp | samples/s (median, range) | / bp-surrogate (same amp) |")
    print("|---|---|---|---|")
    for (model, amp), v in rates.items():
        ref = rates.get(("bp-surrogate", amp))
        ratio = statistics.median(a / b for a, b in zip(v, ref)) if ref else None
        rows[f"{model}/amp-{amp}"] = {
            "model": model, "amp": amp, "samples_per_s": statistics.median(v),
            "range": [min(v), max(v)], "ratio_to_bp_surrogate": ratio}
        print(f"| {model} | {amp} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | "
              f"{'' if ratio is None else f'{ratio:.2f}'} |")
    if len(amps) > 1:
        print("\namp on / off (median of per-repeat ratios):")
        for model in models:
            on, off = rates.get((model, "on")), rates.get((model, "off"))
            if on and off:
                print(f"  {model}: {statistics.median(a / b for a, b in zip(on, off)):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"input": args.input, "batch_size": args.batch_size,
                       "threads": torch.get_num_threads(), "forward_macs": macs,
                       "cpu_capability": capability, "amp_auto": {"half": auto[0],
                                                                  "why": auto[1]},
                       "models": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
