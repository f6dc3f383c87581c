"""Sigprop's options (Sec. III; docs/ARCHITECTURE.md for the choices the paper leaves
open), read as ``rule.opts.<name>``, and the checks between them."""

from __future__ import annotations

from ...errors import ConfigError
from ...options import Option, Options
from ...registry import SIGNALS, SPARSE_SIGNALS

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
