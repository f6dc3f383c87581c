#!/usr/bin/env python
"""VGG8b's convolutions and L_pred's products on this CPU's kernels: what sigprop's
target rows cost, and the other forms of the same arithmetic, side by side.

    python benchmarks/conv_kernels.py                       # 2 threads, channels-last
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/conv_kernels.py
    python benchmarks/conv_kernels.py --layout nchw --json out.json

Four tables, each over VGG8b's layers (CIFAR-shaped input), interleaved repeats in one
process, medians:

* ``rows``: each convolution's forward and weight gradient (``convolution_backward``,
  weight only, as the local rules run it) on ``--batch`` rows and on ``--batch`` +
  ``--targets`` rows (sigprop's dense step), and the time per row of the second against
  the first (1.000: the target rows cost what their count says);
* ``lpred``: L_pred's three products on a block's output ``h`` (``--batch`` rows) and
  targets ``t`` (``--targets`` rows), flattened in memory order as the fast path
  compares them: logits ``h tᵀ``, ``dL/dh = g t`` and ``dL/dt = gᵀ h`` as matrix
  products (what the fast path runs) and as a convolution whose kernel covers the whole
  map (forward, input gradient, weight gradient);
* ``wgrad``: a 3x3 convolution's weight gradient as oneDNN computes it against nine
  matrix products of shifted views of the padded maps (one per tap);
* ``bn``: BatchNorm's backward with statistics from the first ``--batch`` rows, on each
  convolution's output (``--batch`` + ``--targets`` rows) as the fast path runs it
  (:func:`sigprop.networks.batchnorm.input_stats_backward`: ATen's eval-mode sums, then
  one pass writing dx) against the earlier form (ATen's eval-mode dx, then a correction
  of the statistics' rows: four passes over the map), which exists only here.

Every form is checked against the first one (largest relative difference printed). The
allocator is tuned as `sigprop train` tunes it (without it, a fresh 70 MB output costs
~19 ms of page faults here, as much as the first convolution).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sigprop import build_network
from sigprop.engine.layout import FORMATS
from sigprop.engine.perf import tune_allocator
from sigprop.networks.base import channels_last
from sigprop.networks.batchnorm import input_stats_backward
from sigprop.resources import cpu_capability
from sigprop.rules.sigprop import fastpath as fp


def vgg8b_layers() -> tuple[list[tuple[int, int, int]], list[tuple[int, ...]]]:
    """(in channels, out channels, side) of each convolution, and each conv block's
    output shape (what L_pred compares)."""
    net = build_network("vgg8b", (3, 32, 32), 10)
    convs, outs, prev = [], [], (3, 32, 32)
    for block, shape in zip(net.blocks, net.block_shapes):
        for m in block.modules():
            if isinstance(m, torch.nn.Conv2d):
                convs.append((m.in_channels, m.out_channels, prev[1]))
        if len(shape) == 3:
            outs.append(shape)
        prev = shape
    return convs, outs


def timed(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each callable, the calls interleaved (order alternating)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def wgrad(g, x, w):
    return torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]


def rows_table(convs, args, fmt) -> list[dict]:
    return [rows_one(cin, cout, side, args, fmt) for cin, cout, side in convs]


def rows_one(cin: int, cout: int, side: int, args, fmt) -> dict:
    n0, n1 = args.batch, args.batch + args.targets
    w = torch.randn(cout, cin, 3, 3).contiguous(memory_format=fmt)
    data = {n: (torch.randn(n, cin, side, side).contiguous(memory_format=fmt),
                torch.randn(n, cout, side, side).contiguous(memory_format=fmt))
            for n in (n0, n1)}
    fns = {}
    for n, (x, g) in data.items():
        fns[f"forward_{n}"] = lambda x=x: F.conv2d(x, w, padding=1)
        fns[f"wgrad_{n}"] = lambda x=x, g=g: wgrad(g, x, w)
    ms = timed(fns, args.repeats)
    gflop = 2 * cin * cout * 9 * side * side / 1e9  # per row
    row = {"conv": f"{cin}->{cout} @{side}x{side}", **{k: round(v, 3) for k, v in ms.items()}}
    for part in ("forward", "wgrad"):
        row[f"{part}_per_row_ratio"] = round(ms[f"{part}_{n1}"] / n1 / (ms[f"{part}_{n0}"] / n0), 3)
        row[f"{part}_gflop_per_s_{n1}"] = round(gflop * n1 / ms[f"{part}_{n1}"] * 1e3, 1)
    print(f"  {row['conv']:18} forward {ms[f'forward_{n0}']:7.2f} / {ms[f'forward_{n1}']:7.2f} ms "
          f"(per row {row['forward_per_row_ratio']:.3f}, {row[f'forward_gflop_per_s_{n1}']:.0f} GFLOP/s)"
          f"   weight gradient {ms[f'wgrad_{n0}']:7.2f} / {ms[f'wgrad_{n1}']:7.2f} ms (per row "
          f"{row['wgrad_per_row_ratio']:.3f}, {row[f'wgrad_gflop_per_s_{n1}']:.0f} GFLOP/s)", flush=True)
    return row


def flat(m: torch.Tensor) -> torch.Tensor:
    """Rows flattened in memory order, as the fast path compares them (its own helper)."""
    return fp._flat_rows(m, channels_last(m))


def lpred_table(outs, args, fmt) -> list[dict]:
    return [lpred_one(c, hh, ww, args, fmt) for c, hh, ww in outs]


def lpred_one(c: int, hh: int, ww: int, args, fmt) -> dict:
    n, m = args.batch, args.targets
    h = torch.randn(n, c, hh, ww).contiguous(memory_format=fmt)
    t = torch.randn(m, c, hh, ww).contiguous(memory_format=fmt)
    g = torch.randn(n, m)
    g4 = g.view(n, m, 1, 1).contiguous(memory_format=fmt)
    hf, tf = flat(h), flat(t)
    dh = torch.empty_like(hf)
    dt = torch.empty_like(tf)

    def conv_bwd(mask):
        return torch.ops.aten.convolution_backward(
            g4, h, t, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)

    checks = {"logits": rel(F.conv2d(h, t).view(n, m), hf @ tf.T),
              "dh": rel(flat(conv_bwd([True, False, False])[0]), g @ tf),
              "dt": rel(flat(conv_bwd([False, True, False])[1]), g.T @ hf)}
    ms = timed({"logits_mm": lambda: torch.mm(hf, tf.T),
                "logits_conv": lambda: F.conv2d(h, t),
                "dh_mm": lambda: torch.mm(g, tf, out=dh),
                "dh_conv": lambda: conv_bwd([True, False, False]),
                "dt_mm": lambda: torch.mm(g.T, hf, out=dt),
                "dt_conv": lambda: conv_bwd([False, True, False])}, args.repeats)
    mb = hf.numel() * 4 / 1e6  # h read (or dh written) once
    row = {"output": f"{c}x{hh}x{ww}", **{k: round(v, 3) for k, v in ms.items()},
           "max_rel_diff": {k: float(f"{v:.2e}") for k, v in checks.items()}}
    print(f"  {row['output']:10} " + "   ".join(
        f"{p} mm {ms[p + '_mm']:6.2f} ({mb / ms[p + '_mm']:4.1f} GB/s) conv {ms[p + '_conv']:6.2f}"
        for p in ("logits", "dh", "dt"))
        + f"   max rel. diff {max(checks.values()):.1e}", flush=True)
    return row


def wgrad_table(convs, args) -> list[dict]:
    # not the first layer: 3 input channels, its own kernel
    return [wgrad_one(cin, cout, side, args) for cin, cout, side in convs if cin >= 16]


def wgrad_one(cin: int, cout: int, side: int, args) -> dict:
    n = args.batch + args.targets
    x = torch.randn(n, cin, side, side).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, cout, side, side).contiguous(memory_format=torch.channels_last)
    taps = torch.empty(3, 3, cout, cin)

    def shifted():
        # over the padded grid, flat: tap (kh, kw) pairs output position p with input
        # position p + kh (side + 2) + kw; the gradient's padding rows are zero
        xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, cin)
        gp = F.pad(g, (0, 2, 0, 2)).permute(0, 2, 3, 1).reshape(-1, cout)
        length = xp.shape[0] - (2 * (side + 2) + 2)
        gt = gp[:length].T
        for kh in range(3):
            for kw in range(3):
                s = kh * (side + 2) + kw
                torch.mm(gt, xp[s:s + length], out=taps[kh, kw])
        return taps

    diff = rel(shifted().permute(2, 3, 0, 1), wgrad(g, x, w))
    ms = timed({"onednn": lambda: wgrad(g, x, w), "nine_products": shifted}, args.repeats)
    gflop = 2 * n * cin * cout * 9 * side * side / 1e9
    row = {"conv": f"{cin}->{cout} @{side}x{side}", "rows": n,
           **{k: round(v, 3) for k, v in ms.items()},
           "onednn_gflop_per_s": round(gflop / ms["onednn"] * 1e3, 1),
           "nine_products_gflop_per_s": round(gflop / ms["nine_products"] * 1e3, 1),
           "max_rel_diff": float(f"{diff:.2e}")}
    print(f"  {row['conv']:18} oneDNN {ms['onednn']:7.2f} ms ({row['onednn_gflop_per_s']:.0f} GFLOP/s)"
          f"   nine products {ms['nine_products']:7.2f} ms ({row['nine_products_gflop_per_s']:.0f} "
          f"GFLOP/s)   max rel. diff {diff:.1e}", flush=True)
    return row


def bn_backward_four_passes(g, x, w, mean, var, n: int, eps: float):
    """The fast path's BatchNorm backward before 2026-12-06: ATen's eval-mode dx, then
    the statistics' term subtracted from rows [:n] (a temporary and an in-place pass)."""
    invstd = torch.rsqrt(var + eps)
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        g, x, w, mean, var, mean, invstd, False, eps, [True, True, True])
    count = n * x[0, 0].numel()
    k = w * dw * invstd.square() / count
    c = w * db * invstd / count - mean * k
    shape = (1, -1, 1, 1)
    dx[:n] -= torch.addcmul(c.view(shape), x[:n], k.view(shape))
    return dx, dw, db


