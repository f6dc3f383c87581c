"""Sparse targets (Sec. III-E): the label projection of Eq. 1, made as small as the first
layer's weights allow, for the *input* of the first block.

* Fully connected first block: K values per class (``sparse_size``), zero-filled to the
  block's input size: the block's Linear takes them like an input row, and only K of its
  input columns see a target ("the layer is no longer fully connected").
* Convolutional first block: one kernel window of the block's input per class,
  ``(C_in, k, k)`` (the paper's 10x32x3x3 for a 32->16 3x3 conv); the conv takes it once,
  at one position (sigprop.rules.sigprop.sparse says how it travels on from there).

The rule sends these targets through block 1 with the inputs (``at_input``): the
generator learns from block 1's loss through block 1's weights.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..networks import LEAKY_SLOPE
from ..registry import register_sparse_signal
from .base import Feedback, TargetGenerator, TargetsBackward, leaky
from .projection import projection_backward, projection_targets

# share of the first block's inputs a sparse target fills by default: half keeps most of
# the accuracy (the K sweep: docs/studies/sparse-targets.md, "An fc first block: K")
SPARSE_FRACTION = 0.5


@register_sparse_signal("label")
class SparseLabelProjection(TargetGenerator):
    """t = f(S c_m + d) for each class one-hot c_m, ``size`` values zero-filled to
    ``target_shape`` (block 1's input row, or one window): one target per class."""

    at_input = True

    def __init__(self, num_classes: int, target_shape, learned: bool = True, *,
                 sparse_size: int | None = None, **_) -> None:
        super().__init__(num_classes, target_shape, learned)
        size = self.dim if sparse_size is None else sparse_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.dim:
            raise ConfigError(
                f"sparse_size must be an integer in 1..{self.dim} (the first block's input "
                f"size), got {sparse_size!r}")
        self.size = size
        self.proj = nn.Linear(num_classes, size)
        self._finish()

    def targets(self, h1: Tensor, y: Tensor | None = None, fb: Feedback | None = None) -> Tensor:
        """(m, *target_shape); ``h1`` only gives the device and dtype (the input batch)."""
        t = leaky(self.proj(self._eye(h1)))  # (m, K)
        if self.size < self.dim:
            t = F.pad(t, (0, self.dim - self.size))  # zero-filled to the input size
        return t.view(self.num_classes, *self.target_shape)

    def fast_targets(self, h1: Tensor, y: Tensor, fb: Feedback | None, out: Tensor
                     ) -> tuple[Tensor, TargetsBackward]:
        rows = out.view(self.num_classes, self.dim)
        rows[:, self.size:].zero_()
        _, pre = projection_targets(self.proj, None, LEAKY_SLOPE, rows[:, : self.size])
        return out, lambda dt, _: projection_backward(
            self.proj, None, pre, LEAKY_SLOPE, dt.reshape(self.num_classes, -1)[:, : self.size])


def default_sparse_size(dim: int) -> int:
    """K for a fully connected first block of ``dim`` inputs when none is given."""
    return max(1, math.ceil(dim * SPARSE_FRACTION))
