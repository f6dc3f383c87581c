"""Sigprop's options (Sec. III; docs/ARCHITECTURE.md for the choices the paper leaves
open), read as ``rule.opts.<name>``: the declarations, the checks between them and what
they give on a network (the sparse target's shape, the logit scales)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ... import functional as SF
from ...errors import ConfigError
from ...options import Option, Options
from ...registry import SIGNALS, SPARSE_SIGNALS
from ...signals import default_sparse_size
from .sparse import window_grid

SIGNAL = Option("signal", str, "label",
                "target generator: label (Eq. 1) | label-input (Eq. 10) | loop-pred (Eq. 11) "
                "| loop-error (Eq. 12)", choices=SIGNALS.names)
HEAD = Option("head", str, "target", "prediction: target (Fig. 2a, output-target "
              "comparison) | classifier (Fig. 2b)", choices=("target", "classifier"))
LOSS = Option("loss", str, "dot", "the comparison inside L_pred: dot (Eq. 6) | l2 (Eq. 7)",
              choices=("dot", "l2"))
LOGIT_SCALE = Option(
    "logit_scale", float, None, "the logit scale of L_pred (default c/sqrt(d): dot c=4, l2 "
    "c=2; per-sample signals c=1, 0.5)", low=0.0, low_open=True, optional=True)
BN_STATS = Option("bn_stats", str, "inputs", "BatchNorm statistics from: inputs | all",
                  choices=("inputs", "all"))
TARGET_DROPOUT = Option(
    "target_dropout", str, "off", "sigprop with dropout: off (only the inputs are dropped; "
    "targets pass undropped) | on (target rows dropped too, each with its own mask, as the "
    "official code)", choices=("on", "off"))
TARGETS = Option("targets", str, "dense", "dense (block 1's output target, Eq. 1) | sparse "
                 "(Sec. III-E: a small target for block 1's input; label signal)",
                 choices=("dense", "sparse"))
SPARSE_SIZE = Option(
    "sparse_size", int, None, "values of a sparse target for an fc first block, zero-filled "
    "to its input (default: half the input)", low=1, optional=True, metavar="K")
SPARSE_GRID = Option(
    "sparse_grid", int, 1, "a conv first block's sparse target: a G x G grid of kernel "
    "windows, fields of G x G cells after it (1: the paper's one window)", low=1, high=1024,
    metavar="G")
EXIT_TARGETS = Option(
    "exit_targets", str, "prototypes", "early exits of per-sample signals: prototypes "
    "(running class means of training targets) | candidates (every class's target per "
    "sample)", choices=("prototypes", "candidates"))
FAST_PATH = Option(
    "fast_path", str, "auto", "sigprop's step of standard blocks without autograd (every "
    "built-in signal): auto | on (error if it cannot) | off", choices=("auto", "on", "off"),
    resumable=True)
PIPELINE = Option(
    "pipeline", str, "auto", "sigprop with the fast path on a CPU: each block's BatchNorm "
    "backward, weight gradient and Adam step on a second thread while the forward goes on "
    "(same updates): auto (>= 2 threads) | on | off", choices=("auto", "on", "off"),
    resumable=True)
OPTIONS = (SIGNAL, HEAD, LOSS, LOGIT_SCALE, BN_STATS, TARGET_DROPOUT, TARGETS, SPARSE_SIZE,
           SPARSE_GRID, EXIT_TARGETS, FAST_PATH, PIPELINE)


def check_options(opts: Options) -> None:
    """The checks between sigprop's options (one ConfigError naming them)."""
    if opts.pipeline == "on" and opts.fast_path == "off":
        raise ConfigError("pipeline='on' needs the fast path; drop fast_path='off'")
    if opts.sparse_size is not None and opts.targets != "sparse":
        raise ConfigError("sparse_size sets the size of sparse targets; add "
                          "targets='sparse' (--targets sparse) or drop it")
    if opts.sparse_grid != 1 and opts.targets != "sparse":
        raise ConfigError("sparse_grid shapes sparse targets; add targets='sparse' "
                          "(--targets sparse) or drop it")
    if opts.targets == "sparse":
        if opts.signal not in SPARSE_SIGNALS:
            raise ConfigError(
                f"sparse targets (Sec. III-E) exist for the signals "
                f"{', '.join(SPARSE_SIGNALS.names())}, not {opts.signal!r}; use "
                "targets='dense' with this signal")
        if opts.bn_stats != "inputs":
            raise ConfigError("sparse targets take BatchNorm statistics from the inputs "
                              "only (a target is one position, not a map); drop "
                              "bn_stats='all'")


def signal_options(opts: Options) -> dict:
    """The chosen generator's own options (beyond ``signal_learned``), by name."""
    own = SIGNALS.get(opts.signal).options
    return {o.name: opts[o.name] for o in own if o.name != "signal_learned"}


def first_weight_layer(block: nn.Module) -> nn.Module | None:
    """The first Linear or Conv2d of a block (None if it has neither)."""
    return next((m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)


def sparse_target(first: nn.Module | None, input_shape: tuple[int, ...],
                  size: int | None, grid: int = 1) -> tuple[tuple[int, ...], int | None]:
    """Shape and size of a sparse target for the first block (Sec. III-E): one kernel
    window of its input for a conv (a grid x grid of them with ``grid`` > 1), K values
    of its input row for a Linear."""
    if isinstance(first, nn.Conv2d):
        if size is not None:
            raise ConfigError("sparse_size (--sparse-size) is for fully connected first blocks; "
                              "a conv block's sparse target is one kernel window of its input")
        kh, kw = first.kernel_size
        return (first.in_channels, grid * kh, grid * kw), None
    if grid != 1:
        raise ConfigError(f"sparse_grid {grid} is for conv first blocks (a grid of kernel "
                          "windows); an fc first block's sparse target has --sparse-size K "
                          "values: drop --sparse-grid")
    if isinstance(first, nn.Linear):
        dim = math.prod(input_shape)
        k = default_sparse_size(dim) if size is None else size
        if k > dim:
            raise ConfigError(f"sparse_size {k} exceeds the first block's {dim} inputs; "
                              f"choose K <= {dim}")
        return tuple(input_shape), k
    raise ConfigError("sparse targets need a first block that starts with a Linear or a "
                      "Conv2d (the target is taken with its weights); use dense targets")


def logit_scales(opts: Options, shapes: Sequence[tuple[int, ...]], per_sample: bool,
                 window: tuple[tuple[int, ...], nn.Conv2d] | None = None) -> list[float]:
    """Each block's logit scale: ``logit_scale``, else the default for its output shape;
    for fields (``window``: the window targets' shape and block 1's conv) the default
    of a field comparison at conv blocks."""
    scales = [
        opts.logit_scale or SF.default_scale(opts.loss, math.prod(s), per_sample,
                                            conv=len(s) == 3)
        for s in shapes
    ]
    if window is None:
        return scales
    g = window_grid(*window)
    if g[0] > shapes[0][1] or g[1] > shapes[0][2]:
        raise ConfigError(
            f"sparse_grid {g[0]} exceeds the first block's {shapes[0][1]}x"
            f"{shapes[0][2]} output map; choose --sparse-grid <= {min(shapes[0][1:])}")
    return [
        opts.logit_scale or (
            SF.field_scale(opts.loss, s[0], s[1] * s[2], min(g[0], s[1]) * min(g[1], s[2]))
            if len(s) == 3 else sc)
        for s, sc in zip(shapes, scales)
    ]
