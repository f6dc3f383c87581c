"""Sigprop's early exits (Eq. 8) without labels: every block's output compared with its
targets, as they travel (travel.py), or with prototypes.

Per-class generators: h and the m class targets go through each block and are compared.
Per-sample generators: with ``exit_targets="prototypes"`` (default) h is compared with
each layer's running class means of the training targets (no label, no generator, no
target rows at inference); with ``"candidates"`` each sample's m candidate targets (one
per class) go through each block, m x the target work, and the best match wins.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ... import functional as SF
from ...networks import Network
from ...networks.batchnorm import frozen_running_stats
from ...signals import Feedback, TargetGenerator
from .travel import ROWS, Pair, Travel

PROTOTYPE_MOMENTUM = 0.1  # as BatchNorm's running statistics


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


def label_free_pass(network: Network, x: Tensor) -> Feedback:
    """The network's own output on ``x``, for loop-back generators (Fig. 2c), without
    gradients. In training mode it normalises with the batch's statistics, as the pass
    that follows will, but does not count the batch in the running statistics twice."""
    with torch.no_grad(), frozen_running_stats():
        h = x
        for block in network.blocks:
            h = block(h)
        return Feedback(h.flatten(1), network.head(h))


class Exits:
    """The exits of a sigprop network: its blocks, its generator and how targets leave
    it (``first``: the travel at block 1), the logit scales, the comparison ``kind``,
    the prototypes (None: targets go through the blocks) and whether the head predicts."""

    def __init__(self, network: Network, signal: TargetGenerator, first: Travel,
                 scales: list[float], kind: str, num_classes: int,
                 prototypes: Prototypes | None, classifier: bool) -> None:
        self.network, self.signal, self.first = network, signal, first
        self.scales, self.kind, self.num_classes = scales, kind, num_classes
        self.prototypes, self.classifier = prototypes, classifier

    def walk(self, z: Tensor, n: int | None = None, start: int = 0, stop: int | None = None
             ) -> Iterator[tuple[int, Tensor, Tensor, Travel]]:
        """Inputs and targets through blocks ``start..stop-1`` (no labels): yields (block
        index, outputs h, targets t, the targets' travel after the block). ``z``: the
        inputs (start 0), else the stacked rows ``[h; t]`` of ``n`` samples. Per-class
        generators: the m class targets; per-sample ones: every sample's m candidate
        targets, (n * m, *D), or none with prototypes."""
        blocks = self.network.blocks
        stop = len(blocks) if stop is None else stop
        n = z.shape[0] if n is None else n
        pair = Pair(z[:n], z[n:])  # at block 1: the inputs, and no targets yet
        fb = (label_free_pass(self.network, pair.h) if start == 0 and self.signal.needs_feedback
              and self.prototypes is None else None)
        travel = self.first if start == 0 else ROWS

        def make(h: Tensor) -> Tensor:
            if self.prototypes is not None:
                return h[:0]
            if self.signal.per_sample:
                return self.signal.candidates(h, fb).flatten(0, 1)  # (n * m, *D)
            return self.signal.targets(h)  # (m, *D)

        for i in range(start, stop):
            pair, travel = travel.infer(blocks[i], pair, self.network.block_shapes[i],
                                        make if i == 0 else None)
            yield i, pair.h, pair.t, travel

    def scores(self, z: Tensor, n: int, start: int, stop: int
               ) -> tuple[list[Tensor], Tensor | None]:
        """The exits' scores of blocks ``start..stop-1`` (and the head's at the last
        block), and the stacked rows ``[h; t]`` for block ``stop`` (None at the last)."""
        with torch.no_grad():
            scores = []
            h = t = None
            for i, h, t, travel in self.walk(z, n, start, stop):
                scores.append(self._score(i, h, t, travel, n))
            if stop < len(self.network.blocks):
                return scores, torch.cat([h, t])
            if self.classifier:
                scores.append(self.network.head(h))
            return scores, None

    def _score(self, i: int, h: Tensor, t: Tensor, travel: Travel, n: int) -> Tensor:
        scale = self.scales[i]
        if self.prototypes is not None:
            proto, seen = self.prototypes.get(i)
            s = SF.compare(h, proto, self.kind, scale)
            return s.masked_fill(~seen, float("-inf"))
        if self.signal.per_sample:
            paired = t.view(n, self.num_classes, *t.shape[1:])
            return SF.compare_paired(h, paired, self.kind, scale)
        return travel.compare(h, t, self.kind, scale)

    def target_shapes(self, modules: nn.Module) -> list[tuple[int, ...]]:
        """The shape of one target row at each block's output, as it travels (dense: the
        block's output shape; sparse through conv blocks: (C, G, G) fields), from a dry
        run of two zero samples with ``modules`` in eval mode (nothing learns, nothing
        is counted)."""
        training = [m.training for m in modules.modules()]
        modules.eval()
        try:
            ref = next(self.network.parameters())
            x = torch.zeros(2, *self.network.input_shape, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                return [tuple(t.shape[1:]) for _, _, t, _ in self.walk(x)]
        finally:
            for m, mode in zip(modules.modules(), training):
                m.training = mode
