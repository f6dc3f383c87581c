"""``sigprop bench``: training time per sample and peak memory per batch, for the whole
network and for every layer, of several rules side by side (the paper's Tables I-IV).

Time: every rule is built from the same seed and the same synthetic batches, warmed up,
then timed in ``repeats`` interleaved segments of ``steps`` training steps (the order
of the rules alternates); per rule the median time per sample over the segments and
its range. Per layer (the rules that train layer by layer: sigprop, ll-bp, ll-fa, dfa)
the same segments are cut at the marks the rule gives when it starts a block, its head
or its optimizer step (``LearningRule.marker``): a block's time is everything from its
mark to the next one (forward, local loss, backward; for dfa its forward and, later, its
backward from ``e B_i``); the one grouped Adam step is shared out by the blocks'
parameter counts (Adam's work is linear in them). Backprop is timed only as a whole, as
the paper does: its layers cannot be updated apart. A pipelined rule (sigprop on fc nets
with two threads) overlaps blocks on two threads, so its per-layer rows are left out
(``--pipeline off`` gives them).

Memory, on a CPU, counted (no allocator statistics exist there): the bytes of tensors
held for the update (autograd's saved tensors and the fast path's kept ones, each
storage once), at their peak within the step or within each layer's part of it, plus
the parameters and buffers, their gradients and the optimizer's state (per layer: the
block's own, with its auxiliaries or generator). On CUDA the allocator's peak
(``max_memory_allocated`` after ``reset_peak_memory_stats``), for the whole step and
between the marks. Beside the peak, the *activation memory* of the whole step: the peak
less that state (on CUDA: less what was allocated before the step), the memory that
grows with the batch and that the paper's rules differ in most.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..networks import build_network
from ..registry import RULES
from ..resources import check_fits, step_bytes
from ..rules.checks import check_num_classes
from ..rules import LearningRule, build_rule
from .layout import FORMATS, LAYOUTS, apply_layout, resolve_layout
from .memory import SavedTensorMeter

MIB = 2**20


@dataclass
class Variant:
    """One column: a rule and its options (``sigprop`` with sparse targets, ...)."""

    name: str
    rule: str
    options: dict[str, Any] = field(default_factory=dict)


MAX_COUNT = 10**6  # steps, repeats, samples a batch: no measurement needs more
POOL = 4  # batches of random data the steps cycle through


def _check_fits(network: str, input_shape: tuple[int, ...], num_classes: int,
                dropout: float, batch: int, rules: int, dev: torch.device) -> None:
    """Refuse a benchmark whose inputs, networks and one step's activations cannot fit,
    before anything is allocated (the network's shapes from a build on the meta device)."""
    with torch.device("meta"):
        net = build_network(network, input_shape, num_classes, dropout=dropout)
    params = sum(p.numel() for p in net.parameters())
    need = (POOL * batch * math.prod(input_shape) * 4 + rules * params * 4 * 4
            + step_bytes(batch, net.input_shape, net.block_shapes))
    check_fits(need, f"a benchmark of {rules} rule(s) at batch {batch} on {network} would",
               "lower --batch-size or give fewer --rules", dev)


def _layered(rule: str) -> bool:
    """Whether ``rule`` trains block by block, so its steps are timed per layer too."""
    return RULES.get(rule).layered


def target_options(kind: str) -> dict[str, Any]:
    """sigprop's options for a ``--targets`` kind: dense, sparse, or sparse-gG (sparse
    targets on a G x G grid of kernel windows, ``--sparse-grid G``)."""
    m = re.fullmatch(r"sparse-g([1-9][0-9]*)", kind)
    if m:
        return {"targets": "sparse", "sparse_grid": int(m.group(1))}
    if kind in ("dense", "sparse"):
        return {"targets": kind}
    raise ConfigError(f"--targets takes dense, sparse and sparse-gG (G x G windows, e.g. "
                      f"sparse-g3), got {kind!r}")


def variants(rules: list[str], targets: list[str]) -> list[Variant]:
    """The columns: each rule; sigprop once per target kind (``sigprop``, ``sigprop-sparse``,
    ``sigprop-sparse-g3``)."""
    out = []
    for r in rules:
        if r == "sigprop":
            out += [Variant("sigprop" if t == "dense" else f"sigprop-{t}", r, target_options(t))
                    for t in targets]
        else:
            out.append(Variant(r, r))
    return out


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(rule: LearningRule, modules: list[nn.Module]) -> int:
    """Parameters and buffers of ``modules``, the gradients of the trainable ones, and
    their optimizer state (as it is after a step)."""
    params = {id(p): p for m in modules for p in m.parameters()}
    buffers = {id(b): b for m in modules for b in m.buffers()}
    total = _nbytes(params.values()) + _nbytes(buffers.values())
    total += _nbytes(p for p in params.values() if p.requires_grad)  # their gradients
    for opt in rule.optimizers:
        for p, st in opt.state.items():
            if id(p) in params:
                total += _nbytes(v for v in st.values() if isinstance(v, Tensor) and v.dim())
    return total


def layer_modules(rule: LearningRule) -> list[list[nn.Module]]:
    """The modules each block's update owns: the block, and with it its auxiliaries
    (local learning) or, for block 1, the target generator (sigprop)."""
    blocks = [[b] for b in rule.network.blocks]
    aux = getattr(rule, "aux", None)
    if aux is not None:
        for parts, a in zip(blocks, aux):
            parts.append(a)
    signal = getattr(rule, "signal", None)
    if signal is not None:
        blocks[0].append(signal)
    return blocks


class _Timeline:
    """Timestamps of a rule's marks (and CUDA peaks between them) over many steps."""

    def __init__(self, meter: SavedTensorMeter | None, device: torch.device) -> None:
        self.meter = meter
        self.device = device
        self.durations: dict[str, float] = defaultdict(float)
        self.cuda_peaks: dict[str, int] = defaultdict(int)
        self.part: str | None = None
        self.t0 = 0.0

    def _close(self) -> None:
        if self.part is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peaks[self.part] = max(self.cuda_peaks[self.part],
                                             torch.cuda.max_memory_allocated(self.device))
        self.durations[self.part] += time.perf_counter() - self.t0

    def mark(self, part: str) -> None:
        self._close()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.meter is not None:
            self.meter.enter(part)
        self.part, self.t0 = part, time.perf_counter()

    def end(self) -> None:
        self._close()
        self.part = None


@dataclass
class BenchResult:
    variant: Variant
    seconds_per_sample: list[float]  # one per timed segment
    peak_memory_bytes: int  # held activations plus parameters, gradients, optimizer state
    activation_memory_bytes: int  # held activations only, at their peak
    layers: list[dict[str, Any]]  # per block: time_per_sample_s, peak_memory_bytes, ...
    notes: list[str]
    layout: str = "nchw"  # the conv maps' memory layout it ran on


def describe_layouts(named: dict[str, tuple[str, str]]) -> str:
    """The layouts of named columns ({name: (layout, why)}) in a few words: one layout
    (with its reason when all share it), else each column's."""
    kinds = {lo for lo, _ in named.values()}
    whys = {why for _, why in named.values() if why}
    if len(kinds) == 1:
        return kinds.pop() + (f" ({whys.pop()})" if len(whys) == 1 else "")
    return "; ".join(f"{n} {lo}" for n, (lo, _) in named.items())


def run_bench(network: str, input_shape: tuple[int, ...], num_classes: int,
              rule_names: list[str], *, targets: list[str] | None = None,
              batch_size: int = 128, steps: int = 2, repeats: int = 5, warmup: int = 1,
              device: str = "cpu", dropout: float | None = None, head: str = "classifier",
              pipeline: str = "auto", seed: int = 0, layout: str = "auto",
              log=print) -> list[BenchResult]:
    """Measure every rule (module docstring); ``log`` receives progress lines.
    ``layout`` "channels-last" lays every rule's conv weights and input batches out NHWC
    in memory (the maps follow); "auto" as ``sigprop train --layout auto`` chooses
    (:mod:`.layout`)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but this machine has no usable CUDA GPU")
    for name, value, low in (("--steps", steps, 1), ("--repeats", repeats, 1),
                             ("--warmup", warmup, 0), ("--batch-size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_COUNT:
            why = " (BatchNorm needs 2 samples)" if name == "--batch-size" else ""
            raise ConfigError(f"{name} must be an integer from {low} to {MAX_COUNT}{why}, got "
                              f"{value!r}")
    check_num_classes(num_classes)
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout takes {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "channels-last" and len(input_shape) != 3:
        raise ConfigError("--layout channels-last lays out image maps: it needs --input "
                          f"CxHxW, got {'x'.join(map(str, input_shape))}")
    if dropout is None:  # Sec. IV's 0.1; the spiking and Hopfield nets have no dropout
        dropout = 0.0 if network.startswith(("snn-", "hopfield-")) else 0.1
    cols = variants(rule_names, targets or ["dense"])
    # each rule on the layout `sigprop train --layout` gives it (auto: per rule)
    plain = build_network(network, input_shape, num_classes)
    layouts = {v.name: resolve_layout(layout, plain, network, v.rule, dev) for v in cols}
    _check_fits(network, input_shape, num_classes, dropout, batch_size, len(cols), dev)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(batch_size, *input_shape, generator=g).to(dev),
                torch.randint(0, num_classes, (batch_size,), generator=g).to(dev))
               for _ in range(POOL)]
    pools = {name: [(x.contiguous(memory_format=FORMATS[name]) if x.dim() == 4 else x, y)
                    for x, y in batches] for name in {lo for lo, _ in layouts.values()}}
    rules: dict[str, LearningRule] = {}
    for v in cols:
        torch.manual_seed(seed)  # the same initial weights for every rule
        net = build_network(network, input_shape, num_classes, dropout=dropout)
        apply_layout(net, layouts[v.name][0])  # 4-D weights only
        opts = dict(v.options)
        takes = {o.name for o in RULES.get(v.rule).options}  # --head, --pipeline: sigprop's
        opts.update({k: x for k, x in (("head", head), ("pipeline", pipeline)) if k in takes})
        rules[v.name] = build_rule(v.rule, net, num_classes, **opts).to(dev)
        rules[v.name].set_training(True)
    log(f"bench: {network}, input {'x'.join(map(str, input_shape))}, batch {batch_size}, "
        f"{repeats} x {steps} steps per rule, on {dev}; layout {describe_layouts(layouts)}")
    k = [0]

    def steps_of(name: str, count: int) -> None:
        rule, pool = rules[name], pools[layouts[name][0]]
        for _ in range(count):
            x, y = pool[k[0] % len(pool)]
            k[0] += 1
            rule.train_step(x, y)
        rule.sync()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for v in cols:  # warm up: optimizer state, allocator, kernels
        steps_of(v.name, warmup)
    timelines = {v.name: _Timeline(None, dev) for v in cols}
    seg: dict[str, list[float]] = {v.name: [] for v in cols}
    for r in range(repeats):
        order = cols if r % 2 == 0 else cols[::-1]
        for v in order:
            rule = rules[v.name]
            layered = _layered(v.rule) and not getattr(rule, "pipelines", False)
            tl = timelines[v.name]
            rule.marker = tl.mark if layered else None
            gc.collect()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_of(v.name, 1)
                tl.end()
            sync()
            seg[v.name].append((time.perf_counter() - t0) / (steps * batch_size))
            rule.marker = None
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(
            f"{v.name} {1e3 * seg[v.name][-1]:.2f} ms/sample" for v in cols))
    results = []
    for v in cols:
        rule = rules[v.name]
        mem, act, layer_mem = _memory(rule, v, pools[layouts[v.name][0]][0], dev, sync)
        layers: list[dict[str, Any]] = []
        notes: list[str] = []
        layered = _layered(v.rule) and not getattr(rule, "pipelines", False)
        if _layered(v.rule) and not layered:
            notes.append("pipelined: blocks overlap on two threads, no per-layer times "
                         "(--pipeline off gives them)")
        if layered:
            layers = _layer_rows(rule, timelines[v.name], layer_mem, repeats * steps
                                 * batch_size)
        results.append(BenchResult(v, seg[v.name], mem, act, layers, notes,
                                   layouts[v.name][0]))
    return results


def _layer_rows(rule: LearningRule, tl: _Timeline, layer_mem: list[int], samples: int
                ) -> list[dict[str, Any]]:
    owned = layer_modules(rule)
    counts = [sum(p.numel() for m in ms for p in m.parameters() if p.requires_grad)
              for ms in owned]
    total = sum(counts) or 1
    step = tl.durations.get("step", 0.0)
    rows = []
    for i, (count, mem) in enumerate(zip(counts, layer_mem)):
        seconds = tl.durations.get(f"block{i + 1}", 0.0) + step * count / total
        rows.append({"layer": i + 1, "time_per_sample_s": seconds / samples,
                     "peak_memory_bytes": mem})
    return rows


def _memory(rule: LearningRule, v: Variant, batch: tuple[Tensor, Tensor],
            dev: torch.device, sync) -> tuple[int, int, list[int]]:
    """Peak memory of one step, the activations' part of it, and each block's peak
    (module docstring)."""
    owned = layer_modules(rule)
    x, y = batch
    if dev.type == "cuda":
        tl = _Timeline(None, dev)
        rule.marker = tl.mark if _layered(v.rule) else None
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        rule.train_step(x, y)
        rule.sync()
        tl.end()
        sync()
        peak = torch.cuda.max_memory_allocated(dev)
        rule.marker = None
        return peak, max(peak - before, 0), [tl.cuda_peaks.get(f"block{i + 1}", 0)
                                             for i in range(len(owned))]
    params = [p for p in rule.modules.parameters()] + list(rule.modules.buffers())
    meter = SavedTensorMeter(params)
    tl = _Timeline(meter, dev)
    rule.marker = tl.mark if _layered(v.rule) else None
    lagging = getattr(rule, "lagging_updates", contextlib.nullcontext)
    gc.collect()
    with meter.counting(), lagging():
        rule.train_step(x, y)
        rule.sync()
    tl.end()
    rule.marker = None
    gc.collect()
    everything = state_bytes(rule, [rule.modules])
    per_layer = [meter.region_peak.get(f"block{i + 1}", 0) + state_bytes(rule, ms)
                 for i, ms in enumerate(owned)]
    return meter.peak + everything, meter.peak, per_layer


# --------------------------------------------------------------------------- output


def _ms(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{1e3 * med:.2f} ({1e3 * min(values):.2f}-{1e3 * max(values):.2f})"


def markdown(results: list[BenchResult]) -> str:
    """Tables in the shape of the paper's Tables I and II (III and IV with targets)."""
    names = [r.variant.name for r in results]
    lines = [("Training time per sample (ms; median and range over the interleaved segments), "
              "peak memory per batch (MiB: held activations plus parameters, gradients and "
              "optimizer state) and activation memory (MiB: the held activations alone, at "
              "their peak), whole network:"), "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| Time (ms) | " + " | ".join(_ms(r.seconds_per_sample) for r in results) + " |",
             "| Mem (MiB) | " + " | ".join(f"{r.peak_memory_bytes / MIB:.1f}"
                                           for r in results) + " |",
             "| Activations (MiB) | " + " | ".join(f"{r.activation_memory_bytes / MIB:.1f}"
                                                   for r in results) + " |"]
    base = next((r for r in results if r.variant.rule == "backprop"), None)
    if base is not None:
        bt, bm = statistics.median(base.seconds_per_sample), base.peak_memory_bytes
        ba = base.activation_memory_bytes or 1
        lines.append("| / backprop | " + " | ".join(
            f"time {statistics.median(r.seconds_per_sample) / bt:.2f}, mem "
            f"{r.peak_memory_bytes / bm:.3f}, act {r.activation_memory_bytes / ba:.3f}"
            for r in results) + " |")
    layered = [r for r in results if r.layers]
    if layered:
        depth = max(len(r.layers) for r in layered)
        lines += ["", ("Per layer (time per sample in ms, with its share of the Adam step; "
                       "peak memory in MiB: held activations plus the layer's parameters, "
                       "gradients and optimizer state):"), "",
                  "| layer | " + " | ".join(f"{r.variant.name} time" for r in layered)
                  + " | " + " | ".join(f"{r.variant.name} mem" for r in layered) + " |",
                  "|---|" + "---|" * (2 * len(layered))]
        for i in range(depth):
            cells = [f"{1e3 * r.layers[i]['time_per_sample_s']:.2f}" if i < len(r.layers)
                     else "" for r in layered]
            cells += [f"{r.layers[i]['peak_memory_bytes'] / MIB:.1f}" if i < len(r.layers)
                      else "" for r in layered]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    for r in results:
        for note in r.notes:
            lines.append(f"\n{r.variant.name}: {note}")
    return "\n".join(lines)


def as_json(results: list[BenchResult], facts: dict[str, Any]) -> dict[str, Any]:
    return {
        **facts,
        "rules": {r.variant.name: {
            "rule": r.variant.rule, "options": r.variant.options,
            "time_per_sample_s": statistics.median(r.seconds_per_sample),
            "time_per_sample_range_s": [min(r.seconds_per_sample), max(r.seconds_per_sample)],
            "segments_time_per_sample_s": r.seconds_per_sample,
            "peak_memory_bytes": int(r.peak_memory_bytes),
            "activation_memory_bytes": int(r.activation_memory_bytes),
            "layers": r.layers, "notes": r.notes, "layout": r.layout,
        } for r in results},
    }


__all__ = ["BenchResult", "as_json", "describe_layouts", "markdown", "run_bench", "variants"]
