#!/usr/bin/env python
"""Training throughput and peak activation memory: sigprop vs backprop, one process.

    python benchmarks/throughput_memory.py                       # fc-3x1000, batch 128, CPU
    python benchmarks/throughput_memory.py --profile --json out.json
    python benchmarks/throughput_memory.py --device cuda --threads 1

What it measures (see benchmarks/README.md for the method):

* throughput: every rule is built once (same seed, same initial network weights),
  warmed up, then timed in ``--repeats`` interleaved segments of ``--steps`` training
  steps each (the order of the rules alternates between repeats). Per rule: median,
  min and max samples/s over its segments. The sigprop/backprop ratio is computed per
  paired repeat (same repeat, adjacent in time) and summarised by its median and range,
  since the throughput of a shared CPU drifts between segments.
* matmul FLOPs per step, counted analytically from the network's Linear layers, and
  the GFLOP/s each rule achieves; the FLOP ratio is the ideal throughput ratio.
* peak activation memory: bytes of tensors saved for backward during one training
  step, counted by ``sigprop.engine.memory.SavedTensorMeter`` (autograd's
  ``saved_tensors_hooks`` and the fast path's kept tensors): a running total goes up
  when a tensor is packed and down when it is released; the peak is reported.
  Cross-check: unique saved bytes per block, combined as max over blocks (sigprop,
  each block's graph is freed by its own backward) or sum over blocks (backprop).

Data are synthetic image batches (`--input`, default Fashion-MNIST-shaped 1x28x28; 10 classes) made on the
device before timing, so no data loading is measured. Only the public API is used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

import sigprop
from sigprop.engine.memory import SavedTensorMeter
from sigprop.engine.perf import tune_allocator
from sigprop.resources import cpu_capability

NUM_CLASSES = 10
MIB = 1024 * 1024


# --- setup ----------------------------------------------------------------------------

def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a sample shape like 3x32x32, got {text!r}")
    return shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training throughput (samples/s) and peak activation memory per step "
        "of sigprop vs backprop, side by side in one process.",
    )
    p.add_argument("--network", default="fc-3x1000", help="network name (default fc-3x1000)")
    p.add_argument("--input", default="1x28x28", type=_shape, metavar="CxHxW",
                   help="sample shape (default 1x28x28, Fashion-MNIST; 3x32x32: CIFAR-10)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout (default 0.1)")
    p.add_argument("--head", default="target", choices=("target", "classifier"),
                   help="sigprop's prediction: target (Fig. 2a, default) | classifier "
                   "(Fig. 2b, as the paper's efficiency tables)")
    p.add_argument("--signal", default="label",
                   help="sigprop's target generator (default label; loop-pred and loop-error "
                   "run with the classifier head)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--steps", type=int, default=20,
                   help="steps per timed segment (default 20); each segment ends by waiting "
                   "for updates still in flight (sigprop's pipeline drains, as at an epoch's "
                   "end), which 20 steps keep to a small share")
    p.add_argument("--repeats", type=int, default=30,
                   help="interleaved timed segments per rule (default 30; short segments, "
                   "many pairs: this CPU's speed drifts by 30%% within seconds)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps per rule (default 20)")
    p.add_argument("--rules", default="sigprop,sigprop-sequential,sigprop-autograd,backprop",
                   help="comma-separated rule names (default sigprop,sigprop-sequential,"
                   "sigprop-autograd,backprop; sigprop-sequential is sigprop with "
                   "pipeline='off', sigprop-autograd with fast_path='off' as well)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table per rule (top ops by self time) and a "
                   "side-by-side per-op comparison")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="training steps per profile with --profile (default 10)")
    p.add_argument("--profile-rounds", type=int, default=6,
                   help="interleaved profiles per rule with --profile; per-op medians "
                   "(default 6)")
    p.add_argument("--memory-detail", action="store_true",
                   help="list every tensor saved for backward in the memory step")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--no-tune-allocator", action="store_true",
                   help="leave glibc malloc as is (the CLI tunes it; see sigprop.engine.perf)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    p.add_argument("--pool", type=int, default=16,
                   help="pre-generated batches cycled through (default 16)")
    p.add_argument("--target-throughput", type=float, default=1.15,
                   help="required sigprop/backprop throughput ratio (default 1.15)")
    p.add_argument("--target-memory", type=float, default=0.5,
                   help="allowed sigprop/backprop activation memory ratio (default 0.5)")
    args = p.parse_args(argv)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not args.rules:
        p.error("--rules is empty")
    if len(set(args.rules)) != len(args.rules):
        p.error("--rules lists a rule twice")
    for name in ("batch_size", "steps", "repeats", "pool", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def machine_facts(device: torch.device) -> dict:
    facts = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sigprop": getattr(sigprop, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "load_average": load_average(),
        "device": str(device),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def make_pool(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Synthetic image batches of ``--input`` shape: pixels in [0, 1], normalised as
    Fashion-MNIST's; uniform labels."""
    g = torch.Generator().manual_seed(args.seed + 1)
    pool = []
    for _ in range(args.pool):
        x = torch.rand(args.batch_size, *args.input, generator=g)
        x = (x - 0.286) / 0.353  # Fashion-MNIST mean / std
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g)
        pool.append((x.to(device), y.to(device)))
    return pool


