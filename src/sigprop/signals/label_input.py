"""Eq. 10, label-and-input modulation: one target per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as SF
from ..networks import LEAKY_SLOPE
from ..registry import register_signal
from .base import Feedback, TargetGenerator, TargetsBackward, leaky


@register_signal("label-input")
class LabelInputModulation(TargetGenerator):
    """Eq. 10: t1 = h1 ⊙ f(S1 c + d1) + f(S2 c + d2); one target per sample.

    The scale goes through a sigmoid (a gain in (0, 1)), the shift through the
    network's LeakyReLU. Targets carry the input's statistics, so BatchNorm may take
    its statistics from inputs and targets alike with this generator.
    """

    per_sample = True

    def __init__(self, num_classes: int, target_shape, learned: bool = True, **_) -> None:
        super().__init__(num_classes, target_shape, learned)
        self.scale = nn.Linear(num_classes, self.dim)
        self.shift = nn.Linear(num_classes, self.dim)
        self._finish()

    def _modulate(self, h1_flat: Tensor, c: Tensor) -> Tensor:
        return SF.label_input_modulation(
            h1_flat, c, self.scale.weight, self.scale.bias, self.shift.weight, self.shift.bias,
            torch.sigmoid, leaky,
        )

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        c = F.one_hot(y, self.num_classes).to(h1.dtype)
        return self._modulate(h1.flatten(1), c).view_as(h1)  # (n, *D)

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        t = self._modulate(h1.flatten(1).unsqueeze(1), self._eye(h1))  # (n, m, d)
        return t.view(h1.shape[0], self.num_classes, *self.target_shape)

    def fast_targets(self, h1: Tensor, y: Tensor, fb: Feedback | None, out: Tensor
                     ) -> tuple[Tensor, TargetsBackward]:
        """t1 = h1 ⊙ σ(S1 c + d1) + LeakyReLU(S2 c + d2) for c = onehot(y): columns y of
        S1 and S2 gathered, no one-hot product. Its gradient reaches h1 too."""
        slope = LEAKY_SLOPE
        h1f = h1.flatten(1)
        pre_gain = self.scale.weight.T[y]  # S1 c: column y of S1
        if self.scale.bias is not None:
            pre_gain += self.scale.bias
        gain = pre_gain.sigmoid_()
        pre_shift = self.shift.weight.T[y]
        if self.shift.bias is not None:
            pre_shift += self.shift.bias
        shift = F.leaky_relu(pre_shift, slope)
        torch.addcmul(shift, h1f, gain, out=out.view(h1f.shape))

        def backward(dt1: Tensor, dh1: Tensor) -> None:
            dt = dt1.flatten(1)
            dh1.view(h1f.shape).addcmul_(dt, gain)
            m = self.num_classes
            for lin, d_pre in (
                (self.scale, dt * h1f * gain * (1 - gain)),  # through the sigmoid
                (self.shift, torch.ops.aten.leaky_relu_backward(dt, pre_shift, slope, False)),
            ):
                if lin.weight.requires_grad:
                    lin.weight.grad = d_pre.new_zeros(m, d_pre.shape[1]) \
                        .index_add_(0, y, d_pre).T.contiguous()
                if lin.bias is not None and lin.bias.requires_grad:
                    lin.bias.grad = d_pre.sum(0)

        return out, backward
