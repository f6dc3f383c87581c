"""Sigprop's written-out step (fastpath.py): the sweep over standard blocks, in sequence
or pipelined (pipeline.py), and the planning of both.

:meth:`FastStep.run` takes a batch, the generator's feedback and, when pipelined, the
update worker and the blocks' Adam steps; it returns each block's loss, logits and
per-sample class means, and the last block's outputs. The rule finishes the step (the
head, the counts, the optimizer step in sequence): the sweep never calls back into it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...signals import Feedback, TargetGenerator
from . import fastpath
from .fastpath import BlockParts
from .pipeline import GroupSteps, UpdateWorker, group_stepping_unsupported, queue_update
from .travel import ROWS, Pair, StepContext, Travel

# pipeline='auto' hands block updates to the update thread only for blocks with at
# least this many Linear (or conv) weights in all: below it the hand-offs between the
# threads cost more than the overlap gains (docs/studies/pipeline.md)
PIPELINE_MIN_WEIGHTS = 250_000


def plan_fast_path(blocks: Sequence[nn.Module], signal: TargetGenerator,
                   input_shape: tuple[int, ...], setting: str
                   ) -> tuple[list[BlockParts], str | None]:
    """The blocks' parts for the written-out step, and None; or [] and why not
    (``setting``: the fast_path option; 'on' raises instead)."""
    if setting == "off":
        return [], "fast_path='off'"
    why = None
    parts = []
    if not signal.has_fast_path:
        why = f"signal {type(signal).__name__} has no written-out step"
    else:
        for i, block in enumerate(blocks):
            p = fastpath.match_block(block)
            if isinstance(p, str):
                why = f"block {i + 1}: {p}"
                break
            if i == 0 and not (p.conv or p.flatten) and len(input_shape) != 1:
                why = "block 1: a Linear on multi-dimensional samples without Flatten"
                break
            parts.append(p)
    if why is None:
        return parts, None
    if setting == "on":
        raise ConfigError(f"fast_path='on' but the written-out step does not apply: {why}")
    return [], why


def plan_pipeline(setting: str, parts: list[BlockParts], fast_path_off: str | None,
                  signal: TargetGenerator, optimizer: torch.optim.Optimizer | None
                  ) -> str | None:
    """None if block updates may run on the update thread (on a CPU with >= 2 threads,
    checked at each step), else why not (``setting``: the pipeline option; 'on'
    raises instead)."""
    if setting == "off":
        return "pipeline='off'"
    weights = sum(p.op.weight.numel() for p in parts)
    if fast_path_off is not None:
        why = "the fast path does not apply"
    elif setting == "auto" and signal.needs_feedback:
        why = ("the loop-back generator's label-free pass reads every block, so each "
               "step would wait for all updates (measured slower); pipeline='on' forces it")
    elif setting == "auto" and any(p.conv for p in parts):
        # a conv on one of the two threads is slower than the overlap gains
        # (docs/studies/pipeline.md)
        why = ("conv blocks: their products use both threads better in sequence "
               "(measured); pipeline='on' forces it")
    elif setting == "auto" and weights < PIPELINE_MIN_WEIGHTS:
        why = (f"blocks too small to gain from it: {weights:,} weights, under "
               f"{PIPELINE_MIN_WEIGHTS:,}; pipeline='on' forces it")
    elif optimizer is None:
        why = "nothing is trainable"
    else:
        why = group_stepping_unsupported(optimizer)
    if why is not None and setting == "on":
        raise ConfigError(f"pipeline='on' but {why}")
    return why


@dataclass
class BlockResult:
    """A block's L_pred, its logits and, for per-sample targets, (class means, present)."""

    loss: Tensor
    logits: Tensor
    classes: tuple[Tensor, Tensor] | None


class FastStep:
    """The written-out sweep over standard blocks (``parts``, one per block): block 1
    takes the generator's targets by the travel ``first``; ``shapes``, ``scales``: the
    blocks' output shapes and logit scales; ``kind``: L_pred's comparison;
    ``stats_from_inputs``: BatchNorm statistics from the inputs' rows only;
    ``drop_targets``: dropout drops target rows too."""

    def __init__(self, parts: list[BlockParts], first: Travel, signal: TargetGenerator,
                 shapes: Sequence[tuple[int, ...]], scales: list[float], kind: str,
                 num_classes: int, stats_from_inputs: bool, drop_targets: bool) -> None:
        self.parts, self.first, self.signal = parts, first, signal
        self.shapes, self.scales, self.kind = shapes, scales, kind
        self.num_classes = num_classes
        self.stats_from_inputs, self.drop_targets = stats_from_inputs, drop_targets
        self.modules = tuple(m for p in parts for m in p.modules)

    def unavailable(self) -> str | None:
        """Why this step cannot be written out now, or None: it is the training-mode
        computation of hook-free modules; anything else is the modules' own call."""
        if fastpath.hooked(self.modules):
            return "a block has forward or backward hooks, which only the autograd path runs"
        if not all(p.bn.training for p in self.parts):
            return "a BatchNorm is in eval mode; the written-out step is training mode"
        return None

    def run(self, x: Tensor, y: Tensor, fb: Feedback | None, start: int, stop: int,
            worker: UpdateWorker | None = None, steps: GroupSteps | None = None,
            marker: Callable[[str], None] | None = None) -> tuple[list[BlockResult], Pair]:
        """Blocks ``start..stop-1`` on ``x`` (the inputs at start 0, else the stacked
        rows ``[h; t]``): each block's gradients written into ``.grad`` (in sequence) or
        its update queued on ``worker`` with ``steps`` (pipelined: block i's forward
        waits for block i's previous update, its BatchNorm forward for the BatchNorm
        backward of the block before; at most one (n + m)-row tensor more memory).
        ``marker`` is called with "block<i>" as each starts. Returns each block's
        result and the last block's outputs."""
        n = y.shape[0]
        per_sample = self.signal.per_sample
        ctx = StepContext(
            n, y, n if self.stats_from_inputs else None, self.drop_targets, self.kind,
            means_of=self.num_classes if per_sample else None, classes=self.num_classes,
            target_rows=n if per_sample else self.num_classes,
            target_shape=self.signal.target_shape,
            after_matmul=worker.staged if worker is not None else None)

        def make(h: Tensor, out: Tensor):
            return self.signal.fast_targets(h, y, fb, out)

        pair = Pair.stacked(x, n) if start else Pair(x, None)
        travel = self.first if start == 0 else ROWS
        results = []
        with torch.no_grad():
            for i in range(start, stop):
                if marker is not None:
                    marker(f"block{i + 1}")
                if worker is not None:
                    worker.ready(i)
                    if i == start:  # block 1 overlaps no BatchNorm backward (memory)
                        worker.staged()
                done = travel.fast(self.parts[i], pair, self.shapes[i], self.scales[i], ctx,
                                   make if i == 0 else None)
                if worker is None:
                    done.backward.first()
                    done.backward.second()
                else:
                    queue_update(worker, i, done.backward, steps.queued(i))
                pair, travel = done.pair, done.travel
                results.append(BlockResult(done.loss, done.logits, done.classes))
                del done
        if worker is not None:  # block 1's weight gradient has read x: the caller may reuse it
            worker.wait(start)
        return results, pair
