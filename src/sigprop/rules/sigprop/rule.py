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
L_pred compares each output with the class means of the batch's targets; their exits
compare with prototypes by default (exits.py).

:meth:`Sigprop._autograd_step` is the reference step, block by block through autograd;
how targets go through each block is a travel object (travel.py). For standard blocks
and the built-in generators the step runs without autograd, written out
(fast_step.py, ``fast_path``): the same updates, less overhead. On a CPU it can be
pipelined (``pipeline``, pipeline.py): each block's BatchNorm backward, weight gradient
and Adam step run on a second thread while the forward sweep goes on; ``sync()`` waits
for them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import functional as SF
from ...errors import ConfigError, InputError
from ...networks import Network
from ...networks.batchnorm import convert_batchnorm
from ...options import Option, Options
from ...registry import SIGNALS, register_rule
from ...signals import TargetGenerator, build_signal
from ..base import LearningRule, RuleConfig, make_grouped_adam
from ..checks import check_y
from .exits import Exits, Prototypes, label_free_pass
from .fast_step import FastStep, plan_fast_path, plan_pipeline
from .options import (
    OPTIONS,
    SIGNAL,
    check_options,
    first_weight_layer,
    logit_scales,
    signal_options,
    sparse_target,
)
from .pipeline import GroupSteps, UpdateWorker, queue_update
from .travel import OUTPUT, ROWS, WINDOW, Pair, StepContext, Travel