RULE_SPECS = {  # benchmark name -> (library rule, options)
    "sigprop-sequential": ("sigprop", {"pipeline": "off"}),
    "sigprop-autograd": ("sigprop", {"fast_path": "off", "pipeline": "off"}),
    "sigprop-sparse": ("sigprop", {"targets": "sparse"}),
    "sigprop-sparse-sequential": ("sigprop", {"targets": "sparse", "pipeline": "off"}),
}
VARIANT_NOTES = {
    "sigprop-sequential": "the fast path with every update in sequence (pipeline='off')",
    "sigprop-autograd": "the same updates through autograd, in sequence (fast_path='off')",
    "sigprop-sparse": "sparse targets (Sec. III-E; targets='sparse')",
    "sigprop-sparse-sequential": "sparse targets, every update in sequence",
}


def base_rule(name: str) -> str:
    return RULE_SPECS.get(name, (name, {}))[0]


def build(name: str, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(args.seed)  # same initial network weights for every rule
    net = sigprop.build_network(args.network, args.input, NUM_CLASSES, dropout=args.dropout)
    rule_name, options = RULE_SPECS.get(name, (name, {}))
    if rule_name == "sigprop":
        options = {**options, "signal": args.signal, "head": args.head}
        if args.signal in ("loop-pred", "loop-error"):  # Fig. 2c needs the classifier head
            options["head"] = "classifier"
    rule = sigprop.build_rule(rule_name, net, NUM_CLASSES, **options)
    rule.modules.to(device)
    rule.set_training(True)
    return rule


class Stepper:
    """Cycles one rule through the batch pool (each rule sees the same sequence)."""

    def __init__(self, rule, pool) -> None:
        self.rule, self.pool, self.k = rule, pool, 0
        self.last = None

    def __call__(self, steps: int) -> None:
        rule, pool = self.rule, self.pool
        for _ in range(steps):
            x, y = pool[self.k % len(pool)]
            self.k += 1
            self.last = rule.train_step(x, y)
        rule.sync()  # updates still in flight (sigprop's pipeline) count in the segment


# --- FLOPs ------------------------------------------------------------------------------

def weight_layers(module: nn.Module, sample_shape: tuple[int, ...]) -> list[tuple[nn.Module, int]]:
    """Every Linear and Conv2d of ``module`` in forward order, with the multiply-adds
    of one sample's forward through it (a conv's depend on its output size, found by
    one traced sample in eval mode)."""
    found: list[tuple[nn.Module, int]] = []

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            macs = out[0].numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        else:
            macs = m.in_features * m.out_features
        found.append((m, macs))

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    was = [m.training for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad():
            ref = next(module.parameters())
            module(torch.zeros(1, *sample_shape, device=ref.device, dtype=ref.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, t in zip(module.modules(), was):
            m.training = t
    return found


def matmul_flops(rule_name: str, network, n: int, m: int = NUM_CLASSES,
                 per_sample: bool = False) -> dict:
    """Matmul and convolution FLOPs of one training step (2 FLOPs per multiply-add).

    backprop: per Linear or Conv2d 2·n·MACs for the forward, the same for the weight
      gradient, and the same for the input gradient of every layer but the first (the
      input needs no gradient); head included.
    sigprop ('label' signal, target head): block 1 sees n rows, later blocks n + m rows
      (inputs and the m class targets in one call); forward + weight gradient, no input
      gradients (block inputs are detached; inside a block, layers after the first do
      need input gradients). Plus L_pred, h·tᵀ: forward 2·n·d·m and its two gradients
      (w.r.t. h and t), and the generator Linear(m, d) on the m one-hot rows (forward +
      weight gradient). The untrained head costs nothing. Per-sample signals
      (``per_sample``, e.g. label-input): later blocks see 2n rows (one target per
      sample), L_pred compares with the m class means; the generator's elementwise
      work is not counted.
    Other rules: counted like backprop. Elementwise work (BatchNorm, activations,
    pooling, Adam) is not counted.
    """
    blocks = list(network.blocks)
    notes = []
    parts: dict[str, int] = defaultdict(int)
    per_block = []
    shape = network.input_shape
    for i, block in enumerate(blocks):
        per_block.append(weight_layers(block, shape))
        shape = network.block_shapes[i]
    if base_rule(rule_name) == "sigprop":
        shapes = network.block_shapes
        sparse = RULE_SPECS.get(rule_name, ("", {}))[1].get("targets") == "sparse"
        for i, layers in enumerate(per_block):
            rows = n if i == 0 else (2 * n if per_sample else n + m)
            if sparse and len(shapes[i]) == 3:  # conv blocks: the targets are fields
                rows = n
            for j, (_, macs) in enumerate(layers):
                f = 2 * rows * macs
                parts["forward"] += f
                parts["weight_grad"] += f
                if j > 0:
                    parts["input_grad"] += f
            d = math.prod(shapes[i])
            parts["lpred"] += 3 * 2 * n * d * m
        if sparse:
            notes.append("sparse targets: conv blocks counted for the inputs only (a field "
                         "costs m x C_in x C_out)")
        if per_sample:
            notes.append("sigprop counted for a per-sample signal (n targets, m class means)")
        else:
            parts["generator"] += 2 * 2 * m * m * math.prod(shapes[0])
            notes.append("sigprop counted for the 'label' signal (m = classes targets)")
    else:
        layers = [lm for b in per_block for lm in b]
        layers += weight_layers(network.head, network.block_shapes[-1])
        for i, (_, macs) in enumerate(layers):
            f = 2 * n * macs
            parts["forward"] += f
            parts["weight_grad"] += f
            if i > 0:
                parts["input_grad"] += f
    return {"total": sum(parts.values()), "parts": dict(parts), "notes": notes}


# --- activation memory --------------------------------------------------------------------

def measure_activation_memory(rule, name: str, x, y, sync, detail: bool = False) -> dict:
    """Peak live saved-for-backward bytes of one training step, plus the per-block split."""
    network = rule.network
    fast = bool(getattr(rule, "fast_parts", None))  # sigprop's written-out step
    pipelined = bool(getattr(rule, "pipelines", False))  # blocks overlap: no segments
    meter = SavedTensorMeter(rule.modules.parameters(), detail,
                             segment=fast and not pipelined)
    handles = []

    def enter(region):
        def hook(_module, _inputs):
            meter.enter(region)
        return hook

    if not fast:
        for i, block in enumerate(network.blocks):
            handles.append(block.register_forward_pre_hook(enter(f"block{i + 1}")))
        handles.append(network.head.register_forward_pre_hook(enter("head")))
    gc.collect()
    sync()
    cuda_peak = None
    try:
        if x.device.type == "cuda":
            base = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
        # pipelined sigprop: updates held back until the forward must wait, so the
        # peak is the most the pipeline ever keeps (deterministic, timing-free)
        lagging = getattr(rule, "lagging_updates", contextlib.nullcontext)
        with meter.counting(), lagging():
            rule.train_step(x, y)
            rule.sync()
        sync()
        gc.collect()
        if x.device.type == "cuda":
            cuda_peak = torch.cuda.max_memory_allocated(x.device) - base
    finally:
        for h in handles:
            h.remove()
    regions = dict(meter.region_bytes)
    # Cross-check: sigprop frees each block's graph in its own backward -> max over
    # blocks; backprop keeps the whole graph until its one backward -> sum.
    local = base_rule(name) == "sigprop"
    combine = max if local else sum
    per_block = combine(regions.values()) if regions else 0
    method = "max over blocks" if local else "sum over blocks"
    if pipelined:  # one block's update overlaps the next block's forward
        per_block, method = meter.peak, "pipelined: updates held back as far as allowed"
    return {
        "peak_bytes": meter.peak,
        "per_block_bytes": per_block,
        "per_block_method": method,
        "regions": regions,
        "saved_tensors": meter.packed,
        "live_after_step": meter.live_bytes,
        "cuda_peak_allocated_bytes": cuda_peak,
        "detail": meter.log,
    }


# --- profile ------------------------------------------------------------------------------

def _profile_once(stepper: Stepper, steps: int, device: torch.device, sync):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    sync()
    with profile(activities=acts) as prof:
        stepper(steps)
        sync()
    return prof.key_averages()


def profile_rules(steppers: dict[str, Stepper], steps: int, rounds: int,
                  device: torch.device, sync) -> dict[str, dict]:
    """Per-op self time per step of each rule: ``rounds`` profiles of ``steps`` steps,
    interleaved between the rules (order alternating), median per op over rounds, so
    the machine's drift falls on every rule alike. The table is the last round's."""
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    names = list(steppers)
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {n: defaultdict(list) for n in names}
    tables: dict[str, str] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            events = _profile_once(steppers[name], steps, device, sync)
            tables[name] = events.table(sort_by=sort, row_limit=20)
            for e in events:
                t = getattr(e, attr, None)
                if t is None and device.type == "cuda":
                    t = getattr(e, "self_cuda_time_total", 0)
                samples[name][e.key].append(((t or 0) / steps, e.count / steps))
    out = {}
    for name in names:
        per_op = {}
        for key, vals in samples[name].items():
            vals = vals + [(0.0, 0.0)] * (rounds - len(vals))  # absent in a round: 0
            per_op[key] = {"self_us_per_step": statistics.median(v[0] for v in vals),
                           "calls_per_step": statistics.median(v[1] for v in vals)}
        out[name] = {"table": tables[name], "per_op": per_op, "sort": sort}
    return out


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")


def profile_groups(per_op: dict[str, dict]) -> dict[str, float]:
    """ms per step in: matrix products, Adam kernel, Adam.step Python, dropout bits, rest."""
    def ms(pred):
        return sum(v["self_us_per_step"] for k, v in per_op.items() if pred(k)) / 1e3

    groups = {
        "matrix products": ms(lambda k: k in MATMUL_OPS),
        "fused Adam kernel": ms(lambda k: k == "aten::_fused_adam_"),
        "Adam.step (Python)": ms(lambda k: k.startswith("Optimizer.step")),
        "random bits": ms(lambda k: k == "aten::random_"),
    }
    total = ms(lambda k: True)
    groups["everything else"] = total - sum(groups.values())
    groups["all ops"] = total
    return groups


def side_by_side(profiles: dict[str, dict], top: int = 15) -> str:
    names = list(profiles)
    keys: set[str] = set()
    for prof in profiles.values():
        ranked = sorted(prof["per_op"].items(), key=lambda kv: -kv[1]["self_us_per_step"])
        keys.update(k for k, _ in ranked[:top])

    def cost(k):
        return max(p["per_op"].get(k, {}).get("self_us_per_step", 0.0) for p in profiles.values())

    width = max([len(k) for k in keys] + [10])
    head = f"{'op':<{width}}" + "".join(f"  {n + ' ms/step':>18}  {'calls':>6}" for n in names)
    lines = [head, "-" * len(head)]
    for k in sorted(keys, key=cost, reverse=True):
        row = f"{k:<{width}}"
        for n in names:
            e = profiles[n]["per_op"].get(k)
            if e is None:
                row += f"  {'-':>18}  {'-':>6}"
            else:
                row += f"  {e['self_us_per_step'] / 1e3:>18.3f}  {e['calls_per_step']:>6.1f}"
        lines.append(row)
    totals = "".join(
        f"  {sum(e['self_us_per_step'] for e in profiles[n]['per_op'].values()) / 1e3:>18.3f}"
        f"  {'':>6}" for n in names
    )
    lines.append(f"{'total self time':<{width}}" + totals)
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------

def _fmt_mib(b: int | float | None) -> str:
    return "n/a" if b is None else f"{b / MIB:.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tuned = False if args.no_tune_allocator else tune_allocator()
    sync = make_sync(device)
    facts = machine_facts(device)

    print("== machine")
    for k, v in facts.items():
        print(f"  {k:16} {v}")
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    if device.type == "cpu" and torch.get_num_threads() > 1 and load1 > 0.5:
        print(f"  WARNING: load average {load1:.2f} on {os.cpu_count()} CPUs before the "
              f"benchmark: other processes compete for the cores; with "
              f"{torch.get_num_threads()} threads, parallel ops wait for descheduled "
              "threads and timings can be many times slower and noisy (try --threads 1)")
    print(f"  allocator tuned  {tuned} (same process setting for every rule)")
    print("== setup")
    print(f"  network {args.network}  dropout {args.dropout}  signal {args.signal}  "
          f"batch {args.batch_size}  "
          f"rules {','.join(args.rules)}")
    print(f"  warmup {args.warmup}  repeats {args.repeats} x {args.steps} steps per rule, "
          f"interleaved (order alternates per repeat)  pool {args.pool} synthetic batches "
          f"{args.input}, {NUM_CLASSES} classes")

    pool = make_pool(args, device)
    rules = {name: build(name, args, device) for name in args.rules}
    for name, rule in rules.items():
        if hasattr(rule, "step_kind"):
            print(f"  {name} step: {rule.step_kind}")
    steppers = {name: Stepper(rule, pool) for name, rule in rules.items()}
    n = args.batch_size

    # FLOPs (analytic)
    flops = {name: matmul_flops(name, rule.network, n,
                                per_sample=getattr(getattr(rule, "signal", None), "per_sample",
                                                   False))
             for name, rule in rules.items()}

    # warm-up: each rule on its own (Adam state, allocator, kernels settle)
    for name, st in steppers.items():
        st(args.warmup)
    sync()

    # timed, interleaved segments
    seg_times: dict[str, list[float]] = {name: [] for name in args.rules}
    gc_was_enabled = gc.isenabled()
    for r in range(args.repeats):
        order = args.rules if r % 2 == 0 else args.rules[::-1]
        for name in order:
            gc.collect()
            gc.disable()
            sync()
            t0 = time.perf_counter()
            steppers[name](args.steps)
            sync()
            seg_times[name].append(time.perf_counter() - t0)
            if gc_was_enabled:
                gc.enable()

    results: dict = {"machine": facts, "args": {k: v for k, v in vars(args).items()},
                     "rules": {}}
    print("== throughput (samples/s per segment)")
    thr: dict[str, list[float]] = {}
    for name in args.rules:
        thr[name] = [args.steps * n / t for t in seg_times[name]]
        print(f"  {name:10} " + " ".join(f"{v:8.0f}" for v in thr[name]))
    print("== per rule")
    for name in args.rules:
        med = statistics.median(thr[name])
        last = steppers[name].last
        finite = bool(torch.isfinite(last[0]).all()) if last is not None else True
        f = flops[name]
        gflop = f["total"] / 1e9
        results["rules"][name] = {
            "time_per_sample_s": 1.0 / med,
            "samples_per_s": thr[name], "median_samples_per_s": med,
            "min_samples_per_s": min(thr[name]), "max_samples_per_s": max(thr[name]),
            "ms_per_step_median": 1e3 * n / med,
            "gflop_per_step": gflop, "flop_parts": f["parts"],
            "achieved_gflop_per_s": gflop * med / n,
            "last_losses": [float(v) for v in last[0].flatten()] if last is not None else None,
            "losses_finite": finite,
        }
        parts = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in f["parts"].items())
        print(f"  {name:10} median {med:8.0f} samples/s (min {min(thr[name]):.0f}, "
              f"max {max(thr[name]):.0f}), {1e3 * n / med:.2f} ms/step; "
              f"{gflop:.3f} GFLOP/step ({parts}) -> {gflop * med / n:.1f} GFLOP/s"
              + ("" if finite else "  [NON-FINITE LOSS]"))
        for note in f["notes"]:
            print(f"  {'':10} note: {note}")

    # activation memory (deterministic: one step after the timing, same batch for all)
    print("== activation memory per training step (bytes saved for backward)")
    x0, y0 = pool[0]
    for name in args.rules:
        mem = measure_activation_memory(rules[name], name, x0, y0, sync, args.memory_detail)
        results["rules"][name]["memory"] = mem
        results["rules"][name]["peak_memory_bytes"] = mem["peak_bytes"]
        regions = ", ".join(f"{k} {_fmt_mib(v)}" for k, v in mem["regions"].items())
        print(f"  {name:10} peak live {_fmt_mib(mem['peak_bytes'])}  "
              f"({mem['per_block_method']}: {_fmt_mib(mem['per_block_bytes'])}; "
              f"{mem['saved_tensors']} saved tensors; {mem['peak_bytes']} B)")
        print(f"  {'':10} new saved bytes by region: {regions}")
        for line in mem["detail"] or []:
            print(f"  {'':10} {line}")
        if mem["cuda_peak_allocated_bytes"] is not None:
            print(f"  {'':10} CUDA peak allocated above baseline during the step: "
                  f"{_fmt_mib(mem['cuda_peak_allocated_bytes'])} (includes grads, Adam temps)")
        if mem["live_after_step"]:
            print(f"  {'':10} WARNING: {_fmt_mib(mem['live_after_step'])} of saved tensors "
                  "still alive after the step (graph retained?)")

    profiles = {}
    if args.profile:
        for name, rule in rules.items():
            if getattr(rule, "pipelines", False):
                print(f"  note: {name} is pipelined; the profiler records the ops of the main "
                      "thread only, not the update thread's (weight gradients, Adam): "
                      "profile sigprop-sequential for a per-op comparison")
        profiles = profile_rules(steppers, args.profile_steps, args.profile_rounds, device,
                                 sync)
        for name in args.rules:
            print(f"== profile: {name} (last of {args.profile_rounds} rounds of "
                  f"{args.profile_steps} steps, sorted by {profiles[name]['sort']})")
            print(profiles[name]["table"])
        print(f"== profile side by side (self time per step, median over "
              f"{args.profile_rounds} interleaved rounds; top ops of each rule)")
        print(side_by_side(profiles))
        groups = {n: profile_groups(p["per_op"]) for n, p in profiles.items()}
        print("== profile by kind (ms per step)")
        print(f"  {'':22}" + "".join(f"{n:>18}" for n in args.rules))
        for g in next(iter(groups.values())):
            print(f"  {g:22}" + "".join(f"{groups[n][g]:18.3f}" for n in args.rules))
        results["profile"] = {k: v["per_op"] for k, v in profiles.items()}
        results["profile_groups"] = groups

    # summary
    print("== summary")
    summary: dict = {}
    if "sigprop" in rules and "backprop" in rules:
        s, b = results["rules"]["sigprop"], results["rules"]["backprop"]
        ratios = [a / c for a, c in zip(thr["sigprop"], thr["backprop"])]
        r_med = statistics.median(ratios)
        ideal = flops["backprop"]["total"] / flops["sigprop"]["total"]
        m_ratio = s["memory"]["peak_bytes"] / max(b["memory"]["peak_bytes"], 1)
        m_ratio2 = s["memory"]["per_block_bytes"] / max(b["memory"]["per_block_bytes"], 1)
        thr_ok = r_med >= args.target_throughput
        mem_ok = m_ratio <= args.target_memory
        summary = {
            "throughput_ratio_median": r_med, "throughput_ratios": ratios,
            "throughput_ratio_min": min(ratios), "throughput_ratio_max": max(ratios),
            "ideal_ratio_from_flops": ideal,
            "memory_ratio": m_ratio, "memory_ratio_per_block_method": m_ratio2,
            "target_throughput": args.target_throughput, "throughput_pass": thr_ok,
            "target_memory": args.target_memory, "memory_pass": mem_ok,
        }
        print(f"throughput  sigprop {s['median_samples_per_s']:.0f} samples/s  backprop "
              f"{b['median_samples_per_s']:.0f} samples/s  ratio {r_med:.2f} (median of "
              f"{len(ratios)} paired repeats, range {min(ratios):.2f}-{max(ratios):.2f})")
        print(f"flops       sigprop {s['gflop_per_step']:.3f} GFLOP/step  backprop "
              f"{b['gflop_per_step']:.3f} GFLOP/step  ideal throughput ratio {ideal:.2f}; "
              f"achieved {s['achieved_gflop_per_s']:.1f} vs {b['achieved_gflop_per_s']:.1f} "
              "GFLOP/s")
        print(f"activation memory per step  sigprop {_fmt_mib(s['memory']['peak_bytes'])}  "
              f"backprop {_fmt_mib(b['memory']['peak_bytes'])}  ratio {m_ratio:.3f} "
              f"(per-block cross-check: {_fmt_mib(s['memory']['per_block_bytes'])} vs "
              f"{_fmt_mib(b['memory']['per_block_bytes'])}, ratio {m_ratio2:.3f})")
        for variant, note in VARIANT_NOTES.items():
            if variant not in rules:
                continue
            a = results["rules"][variant]
            ratios_a = [v / c for v, c in zip(thr[variant], thr["backprop"])]
            m_a = a["memory"]["peak_bytes"] / max(b["memory"]["peak_bytes"], 1)
            summary[f"{variant}_throughput_ratio_median"] = statistics.median(ratios_a)
            summary[f"{variant}_throughput_ratios"] = ratios_a
            summary[f"{variant}_memory_ratio"] = m_a
            print(f"            {variant} {a['median_samples_per_s']:.0f} samples/s  "
                  f"ratio {statistics.median(ratios_a):.2f} (range {min(ratios_a):.2f}-"
                  f"{max(ratios_a):.2f}), activation memory "
                  f"{_fmt_mib(a['memory']['peak_bytes'])} (ratio {m_a:.3f}): {note}")
        print(f"target throughput ratio >= {args.target_throughput:.2f}: "
              f"{'PASS' if thr_ok else 'FAIL'} ({r_med:.2f})")
        print(f"target memory ratio     <= {args.target_memory:.2f}: "
              f"{'PASS' if mem_ok else 'FAIL'} ({m_ratio:.3f})")
    else:
        for name in args.rules:
            s = results["rules"][name]
            print(f"{name}: {s['median_samples_per_s']:.0f} samples/s, "
                  f"activation memory {_fmt_mib(s['memory']['peak_bytes'])}")
        print("(ratios and targets need both sigprop and backprop in --rules)")
    results["summary"] = summary

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
