#!/usr/bin/env python
"""The fast path's 2 x 2 pooling against ATen's, side by side, over VGG8b's four poolings.

    python benchmarks/pooling.py                 # batch 128 + 10 target rows, one thread
    python benchmarks/pooling.py --rows 42 --repeats 4
    python benchmarks/pooling.py --layout channels-last --threads 2

Forward: ``fastpath._pool_2x2`` (elementwise maxima, window codes from the comparisons)
against ``max_pool2d_with_indices`` plus the codes made from its indices (the general
``fastpath._pool``). Backward: ATen's ``max_pool2d_with_indices_backward`` with the
indices rebuilt from the codes (what the fast path runs on NCHW maps). With ``--layout
channels-last`` the maps are laid out so: there the fast path pools with ATen's kernel
and the codes from its indices (the general path, "aten_forward" here; "fast_forward" is
the elementwise pooling on such maps, for the comparison) and writes the gradient back
with ``fastpath._unpool_2x2``, timed against ATen's backward with the rebuilt indices. Interleaved repeats in
one process, order alternating; medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from sigprop import build_network
from sigprop.engine.layout import FORMATS
from sigprop.resources import cpu_capability
from sigprop.rules.sigprop import fastpath as fp


def pooled_inputs(rows: int) -> list[tuple[int, ...]]:
    """The shapes VGG8b's poolings see (CIFAR-shaped input)."""
    net = build_network("vgg8b", (3, 32, 32), 10)
    shapes, prev = [], (3, 32, 32)
    for shape in net.block_shapes:
        if len(shape) == 3 and shape[-1] != prev[-1]:
            shapes.append((rows, shape[0], prev[1], prev[2]))
        prev = shape
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=138, help="rows (batch + target rows)")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layout", default="nchw", choices=tuple(FORMATS))
    args = p.parse_args(argv)
    if args.rows < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--rows, --repeats and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    pool = nn.MaxPool2d(2, 2)
    geometry = fp._pool_geometry(pool)
    g = torch.Generator().manual_seed(0)
    xs = []
    for shape in pooled_inputs(args.rows):
        x = torch.randn(shape, generator=g)
        x[torch.rand(shape, generator=g) < 0.1] = 0.0  # ties, as dropout makes
        xs.append(x.contiguous(memory_format=FORMATS[args.layout]))

    def aten_forward(x):
        p, idx = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
        width = x.shape[3]
        offset = idx.sub_(fp._window_corner(pool, p, width))
        return p, offset.sub_(fp._rows_down(offset, width, 2).mul_(width - 2)).to(torch.uint8)

    codes = [fp._pool_2x2(x, None) for x in xs]
    for x, (p, c) in zip(xs, codes):  # the same numbers
        q, d = aten_forward(x)
        assert torch.equal(p, q) and torch.equal(c, d)
    dqs = [torch.randn(p.shape, generator=g).contiguous(memory_format=FORMATS[args.layout])
           for p, _ in codes]
    last = args.layout == "channels-last"
    for x, (p, c), dq in zip(xs, codes, dqs):  # the same gradients
        want = torch.ops.aten.max_pool2d_with_indices_backward(
            dq, x, *geometry, fp._window_index(pool, c.contiguous(), x.shape[3]))
        assert not last or torch.equal(fp._unpool_2x2(dq, c, x), want)
    runs = {"aten_forward": [], "fast_forward": [], "backward": []}
    if last:
        runs["fast_backward"] = []
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 else list(runs)[::-1]):
            t = time.perf_counter()
            for x, (p, c), dq in zip(xs, codes, dqs):
                if name == "aten_forward":
                    aten_forward(x)
                elif name == "fast_forward":
                    fp._pool_2x2(x, None)
                elif name == "fast_backward":
                    fp._unpool_2x2(dq, c, x)
                else:
                    torch.ops.aten.max_pool2d_with_indices_backward(
                        dq, x, *geometry, fp._window_index(pool, c.contiguous(), x.shape[3]))
            runs[name].append(time.perf_counter() - t)
    print(f"CPU kernels: {cpu_capability()}; {args.threads} thread(s); {args.layout}; "
          "VGG8b's poolings: "
          + ", ".join("x".join(map(str, x.shape)) for x in xs))
    for name, v in runs.items():
        print(f"  {name:<13} {1e3 * statistics.median(v):8.1f} ms (range {1e3 * min(v):.1f}-"
              f"{1e3 * max(v):.1f})")
    ratio = [a / b for a, b in zip(runs["aten_forward"], runs["fast_forward"])]
    print(f"  forward, ATen / fast: {statistics.median(ratio):.2f}x")
    if last:
        ratio = [a / b for a, b in zip(runs["backward"], runs["fast_backward"])]
        print(f"  backward, ATen / fast: {statistics.median(ratio):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
