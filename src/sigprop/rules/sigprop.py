"""Signal propagation (Sec. III): every block learns from its own L_pred, at once.

One training step, for blocks B_1..B_L and target generator G:

    h1 = B_1(x);  t1 = G(h1, y)                 # Eq. 1 / 10 / 11 / 12
    [h_i, t_i] = B_i([h_{i-1}, t_{i-1}])        # Eq. 2-3: one call, same weights
    L_i = CE(y, O(h_i, t_i))  ->  grads of B_i  # Eq. 9; L_1 also moves G
    (classifier head: CE(y, head(h_L)) -> grads of the head)  # Fig. 2b
    one Adam step: every block from its own gradients

Inputs of each block are detached, so no gradient crosses a block boundary and
only one block's activations are alive at a time. Each block has its own Adam
parameter group; one grouped step after the sweep (the same arithmetic: no block
reads another's update within a step).
Prediction: the last block's output-target comparison (Fig. 2a), or the head
(Fig. 2b, which needs neither labels nor the generator at inference).

Per-sample generators (Eq. 10-12) make one target per sample, built from its label;
L_pred compares each output with the class means of the batch's targets. Their early
exits compare, by default, with *prototypes*: running means of those class means,
kept per layer while training (the comparison L_pred trained). The alternative,
``exit_targets="candidates"``, builds every sample's target under every class and
sends all of them through the blocks (m x the target work).

For standard fully connected blocks and the built-in generators the step runs
without autograd, as written-out local updates (:mod:`sigprop.fastpath`, ``fast_path``):
the same updates, less overhead. Anything else, a user's own blocks included, takes
the autograd path. On a CPU the fast path can be pipelined (``pipeline``,
:mod:`sigprop.pipeline`): each block's BatchNorm backward, weight gradient and Adam
step run on a second thread while the forward sweep goes on; ``sync()`` waits for them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fastpath
from .. import functional as SF
from .. import sparse as SP
from ..batchnorm import convert_batchnorm, frozen_running_stats, stats_from_first
from ..errors import ConfigError, InputError
from ..networks import Network, dropout_spares_rows_from
from ..options import Option, Options
from ..pipeline import UpdateWorker, adam_group_step, group_stepping_unsupported
from ..registry import SIGNALS, SPARSE_SIGNALS, register_rule
from ..signals import Feedback, TargetGenerator, build_signal, default_sparse_size
from .base import LearningRule, RuleConfig, make_grouped_adam
from .checks import check_y

PROTOTYPE_MOMENTUM = 0.1  # as BatchNorm's running statistics
# pipeline='auto' hands block updates to the update thread only for blocks with at
# least this many Linear (or conv) weights in all: the hand-offs cost ~0.8 ms a step, which
# fc-3x16 (13 k weights) and fc-3x100 (98 k) do not earn back at batch 128 on this
# 2-core CPU, fc-3x300 (415 k) about does, fc-2x800 and fc-3x1000 gain 10-12%
# (docs/RESULTS.md, section 3)
PIPELINE_MIN_WEIGHTS = 250_000

# --- options (Sec. III; docs/ARCHITECTURE.md for the choices the paper leaves open) ---
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


def _first_weight_layer(block: nn.Module) -> nn.Module | None:
    """The first Linear or Conv2d of a block (None if it has neither)."""
    return next((m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)


def _sparse_target(first: nn.Module | None, input_shape: tuple[int, ...],
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


class Prototypes(nn.Module):
    """Per layer, a running mean of the class means of the training targets.

    ``mean{i}`` (m, *D) and ``seen{i}`` (m,) are buffers, so they travel with the
    state_dict (checkpoints, resume). A class's first batch sets its prototype; later
    batches move it by ``momentum``. Classes never seen score -inf.
    """

    def __init__(self, shapes: list[tuple[int, ...]], num_classes: int,
                 momentum: float = PROTOTYPE_MOMENTUM) -> None:
        super().__init__()
        self.momentum = momentum
        for i, shape in enumerate(shapes):
            self.register_buffer(f"mean{i}", torch.zeros(num_classes, *shape))
            self.register_buffer(f"seen{i}", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, i: int, means: Tensor, present: Tensor) -> None:
        mean, seen = getattr(self, f"mean{i}"), getattr(self, f"seen{i}")
        rows = (-1,) + (1,) * (mean.dim() - 1)
        moved = torch.where(seen.view(rows), mean.lerp(means, self.momentum), means)
        mean.copy_(torch.where(present.view(rows), moved, mean))
        seen.logical_or_(present)

    def get(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"mean{i}"), getattr(self, f"seen{i}")


@register_rule("sigprop")
class Sigprop(LearningRule):
    options = OPTIONS
    layered = True

    @classmethod
    def option_scope(cls, given) -> tuple[Option, ...]:
        """Sigprop's options and those of the chosen target generator."""
        name = SIGNAL.check(given["signal"]) if "signal" in given else SIGNAL.default
        return cls.options + SIGNALS.get(name).options

    @classmethod
    def _scope_note(cls, given) -> str:
        return f" with signal {given.get('signal', SIGNAL.default)!r}"

    @classmethod
    def check_options(cls, opts: Options) -> None:
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

    def _signal_options(self) -> dict:
        """The chosen generator's own options (beyond ``signal_learned``), by name."""
        own = SIGNALS.get(self.opts.signal).options
        return {o.name: self.opts[o.name] for o in own if o.name != "signal_learned"}
    def __init__(
        self, network: Network, num_classes: int, cfg: RuleConfig,
        signal: TargetGenerator | None = None,
    ) -> None:
        super().__init__(network, num_classes, cfg)
        opts = self.opts
        convert_batchnorm(network.blocks)
        shapes = network.block_shapes
        first = _first_weight_layer(network.blocks[0])
        if signal is None:
            if opts.targets == "sparse":
                shape, size = _sparse_target(first, network.input_shape, opts.sparse_size,
                                             opts.sparse_grid)
                signal = build_signal(opts.signal, num_classes, shape, opts.signal_learned,
                                      targets="sparse", sparse_size=size,
                                      **self._signal_options())
            else:
                signal = build_signal(
                    opts.signal, num_classes, shapes[0], opts.signal_learned,
                    head=network.head, out_dim=math.prod(shapes[-1]),
                    **self._signal_options(),
                )
        # where block 1 takes the generator's targets: after it (Eq. 1), with the inputs
        # as rows of the same shape (sparse, fc), or as kernel windows (sparse, conv)
        self._window = signal.at_input and isinstance(first, nn.Conv2d)
        want = shapes[0] if not signal.at_input else (
            _sparse_target(first, network.input_shape, None, opts.sparse_grid)[0]
            if self._window
            else network.input_shape)
        if signal.target_shape != want:
            where = "first block's input" if signal.at_input else "first block's output"
            raise ConfigError(
                f"target generator makes targets of shape {signal.target_shape}, "
                f"but the {where} needs {want}"
            )
        if signal.needs_feedback and opts.head != "classifier":
            raise ConfigError(
                f"signal {opts.signal!r} loops the network's prediction back (Fig. 2c); "
                "it needs --head classifier"
            )
        self.signal = signal
        self.modules["signal"] = signal
        self.prototypes: Prototypes | None = None
        if signal.per_sample and opts.exit_targets == "prototypes":
            self.prototypes = Prototypes(shapes, num_classes)
            self.modules["prototypes"] = self.prototypes
        self.classifier = opts.head == "classifier"
        self.scales = [
            opts.logit_scale or SF.default_scale(opts.loss, math.prod(s), signal.per_sample,
                                                conv=len(s) == 3)
            for s in shapes
        ]
        if self._window:  # sparse through conv blocks: fields compared at conv blocks
            g = SP.window_grid(signal.target_shape, first)
            if g[0] > shapes[0][1] or g[1] > shapes[0][2]:
                raise ConfigError(
                    f"sparse_grid {g[0]} exceeds the first block's {shapes[0][1]}x"
                    f"{shapes[0][2]} output map; choose --sparse-grid <= {min(shapes[0][1:])}")
            self.scales = [
                opts.logit_scale or (
                    SF.field_scale(opts.loss, s[0], s[1] * s[2],
                                   min(g[0], s[1]) * min(g[1], s[2]))
                    if len(s) == 3 else sc)
                for s, sc in zip(shapes, self.scales)
            ]
        # One parameter group per block and one for a classifier head; block 1's also
        # holds the generator, which learns from L_1(h1, t1) (a fixed generator's
        # parameters do not require grad and get no place). One step() after every
        # block has its gradient: no block reads another's update within a step (each
        # block's input was computed before), the same arithmetic as stepping at once.
        blocks = network.blocks
        groups = {"block1": [*blocks[0].parameters(), *signal.parameters()]}
        groups.update({f"block{i + 1}": b.parameters() for i, b in enumerate(blocks) if i})
        if self.classifier:
            groups["head"] = network.head.parameters()
        self.optimizer = make_grouped_adam(groups, cfg)
        self.optimizers = [self.optimizer] if self.optimizer is not None else []
        self._trainable = [p for p in self.modules.parameters() if p.requires_grad]
        # data-parallel replicas (sigprop.parallel): called with this step's gradients
        # (in a fixed order) before the optimizer step, to all-reduce them in place
        self.grad_reduce: Callable[[list[Tensor]], None] | None = None
        self.exit_names = [f"layer{i + 1}" for i in range(len(blocks))]
        if self.classifier:
            self.exit_names.append("head")
        self.fast_parts, self.fast_path_off = self._plan_fast_path()
        self.pipeline_off = self._plan_pipeline()
        self._pipe: UpdateWorker | None = None
        if self.pipeline_off is None:
            self._pipe = UpdateWorker(len(blocks) + 1)  # one slot per block, one for the head
            # group index per slot (the dicts themselves are replaced by load_state_dict)
            index = {g["name"]: k for k, g in enumerate(self.optimizer.param_groups)}
            self._group_index = [index.get(f"block{i + 1}") for i in range(len(blocks))]
            self._group_index.append(index.get("head"))

    # --- training ---------------------------------------------------------------
    def _plan_fast_path(self) -> tuple[list[fastpath.BlockParts], str | None]:
        """The blocks' parts for the written-out step, and None; or [] and why not."""
        if self.opts.fast_path == "off":
            return [], "fast_path='off'"
        why = None
        parts = []
        if not self.signal.has_fast_path:
            why = f"signal {type(self.signal).__name__} has no written-out step"
        else:
            for i, block in enumerate(self.network.blocks):
                p = fastpath.match_block(block)
                if isinstance(p, str):
                    why = f"block {i + 1}: {p}"
                    break
                if i == 0 and not (p.conv or p.flatten) and len(self.network.input_shape) != 1:
                    why = "block 1: a Linear on multi-dimensional samples without Flatten"
                    break
                parts.append(p)
        if why is None:
            return parts, None
        if self.opts.fast_path == "on":
            raise ConfigError(f"fast_path='on' but the written-out step does not apply: {why}")
        return [], why

    def _plan_pipeline(self) -> str | None:
        """None if block updates may run on the update thread (on a CPU with >= 2
        threads, checked at each step), else why not."""
        why = None
        if self.opts.pipeline == "off":
            return "pipeline='off'"
        weights = sum(p.op.weight.numel() for p in self.fast_parts)
        if self.fast_path_off is not None:
            why = "the fast path does not apply"
        elif self.opts.pipeline == "auto" and self.signal.needs_feedback:
            why = ("the loop-back generator's label-free pass reads every block, so each "
                   "step would wait for all updates (measured slower); pipeline='on' forces it")
        elif self.opts.pipeline == "auto" and any(p.conv for p in self.fast_parts):
            # VGG8b, 3x32x32, batch 128, 2 threads: 0.94x backprop's throughput pipelined
            # against 1.48x in sequence (benchmarks/throughput_memory.py): a conv on one
            # of the two threads is slower than the overlap gains (docs/RESULTS.md)
            why = ("conv blocks: their products use both threads better in sequence "
                   "(measured); pipeline='on' forces it")
        elif self.opts.pipeline == "auto" and weights < PIPELINE_MIN_WEIGHTS:
            why = (f"blocks too small to gain from it: {weights:,} weights, under "
                   f"{PIPELINE_MIN_WEIGHTS:,}; pipeline='on' forces it")
        elif self.optimizer is None:
            why = "nothing is trainable"
        else:
            why = group_stepping_unsupported(self.optimizer)
        if why is not None and self.opts.pipeline == "on":
            raise ConfigError(f"pipeline='on' but {why}")
        return why

    def _pipelined(self, x: Tensor) -> bool:
        """Whether this step's updates go to the update thread."""
        if self._pipe is not None and self.opts.pipeline == "on" and x.device.type != "cpu":
            raise ConfigError(
                f"pipeline='on' is for CPUs (on {x.device.type} the device already runs "
                "kernels asynchronously); use pipeline='auto' or 'off'")
        return self._pipelines_on(x.device)

    def _pipelines_on(self, device: torch.device) -> bool:
        if self._pipe is None or self.grad_reduce is not None:
            return False  # replicas: every gradient is reduced before the one Adam step
        if self._pipe.active:
            return True
        return device.type == "cpu" and (self.opts.pipeline == "on"
                                         or torch.get_num_threads() >= 2)

    @property
    def step_kind(self) -> str:
        """How train_step computes the updates, for logs."""
        if self.fast_path_off is not None:
            return f"autograd per block ({self.fast_path_off})"
        kind = "written-out local updates (sigprop.fastpath)"
        if self.pipeline_off is not None:
            return f"{kind}, in sequence ({self.pipeline_off})"
        if self.pipelines:
            return (f"{kind}; each block's BatchNorm backward, weight gradient and Adam "
                    "step on a second thread while the forward sweep goes on "
                    "(sigprop.pipeline)")
        return f"{kind}, in sequence (pipeline: needs a CPU and >= 2 threads)"

    @property
    def pipelines(self) -> bool:
        """Whether a training step now would hand block updates to the update thread
        (fast path and pipeline apply, parameters on a CPU, >= 2 threads or 'on')."""
        return self._pipelines_on(next(self.modules.parameters()).device)

    def sync(self) -> None:
        if self._pipe is not None:
            self._pipe.sync()

    def lagging_updates(self):
        """Context: pipelined updates run only when the forward sweep must wait for
        one, so it runs as far ahead as allowed (the peak memory of the pipeline;
        :meth:`UpdateWorker.lagging`). A no-op context without the pipeline."""
        return self._pipe.lagging() if self._pipe is not None else contextlib.nullcontext()

    def __getstate__(self) -> dict:
        self.sync()  # a copy or pickle sees every update applied
        return self.__dict__.copy()

    def _stats_rows(self, n: int) -> int | None:
        return n if self.opts.bn_stats == "inputs" else None

    @property
    def _drops_targets(self) -> bool:
        """Whether dropout drops the target rows too (``target_dropout='on'``)."""
        return self.opts.target_dropout == "on"

    def _spared_rows(self, n: int) -> int | None:
        """The first row dropout spares in an (n + m)-row block input: the targets'
        with ``target_dropout='off'``, else None (every row dropped)."""
        return None if self._drops_targets else n

    def _feedback(self, x: Tensor) -> Feedback:
        """A label-free pass for loop-back generators (Fig. 2c), without gradients.

        In training mode it normalises with the batch's statistics, as the pass that
        follows will, but does not count the batch in the running statistics twice.
        """
        with torch.no_grad(), frozen_running_stats():
            h = x
            for block in self.network.blocks:
                h = block(h)
            return Feedback(h.flatten(1), self.network.head(h))

    def _layer_logits(self, i: int, h: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """(n, classes) logits of L_pred at block i; per-sample targets become class means."""
        if not self.signal.per_sample:
            return SF.compare(h, t, self.opts.loss, self.scales[i])
        means, present = SF.class_targets(t, y, self.num_classes)
        if self.prototypes is not None:
            self.prototypes.update(i, means.detach(), present)
        logits = SF.compare(h, means, self.opts.loss, self.scales[i])
        return logits.masked_fill(~present, float("-inf"))  # absent classes: no target

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        losses, correct, _ = self._range_step(x, y, 0, len(self.network.blocks))
        return losses, correct

    # --- stages (sigprop.parallel): a contiguous range of blocks in this process ------
    def staging_unsupported(self) -> str | None:
        """Why this rule's blocks cannot be split into stages, or None. A stage receives
        the stacked rows ``[h; t]`` of the batch from the stage before and sends its own
        on; what needs more than that is refused."""
        if self.signal.needs_feedback:
            return (f"signal {self.opts.signal!r} loops the network's output back to block 1 "
                    "(Eq. 11/12): the first stage would wait for the last stage's label-free "
                    "pass of every batch, so the stages could not overlap; use --signal label "
                    "or label-input")
        if self._window:
            return ("sparse targets through conv blocks travel as kernel windows and fields, "
                    "not as stacked rows; use dense targets (--targets dense)")
        return None

    def stage_step(self, z: Tensor, y: Tensor, start: int, stop: int
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Train blocks ``start..stop-1`` (and the head, if ``stop`` is the last block)
        on one batch: ``z`` is the inputs x when ``start`` is 0, else the stacked rows
        ``[h; t]`` that block ``start - 1`` produced for the batch whose labels are
        ``y``. Returns (losses, correct) of these exits and the stacked rows for block
        ``stop`` (None at the last block). The same updates as :meth:`train_step` makes
        to these blocks."""
        blocks = len(self.network.blocks)
        if not 0 <= start < stop <= blocks:
            raise InputError(f"stage blocks {start}..{stop - 1} are not a range of the "
                             f"network's {blocks} blocks")
        why = self.staging_unsupported()
        if why is not None:
            raise ConfigError(f"staged training: {why}")
        if start == 0:
            self._check_batch(z, y)
        else:
            self._check_stage_rows(z, y, start)
        return self._range_step(z, y, start, stop)

    def stage_scores(self, z: Tensor, n: int, start: int, stop: int
                     ) -> tuple[list[Tensor], Tensor | None]:
        """Forward only, for evaluation: the exit scores of blocks ``start..stop-1``
        (and the head's at the last block) for ``n`` samples, as :meth:`exit_scores`
        computes them, and the stacked rows ``[h; t]`` for block ``stop`` (None at the
        last block). ``z``: the inputs (start 0), else what block ``start - 1`` sent
        (t: the m class targets, every sample's m candidates, or none with prototypes)."""
        self.sync()
        return self._scores(z, n, start, stop)

    def stage_rows(self, n: int, training: bool) -> int:
        """Target rows that travel with ``n`` samples between blocks: in training m class
        targets or n per-sample ones; at evaluation m class targets, n * m candidates, or
        none (prototypes)."""
        if not self.signal.per_sample:
            return self.num_classes
        if training:
            return n
        return 0 if self.prototypes is not None else n * self.num_classes

    def _check_stage_rows(self, z: Tensor, y: Tensor, start: int) -> None:
        """What a later stage receives: (n + rows, *block output) floats like the
        parameters, and n labels."""
        if y.dim() != 1:
            raise InputError(f"labels must be a (n,) tensor, got shape {tuple(y.shape)}")
        n = y.shape[0]
        want = (n + self.stage_rows(n, True), *self.network.block_shapes[start - 1])
        if tuple(z.shape) != want:
            raise InputError(f"block {start + 1} takes stacked rows of shape {want} for "
                             f"{n} samples, got {tuple(z.shape)}")
        check_y(y, n, self.num_classes, z.device)

    def _range_step(self, x: Tensor, y: Tensor, start: int, stop: int
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The step of blocks ``start..stop-1`` on a checked batch: written out
        (pipelined or in sequence) where it applies, else autograd block by block.
        ``x`` is the batch's inputs (start 0) or the stacked rows ``[h; t]`` that block
        ``start`` takes (a later stage of a staged run, :mod:`sigprop.parallel`).
        Returns (losses, correct) of these blocks' exits (and the head's, if ``stop`` is
        the last block) and, when blocks follow, the stacked rows for the next one.
        Every refusal is raised before any work."""
        # The written-out step is the training-mode computation of hook-free modules;
        # anything else (hooks, a BatchNorm put in eval mode) is the modules' own call.
        why = None
        if self.fast_parts:
            if fastpath.hooked(self._fast_modules):
                why = "a block has forward or backward hooks, which only the autograd path runs"
            elif not all(p.bn.training for p in self.fast_parts):
                why = "a BatchNorm is in eval mode; the written-out step is training mode"
        if self.fast_parts and why is not None and self.opts.fast_path == "on":
            raise ConfigError(f"fast_path='on' but {why}; use fast_path='auto' or 'off'")
        if self.fast_parts and why is None and self._pipelined(x):
            return self._fast_train_step(x, y, True, start, stop)
        self.sync()
        for p in self._trainable:  # zero_grad(set_to_none=True), without its overhead
            p.grad = None
        if self.fast_parts and why is None:
            out = self._fast_train_step(x, y, False, start, stop)
        else:
            out = self._autograd_train_step(x, y, start, stop)
        self._mark("step")
        if self.grad_reduce is not None:
            self.grad_reduce([p.grad for p in self._trainable if p.grad is not None])
        if self.optimizer is not None:
            self.optimizer.step()  # every block's update, from its own gradient
        return out

    @property
    def _fast_modules(self) -> tuple[nn.Module, ...]:
        return tuple(m for p in self.fast_parts for m in p.modules)

    def _finish_step(self, h: Tensor, y: Tensor, losses: list[Tensor],
                     logits_seen: list[Tensor], pipelined: bool = False,
                     out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The classifier head's own loss on the last block's detached output (Fig. 2b),
        then (losses, correct counts) of every exit, counted in one op. ``out``: the
        stacked rows for the next stage when blocks follow (no head here then)."""
        if self.classifier and out is None:
            self._mark("head")
            slot = len(self.fast_parts)
            if pipelined:  # the head's last update done; its gradient starts afresh
                self._pipe.ready(slot)
                for p in self.network.head.parameters():
                    p.grad = None
            logits = self.network.head(h)
            loss = F.cross_entropy(logits, y)
            if loss.requires_grad:
                loss.backward()
                if pipelined:
                    self._queue_update(slot, None, None, None)
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
        correct = (torch.stack(logits_seen).argmax(2) == y).sum(1)
        return torch.stack(losses), correct, out

    def _fast_train_step(self, x: Tensor, y: Tensor, pipelined: bool = False,
                         start: int = 0, stop: int | None = None
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Gradients for standard fc blocks and a built-in generator, without autograd:
        the same as the autograd path's (tests/test_fastpath.py).

        ``pipelined``: each block's BatchNorm backward, weight gradient and Adam step
        go to the update thread (sigprop.pipeline); block i's forward waits for block
        i's previous update, and its BatchNorm forward for the BatchNorm backward of
        the block before (which overlaps only the Linear's product). Memory: at most
        one (n + m)-row tensor more than in sequence.
        """
        pipe = self._pipe if pipelined else None
        if pipe is not None:
            pipe.begin()
        stop = len(self.fast_parts) if stop is None else stop
        n, kind = y.shape[0], self.opts.loss
        # per-sample targets: L_pred against their class means, prototypes updated
        means_of = self.num_classes if self.signal.per_sample else None
        fb = None
        if self.signal.needs_feedback:  # the label-free pass reads every block
            if pipe is not None:
                pipe.drain()
            fb = self._feedback(x)
        losses, logits_seen = [], []
        mode = SP.WINDOW if self._window else SP.ROWS  # sparse targets' travel (sparse.py)
        h = t = None  # sparse through conv blocks: inputs' and targets' outputs apart
        with torch.no_grad():
            z = x
            staged = pipe.staged if pipe is not None else None
            for i in range(start, stop):
                parts = self.fast_parts[i]
                self._mark(f"block{i + 1}")
                if pipe is not None:
                    pipe.ready(i)
                    if i == start:  # block 1 overlaps no BatchNorm backward (memory)
                        pipe.staged()
                if mode != SP.ROWS and parts.conv:  # sparse: windows, then fields
                    t = None if i == 0 else SP.fit_grid(t, self.network.block_shapes[i])
                    h, t, loss, logits = self._fast_pair_block(
                        i, parts, x if i == 0 else h, t, mode, y, fb,
                        staged if i else None, pipe is not None)
                    mode = SP.FIELD
                    losses.append(loss)
                    logits_seen.append(logits)
                    continue
                if mode == SP.FIELD:  # a Flatten: the fields laid out over the map, stacked
                    z = torch.cat([h, SF.lay_out(t, tuple(h.shape[2:]))])
                    mode = SP.ROWS
                input_grad = None
                if i == 0 and self.signal.at_input:  # sparse fc: [x, t] rows in one buffer
                    z = x.new_empty((n + self.num_classes, *x.shape[1:]))
                    z[:n].copy_(x)
                    _, t_backward = self.signal.fast_targets(x, y, fb, z[n:])
                    input_grad = self._target_input_grad(parts, n, t_backward)
                if i == 0 and not self.signal.at_input:  # [h1, t1] in one buffer, no cat
                    rows = n if self.signal.per_sample else self.num_classes
                    z = x.new_empty((n + rows, *self.network.block_shapes[0]))
                    st = fastpath.block_forward(parts, x, n, out=z[:n])
                    t1, targets_backward = self.signal.fast_targets(st.o, y, fb, z[n:])
                    do, dt1 = torch.empty_like(st.o), torch.empty_like(t1)
                    loss, logits, _, classes = fastpath.pred_grads(
                        kind, self.scales[0], st.o, t1, y, do, dt1, num_classes=means_of)
                    targets_backward(dt1, do)
                else:
                    st = fastpath.block_forward(parts, z, self._stats_rows(n) or z.shape[0],
                                                after_matmul=staged,
                                                spare_from=self._spared_rows(n))
                    z = st.o
                    do = torch.empty_like(z)
                    loss, logits, _, classes = fastpath.pred_grads(
                        kind, self.scales[i], z[:n], z[n:], y, do[:n], do[n:],
                        num_classes=means_of)
                if pipe is None:
                    da = fastpath.bn_backward(parts, st, do)
                    fastpath.op_backward(parts.op, st.x, da)
                    if input_grad is not None:
                        input_grad(da)
                    st.held = None
                    del da
                else:
                    self._queue_update(i, parts, st, do, input_grad)
                del st, do
                if self.prototypes is not None:
                    self.prototypes.update(i, *classes)
                losses.append(loss)
                logits_seen.append(logits)
        if pipe is not None:  # block 1's weight gradient has read x: the caller may reuse it
            pipe.wait(start)
        last = h if mode == SP.FIELD else z[:n]
        out = z if stop < len(self.fast_parts) else None
        return self._finish_step(last, y, losses, logits_seen, pipelined, out)

    def _fast_pair_block(self, i: int, parts: fastpath.BlockParts, h: Tensor,
                         t: Tensor | None, mode: str, y: Tensor, fb: Feedback | None,
                         staged, pipelined: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A conv block with sparse targets, written out: block 1 takes each class's
        window (made here) with its conv once, later blocks take fields
        (sigprop.sparse); L_pred against the fields; the update in sequence or queued.
        Returns the block's outputs for inputs and targets, its loss and logits."""
        t_backward = None
        if i == 0:
            window = h.new_empty((self.num_classes, *self.signal.target_shape))
            t, t_backward = self.signal.fast_targets(h, y, fb, window)
        out = h.new_empty((h.shape[0], *self.network.block_shapes[i]))
        ps = SP.pair_forward(parts, h, t, mode, out=out, after_matmul=staged,
                             drop_targets=self._drops_targets)
        do_x = torch.empty_like(ps.x.o)
        loss, logits, do_t = SP.field_pred_grads(self.opts.loss, self.scales[i], ps.x.o,
                                                 ps.o_t, y, do_x)

        def grads() -> None:
            nonlocal ps, do_x, do_t
            dt_in = SP.pair_backward(parts, ps, do_x, do_t, input_grad=t_backward is not None)
            ps = do_x = do_t = None  # what the forward kept goes with the update
            if t_backward is not None:
                t_backward(dt_in, None)

        h_out, t_out = ps.x.o, ps.o_t
        if pipelined:
            self._queue_update(i, None, None, None, stage=grads)
        else:
            grads()
        return h_out, t_out, loss, logits

    def _target_input_grad(self, parts: fastpath.BlockParts, n: int, t_backward):
        """For input-side (sparse, fc) targets: dL/da -> the generator's gradients, through
        block 1's Linear (dL/dt = dL/da[n:] W)."""
        def grad(da: Tensor) -> None:
            t_backward(da[n:] @ parts.op.weight, None)
        return grad

    def _queue_update(self, slot: int, parts: fastpath.BlockParts | None,
                      st: fastpath.BlockState | None, do: Tensor | None,
                      input_grad=None, stage=None) -> None:
        """Queue slot's update: the block's BatchNorm backward from dL/do (then the
        stage is done: what the next BatchNorm forward waits for) and its Linear's
        gradients, if given (and ``input_grad(dL/da)``: the generator's, for sparse
        targets); then its group's Adam step with the learning rate of now; gradients
        dropped after."""
        optimizer, pipe = self.optimizer, self._pipe
        k = self._group_index[slot]
        group = optimizer.param_groups[k] if k is not None else None
        lr = group["lr"] if group is not None else 0.0

        def update() -> None:
            nonlocal st, do
            if stage is not None:  # a block's whole backward, given as one function
                stage()
                pipe.stage_done()
            if parts is not None:
                da = fastpath.bn_backward(parts, st, do)  # releases a, o and the mask
                do = None
                pipe.stage_done()
                fastpath.op_backward(parts.op, st.x, da)
                if input_grad is not None:
                    input_grad(da)
                st = da = None  # x released (and uncounted) once the gradient exists
            if group is not None:
                adam_group_step(optimizer, group, lr)
                for p in group["params"]:
                    p.grad = None

        pipe.submit(slot, update)

    def _autograd_train_step(self, x: Tensor, y: Tensor, start: int = 0,
                             stop: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        blocks = self.network.blocks
        stop = len(blocks) if stop is None else stop
        n = y.shape[0]
        fb = self._feedback(x) if self.signal.needs_feedback else None
        losses, logits_seen = [], []
        h = t = x
        z = x if start else None  # the last block's (n + m)-row output
        mode = SP.WINDOW if self._window else SP.ROWS  # how targets travel (sparse.py)
        drop_targets = self._drops_targets
        for i in range(start, stop):
            block = blocks[i]
            self._mark(f"block{i + 1}")
            if i == 0 and not self.signal.at_input:
                h_out = block(x)  # only inputs here: BN statistics are the inputs'
                t_out = self.signal.targets(h_out, y, fb)
            elif i == 0 and mode == SP.WINDOW:  # sparse: each class's kernel window
                h_out, t_out, mode = SP.forward_pair(block, x, self.signal.targets(x, y, fb),
                                                     mode, drop_targets)
            elif mode == SP.FIELD:  # sparse: fields
                h_out, t_out, mode = SP.forward_pair(
                    block, h, SP.fit_grid(t, self.network.block_shapes[i]), mode, drop_targets)
            else:
                # [h, t]: built once (block 1 for input-side targets, else block 2);
                # later it is z itself (no copy)
                if z is not None:
                    stacked = z.detach()
                elif i == 0:  # sparse fc: target rows shaped like input rows
                    stacked = torch.cat([x, self.signal.targets(x, y, fb)])
                else:
                    stacked = torch.cat([h, t])
                with stats_from_first(self._stats_rows(n)), \
                        dropout_spares_rows_from(self._spared_rows(n)):
                    z = block(stacked)  # (n + m, *D): inputs, then targets
                h_out, t_out = z.split([n, z.shape[0] - n])  # backward: one cat, no zero-fill
            if mode == SP.FIELD:
                logits = SF.field_compare(h_out, t_out, self.opts.loss, self.scales[i])
            else:
                logits = self._layer_logits(i, h_out, t_out, y)
            loss = F.cross_entropy(logits, y)
            if loss.requires_grad:  # this block's (and at block 1 the generator's) grads
                loss.backward()
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
            h, t = h_out.detach(), t_out.detach()
        out = None
        if stop < len(blocks):  # block 1 alone made h and t apart
            out = z.detach() if z is not None else torch.cat([h, t])
        return self._finish_step(h, y, losses, logits_seen, out=out)

    # --- inference ----------------------------------------------------------------
    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        """Early exits (Eq. 8) of every block, then the head's logits if there is one.

        Per-class generators: h and the m class targets go through each block and are
        compared. Per-sample generators: with ``exit_targets="prototypes"`` (default)
        h is compared with each layer's running class means of the training targets (no
        label, no generator, no target rows at inference); with ``"candidates"`` each
        sample's m candidate targets (one per class) go through each block, m x the
        target work, and the best match wins.
        """
        return self._scores(x, x.shape[0], 0, len(self.network.blocks))[0]

    def _scores(self, z: Tensor, n: int, start: int, stop: int
                ) -> tuple[list[Tensor], Tensor | None]:
        """The exits of blocks ``start..stop-1`` (see :meth:`stage_scores`)."""
        with torch.no_grad():
            scores = []
            h = t = None
            for i, h, t, mode in self._walk(z, n, start, stop):
                if mode == SP.FIELD:
                    scores.append(SF.field_compare(h, t, self.opts.loss, self.scales[i]))
                elif self.prototypes is not None:
                    proto, seen = self.prototypes.get(i)
                    s = SF.compare(h, proto, self.opts.loss, self.scales[i])
                    scores.append(s.masked_fill(~seen, float("-inf")))
                elif self.signal.per_sample:
                    paired = t.view(n, self.num_classes, *t.shape[1:])
                    scores.append(SF.compare_paired(h, paired, self.opts.loss, self.scales[i]))
                else:
                    scores.append(SF.compare(h, t, self.opts.loss, self.scales[i]))
            if stop < len(self.network.blocks):
                return scores, torch.cat([h, t])
            if self.classifier:
                scores.append(self.network.head(h))
            return scores, None

    def _walk(self, z: Tensor, n: int | None = None, start: int = 0, stop: int | None = None):
        """Inputs and targets through blocks ``start..stop-1`` as the exits see them (no
        labels): yields (block index, outputs h, targets t, the targets' travel mode) per
        block. ``z``: the inputs (start 0), else the stacked rows ``[h; t]`` of ``n``
        samples. Per-class generators: the m class targets; per-sample ones: every
        sample's m candidate targets, (n * m, *D), or none with prototypes."""
        blocks = self.network.blocks
        stop = len(blocks) if stop is None else stop
        n = z.shape[0] if n is None else n
        h, t = z[:n], z[n:]  # at block 1: the inputs, and no targets yet
        fb = (self._feedback(h) if start == 0 and self.signal.needs_feedback
              and self.prototypes is None else None)
        mode = SP.WINDOW if self._window else SP.ROWS
        for i in range(start, stop):
            block = blocks[i]
            if i == 0 and self.signal.at_input:  # sparse: targets of block 1's input
                t = self.signal.targets(h)
            if mode != SP.ROWS:  # sparse through conv blocks (sigprop.sparse)
                if mode == SP.FIELD:
                    t = SP.fit_grid(t, self.network.block_shapes[i])
                h, t, mode = SP.forward_pair(block, h, t, mode)
            else:
                h = block(h)
                if i == 0 and not self.signal.at_input:
                    if self.prototypes is not None:
                        t = h[:0]
                    elif self.signal.per_sample:
                        t = self.signal.candidates(h, fb).flatten(0, 1)  # (n * m, *D)
                    else:
                        t = self.signal.targets(h)  # (m, *D)
                else:
                    t = block(t) if t.shape[0] else h[:0]
            yield i, h, t, mode

    def target_shapes(self) -> list[tuple[int, ...]]:
        """The shape of one target row at each block's output, as it travels (dense:
        the block's output shape; sparse through conv blocks: (C, G, G) fields), from a
        dry run of two zero samples in eval mode (nothing learns, nothing is counted)."""
        self.sync()
        training = [m.training for m in self.modules.modules()]
        self.modules.eval()
        try:
            ref = next(self.network.parameters())
            x = torch.zeros(2, *self.network.input_shape, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                return [tuple(t.shape[1:]) for _, _, t, _ in self._walk(x)]
        finally:
            for m, mode in zip(self.modules.modules(), training):
                m.training = mode