def bn_table(convs, args, fmt) -> list[dict]:
    return [bn_one(cout, side, args, fmt) for _, cout, side in convs]


def bn_one(c: int, side: int, args, fmt) -> dict:
    n = args.batch
    rows = n + args.targets
    x = (torch.randn(rows, c, side, side) * 3 + 1).contiguous(memory_format=fmt)
    g = torch.randn(rows, c, side, side).contiguous(memory_format=fmt)
    w = torch.rand(c) + 0.5
    var, mean = torch.var_mean(x[:n], dim=[0, 2, 3], correction=0)
    eps = 1e-5
    diff = rel(input_stats_backward(g, x, w, mean, var, n, eps)[0],
               bn_backward_four_passes(g, x, w, mean, var, n, eps)[0])
    ms = timed({"four_passes": lambda: bn_backward_four_passes(g, x, w, mean, var, n, eps),
                "two_passes": lambda: input_stats_backward(g, x, w, mean, var, n, eps)},
               args.repeats)
    mb = x.numel() * 4 / 1e6
    row = {"map": f"{rows}x{c}x{side}x{side}", **{k: round(v, 3) for k, v in ms.items()},
           "ratio": round(ms["two_passes"] / ms["four_passes"], 3),
           "max_rel_diff": float(f"{diff:.2e}")}
    print(f"  {row['map']:16} ({mb:5.0f} MB)   four passes {ms['four_passes']:7.2f} ms   "
          f"two passes {ms['two_passes']:7.2f} ms   ratio {row['ratio']:.3f}   "
          f"max rel. diff {diff:.1e}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--targets", type=int, default=10, help="target rows (dense: one per class)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layout", default="channels-last", choices=tuple(FORMATS))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tables", default="rows,lpred,wgrad,bn", help="which tables, comma-separated")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    tables = [t for t in args.tables.split(",") if t]
    if any(t not in ("rows", "lpred", "wgrad", "bn") for t in tables) or not tables:
        p.error("--tables takes rows, lpred, wgrad and bn, comma-separated")
    if min(args.batch, args.targets, args.threads, args.repeats) < 1:
        p.error("--batch, --targets, --threads and --repeats must be at least 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist")
    torch.set_num_threads(args.threads)
    tune_allocator()  # as training does: fresh outputs reuse memory instead of page-faulting
    torch.manual_seed(0)
    fmt = FORMATS[args.layout]
    convs, outs = vgg8b_layers()
    print(f"CPU kernels: {cpu_capability()}; {torch.get_num_threads()} threads; {args.layout}; "
          f"batch {args.batch} + {args.targets} target rows; torch {torch.__version__}", flush=True)
    result = {"cpu_capability": cpu_capability(), "threads": torch.get_num_threads(),
              "layout": args.layout, "batch": args.batch, "targets": args.targets,
              "repeats": args.repeats, "torch": torch.__version__,
              "date": _dt.date.today().isoformat()}
    if "rows" in tables:
        print(f"rows: ms on {args.batch} / {args.batch + args.targets} rows")
        result["rows"] = rows_table(convs, args, fmt)
    if "lpred" in tables:
        print("lpred: ms per product, as matrix products and as a convolution")
        result["lpred"] = lpred_table(outs, args, fmt)
    if "wgrad" in tables:
        print("wgrad: ms, channels-last maps")
        result["wgrad"] = wgrad_table(convs, args)
    if "bn" in tables:
        print("bn: BatchNorm backward with input statistics, ms")
        result["bn"] = bn_table(convs, args, fmt)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
