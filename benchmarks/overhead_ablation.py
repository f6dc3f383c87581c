"""Where sigprop's step time goes on fc-3x1000: ablations measured side by side.

    python benchmarks/overhead_ablation.py                 # batch 128, 2 threads
    python benchmarks/overhead_ablation.py --threads 1 --batch-size 512

Every variant is built from the same weights and timed in short interleaved segments
(order alternating), like throughput_memory.py; the speed-up over backprop is the
median of the per-repeat paired ratios. The variants that change the math exist only
here, to bound what removing a cost could buy; none of them is a training option:

  backprop                reference
  sigprop                 the sequential fast path (pipeline='off'), one Adam step
  sigprop-pipelined       the rule as a user gets it on this CPU (sigprop.rules.sigprop.pipeline)
  sigprop-autograd        the same updates through autograd (fast_path='off')
  sigprop-adam-per-block  one Adam.step() call per block instead of one for all (same math)
  sigprop-no-adam         optimizer step skipped (gradients still computed)
  backprop-no-adam        optimizer step skipped

``*-no-adam`` show the shared Adam cost; ``sigprop-adam-per-block`` the cost of
separate optimizer calls. The sigprop variants other than ``sigprop-pipelined`` run the
sequential step, whose costs they take apart.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import sigprop
from sigprop.engine.perf import tune_allocator
from sigprop.resources import cpu_capability

VARIANTS = ["backprop", "sigprop", "sigprop-pipelined", "sigprop-autograd",
            "sigprop-adam-per-block", "sigprop-no-adam", "backprop-no-adam"]


def build(variant: str, args: argparse.Namespace):
    torch.manual_seed(args.seed)
    net = sigprop.build_network("fc-3x1000", (1, 28, 28), 10, dropout=args.dropout)
    options = {}
    if variant.startswith("sigprop") and variant != "sigprop-pipelined":
        options["pipeline"] = "off"
    if variant == "sigprop-autograd":
        options["fast_path"] = "off"
    rule = sigprop.build_rule(variant.split("-")[0], net, 10, **options)
    rule.set_training(True)
    if "no-adam" in variant:
        for opt in rule.optimizers:
            opt.step = lambda: None
    if variant == "sigprop-adam-per-block":
        (opt,) = rule.optimizers
        per_block = [torch.optim.Adam([g], lr=g["lr"], fused=True) for g in opt.param_groups]
        opt.step = lambda: [o.step() for o in per_block]
    return rule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown or names[0] != "backprop":
        p.error(f"variants: start with backprop, choose from {', '.join(VARIANTS)}")
    g = torch.Generator().manual_seed(args.seed + 1)
    pool = [((torch.rand(args.batch_size, 1, 28, 28, generator=g) - 0.286) / 0.353,
             torch.randint(0, 10, (args.batch_size,), generator=g)) for _ in range(16)]
    rules = {v: build(v, args) for v in names}

    def run(rule, steps):
        for k in range(steps):
            x, y = pool[k % len(pool)]
            rule.train_step(x, y)
        rule.sync()  # pipelined updates in flight count in the segment

    for rule in rules.values():
        run(rule, args.warmup)
    times: dict[str, list[float]] = {v: [] for v in names}
    gc.disable()
    for r in range(args.repeats):
        for v in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            run(rules[v], args.steps)
            times[v].append((time.perf_counter() - t) / args.steps * 1e3)
    gc.enable()
    print(f"fc-3x1000  batch {args.batch_size}  threads {args.threads}  dropout {args.dropout}  "
          f"{args.repeats} x {args.steps} steps per variant, interleaved; "
          f"CPU kernels: {cpu_capability()}")
    print(f"{'variant':28} {'ms/step':>8} {'speed-up vs backprop':>22}")
    base = times["backprop"]
    for v in names:
        ratio = statistics.median(b / t for b, t in zip(base, times[v]))
        print(f"{v:28} {statistics.median(times[v]):8.2f} {ratio:22.3f}")


if __name__ == "__main__":
    main()
