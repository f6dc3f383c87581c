"""Eq. 1, the label projection: one target per class."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as SF
from ..networks import LEAKY_SLOPE
from ..registry import register_signal
from .base import Feedback, TargetGenerator, TargetsBackward, leaky
from .projection import projection_backward, projection_targets


@register_signal("label")
class LabelProjection(TargetGenerator):
    """Eq. 1: t1 = f(S1 c_m + d1) for each class one-hot c_m; one target per class."""

    def __init__(self, num_classes: int, target_shape, learned: bool = True, **_) -> None:
        super().__init__(num_classes, target_shape, learned)
        self.proj = nn.Linear(num_classes, self.dim)
        self._finish()

    def targets(self, h1: Tensor, y: Tensor | None = None, fb: Feedback | None = None) -> Tensor:
        t = SF.label_projection(self._eye(h1), self.proj.weight, self.proj.bias, leaky)
        return t.view(self.num_classes, *self.target_shape)  # (m, *D)

    def fast_targets(self, h1: Tensor, y: Tensor, fb: Feedback | None, out: Tensor
                     ) -> tuple[Tensor, TargetsBackward]:
        _, pre = projection_targets(self.proj, None, LEAKY_SLOPE, out)  # u = I
        return out, lambda dt1, dh1: projection_backward(self.proj, None, pre, LEAKY_SLOPE,
                                                         dt1)