@register_rule("sigprop")
class Sigprop(LearningRule):
    """Signal propagation (module docstring); ``signal``: a generator of one's own."""

    options = OPTIONS
    layered = True
    # its step on channels-last maps / on NCHW: VGG8b 0.91, CONV 0.88
    # (docs/studies/fast-path.md)
    channels_last_pays = True

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
        check_options(opts)

    def __init__(
        self, network: Network, num_classes: int, cfg: RuleConfig,
        signal: TargetGenerator | None = None,
    ) -> None:
        super().__init__(network, num_classes, cfg)
        opts = self.opts
        convert_batchnorm(network.blocks)
        shapes = network.block_shapes
        first = first_weight_layer(network.blocks[0])
        if signal is None:
            signal = self._build_signal(first)
        # where block 1 takes the generator's targets: after it (Eq. 1), with the inputs
        # as rows of the same shape (sparse, fc), or as kernel windows (sparse, conv)
        window = signal.at_input and isinstance(first, nn.Conv2d)
        self.first_travel: Travel = (WINDOW if window else ROWS) if signal.at_input else OUTPUT
        want = shapes[0] if not signal.at_input else (
            sparse_target(first, network.input_shape, None, opts.sparse_grid)[0]
            if window
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
        self.scales = logit_scales(opts, shapes, signal.per_sample,
                                   (signal.target_shape, first) if window else None)
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
        self.exits = Exits(network, signal, self.first_travel, self.scales, opts.loss,
                           num_classes, self.prototypes, self.classifier)
        self.fast_parts, self.fast_path_off = plan_fast_path(
            blocks, signal, network.input_shape, opts.fast_path)
        self.fast_step = FastStep(
            self.fast_parts, self.first_travel, signal, shapes, self.scales, opts.loss,
            num_classes, opts.bn_stats == "inputs", self._drops_targets,
        ) if self.fast_parts else None
        self.pipeline_off = plan_pipeline(opts.pipeline, self.fast_parts, self.fast_path_off,
                                          signal, self.optimizer)
        self._pipe: UpdateWorker | None = None
        self._steps: GroupSteps | None = None
        if self.pipeline_off is None:
            self._pipe = UpdateWorker(len(blocks) + 1)  # one slot per block, one for the head
            self._steps = GroupSteps(self.optimizer,
                                     [f"block{i + 1}" for i in range(len(blocks))] + ["head"])

    def _build_signal(self, first: nn.Module | None) -> TargetGenerator:
        """The generator the options name, for block 1's output or (sparse) input."""
        opts, net = self.opts, self.network
        if opts.targets == "sparse":
            shape, size = sparse_target(first, net.input_shape, opts.sparse_size,
                                        opts.sparse_grid)
            return build_signal(opts.signal, self.num_classes, shape, opts.signal_learned,
                                targets="sparse", sparse_size=size, **signal_options(opts))
        return build_signal(opts.signal, self.num_classes, net.block_shapes[0],
                            opts.signal_learned, head=net.head,
                            out_dim=math.prod(net.block_shapes[-1]), **signal_options(opts))

    # --- how a step runs ------------------------------------------------------------
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
        kind = "written-out local updates (sigprop.rules.sigprop.fastpath)"
        if self.pipeline_off is not None:
            return f"{kind}, in sequence ({self.pipeline_off})"
        if self.pipelines:
            return (f"{kind}; each block's BatchNorm backward, weight gradient and Adam "
                    "step on a second thread while the forward sweep goes on "
                    "(sigprop.rules.sigprop.pipeline)")
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

    @property
    def _drops_targets(self) -> bool:
        """Whether dropout drops the target rows too (``target_dropout='on'``)."""
        return self.opts.target_dropout == "on"

    # --- training ---------------------------------------------------------------------
    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        losses, correct, _ = self._range_step(x, y, 0, len(self.network.blocks))
        return losses, correct

    def _range_step(self, x: Tensor, y: Tensor, start: int, stop: int
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The step of blocks ``start..stop-1`` on a checked batch: written out
        (pipelined or in sequence) where it applies, else autograd block by block.
        ``x`` is the batch's inputs (start 0) or the stacked rows ``[h; t]`` that block
        ``start`` takes (a later stage of a staged run, :mod:`sigprop.parallel`).
        Returns (losses, correct) of these blocks' exits (and the head's, if ``stop`` is
        the last block) and, when blocks follow, the stacked rows for the next one.
        Every refusal is raised before any work."""
        fast = self.fast_step
        why = fast.unavailable() if fast is not None else None
        if fast is not None and why is not None and self.opts.fast_path == "on":
            raise ConfigError(f"fast_path='on' but {why}; use fast_path='auto' or 'off'")
        if fast is not None and why is None and self._pipelined(x):
            return self._written_step(x, y, start, stop, pipelined=True)
        self.sync()
        for p in self._trainable:  # zero_grad(set_to_none=True), without its overhead
            p.grad = None
        if fast is not None and why is None:
            out = self._written_step(x, y, start, stop, pipelined=False)
        else:
            out = self._autograd_step(x, y, start, stop)
        self._mark("step")
        if self.grad_reduce is not None:
            self.grad_reduce([p.grad for p in self._trainable if p.grad is not None])
        if self.optimizer is not None:
            self.optimizer.step()  # every block's update, from its own gradient
        return out

    def _autograd_step(self, x: Tensor, y: Tensor, start: int, stop: int
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The reference step: each block through autograd, its L_pred's backward."""
        blocks, shapes = self.network.blocks, self.network.block_shapes
        n = y.shape[0]
        fb = label_free_pass(self.network, x) if self.signal.needs_feedback else None
        ctx = StepContext(n, y, self._stats_rows(n), self._drops_targets)

        def make(h: Tensor) -> Tensor:
            return self.signal.targets(h, y, fb)

        losses, logits_seen = [], []
        pair = Pair.stacked(x.detach(), n) if start else Pair(x, None)
        travel = self.first_travel if start == 0 else ROWS
        for i in range(start, stop):
            self._mark(f"block{i + 1}")
            out, travel = travel.forward(blocks[i], pair, shapes[i], ctx,
                                         make if i == 0 else None)
            if self.signal.per_sample:
                logits = self._layer_logits(i, out.h, out.t, y)
            else:
                logits = travel.compare(out.h, out.t, self.opts.loss, self.scales[i])
            loss = F.cross_entropy(logits, y)
            if loss.requires_grad:  # this block's (and at block 1 the generator's) grads
                loss.backward()
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
            pair = out.detached()
        rows = pair.rows() if stop < len(blocks) else None
        return self._finish_step(pair.h, y, losses, logits_seen, out=rows)

    def _written_step(self, x: Tensor, y: Tensor, start: int, stop: int, pipelined: bool
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The step written out (fast_step.py), its updates in sequence or queued."""
        worker = self._pipe if pipelined else None
        if worker is not None:
            worker.begin()
        fb = None
        if self.signal.needs_feedback:  # the label-free pass reads every block
            if worker is not None:
                worker.drain()
            fb = label_free_pass(self.network, x)
        results, last = self.fast_step.run(x, y, fb, start, stop, worker,
                                           self._steps if pipelined else None, self.marker)
        if self.prototypes is not None:
            for i, r in enumerate(results, start):
                self.prototypes.update(i, *r.classes)
        rows = last.rows() if stop < len(self.fast_parts) else None
        return self._finish_step(last.h, y, [r.loss for r in results],
                                 [r.logits for r in results], pipelined, rows)

    def _stats_rows(self, n: int) -> int | None:
        return n if self.opts.bn_stats == "inputs" else None

    def _layer_logits(self, i: int, h: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """(n, classes) logits of L_pred at block i for per-sample targets: against
        their class means (absent classes get none); the prototypes follow them."""
        means, present = SF.class_targets(t, y, self.num_classes)
        if self.prototypes is not None:
            self.prototypes.update(i, means.detach(), present)
        logits = SF.compare(h, means, self.opts.loss, self.scales[i])
        return logits.masked_fill(~present, float("-inf"))  # absent classes: no target

    def _finish_step(self, h: Tensor, y: Tensor, losses: list[Tensor],
                     logits_seen: list[Tensor], pipelined: bool = False,
                     out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The classifier head's own loss on the last block's detached output (Fig. 2b),
        then (losses, correct counts) of every exit, counted in one op. ``out``: the
        stacked rows for the next stage when blocks follow (no head here then)."""
        if self.classifier and out is None:
            self._mark("head")
            slot = len(self.network.blocks)
            if pipelined:  # the head's last update done; its gradient starts afresh
                self._pipe.ready(slot)
                for p in self.network.head.parameters():
                    p.grad = None
            logits = self.network.head(h)
            loss = F.cross_entropy(logits, y)
            if loss.requires_grad:
                loss.backward()
                if pipelined:
                    queue_update(self._pipe, slot, None, self._steps.queued(slot))
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
        correct = (torch.stack(logits_seen).argmax(2) == y).sum(1)
        return torch.stack(losses), correct, out

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
        if self.first_travel is WINDOW:
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
        return self.exits.scores(z, n, start, stop)

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

    # --- inference ----------------------------------------------------------------
    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        """Early exits (Eq. 8) of every block, then the head's logits if there is one
        (exits.py)."""
        return self.exits.scores(x, x.shape[0], 0, len(self.network.blocks))[0]

    def target_shapes(self) -> list[tuple[int, ...]]:
        """The shape of one target row at each block's output, as it travels (dense:
        the block's output shape; sparse through conv blocks: (C, G, G) fields)."""
        self.sync()
        return self.exits.target_shapes(self.modules)
