"""Eq. 11 and 12, loop-back generators (Fig. 2c): targets from the network's own output
on the same batch (a first, label-free pass), one per sample."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..networks import LEAKY_SLOPE, check_parameter_memory
from ..registry import register_signal
from ..options import Option
from .base import Feedback, TargetGenerator, TargetsBackward, leaky

ETA = Option("eta", float, 1.0,
             "the error step of the loop-error signal, Eq. 12: t1 = f(S (h_L - eta dL/dh_L) "
             "+ d); 0 drops the label from the target", low=0.0, low_open=True)


def check_eta(eta: object) -> float:
    """Eq. 12's error step: a finite number > 0 (0 would drop the label from the target,
    a negative eta move away from it); a ConfigError otherwise."""
    return ETA.check(eta)
from .projection import projection_backward, projection_targets


class _LoopBack(TargetGenerator):
    """t1 = f(proj(u)) with u = ``proj_input(y, fb)`` from the label-free pass."""

    per_sample = True
    needs_feedback = True
    proj: nn.Linear

    def proj_input(self, y: Tensor, fb: Feedback | None) -> Tensor:
        raise NotImplementedError

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        return leaky(self.proj(self.proj_input(y, fb))).view_as(h1)

    def fast_targets(self, h1: Tensor, y: Tensor, fb: Feedback | None, out: Tensor
                     ) -> tuple[Tensor, TargetsBackward]:
        u = self.proj_input(y, fb)
        _, pre = projection_targets(self.proj, u, LEAKY_SLOPE, out)
        return out, lambda dt1, dh1: projection_backward(self.proj, u, pre, LEAKY_SLOPE, dt1)


@register_signal("loop-pred")
class LoopBackPrediction(_LoopBack):
    """Eq. 11: t1 = f(S1 y_L + S1 y* + d1), from the output prediction and the label."""

    def __init__(self, num_classes: int, target_shape, learned: bool = True, **_) -> None:
        super().__init__(num_classes, target_shape, learned)
        self.proj = nn.Linear(num_classes, self.dim)
        self._finish()

    def proj_input(self, y: Tensor, fb: Feedback | None) -> Tensor:
        """y_L + y*, what ``proj`` maps (t1 = f(proj(.)), Eq. 11 = SF.loop_back_prediction)."""
        assert fb is not None
        p = fb.logits.softmax(1)
        return p + F.one_hot(y, self.num_classes).to(p.dtype)

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        assert fb is not None
        # f(S p + S c + d) for every c: S p computed once, S c is column c of S.
        base = F.linear(fb.logits.softmax(1), self.proj.weight, self.proj.bias)  # (n, d)
        t = leaky(base.unsqueeze(1) + self.proj.weight.T.unsqueeze(0))  # (n, m, d)
        return t.view(h1.shape[0], self.num_classes, *self.target_shape)


@register_signal("loop-error")
class LoopBackError(_LoopBack):
    """Eq. 12: t1 = f(S1 (h_L - η dL/dh_L) + d1), the output corrected by its error.

    L is the head's cross-entropy. For a linear head W the error has a closed form,
    dL/dh_L = (softmax(W h_L) - onehot(y)) W, so no autograd pass is needed and every
    candidate label's target is cheap at inference. ``proj`` maps the last block's
    output (d_L values) to the first block's (d_1): d_L x d_1 weights, which on a conv
    net's first block can be large (1024 x 131,072 for VGG8b on 32 px).
    """

    options = _LoopBack.options + (ETA,)

    def __init__(
        self, num_classes: int, target_shape, learned: bool = True, *,
        head: nn.Module | None = None, out_dim: int | None = None, eta: float = 1.0, **_,
    ) -> None:
        super().__init__(num_classes, target_shape, learned)
        if not isinstance(head, nn.Linear) or out_dim is None:
            raise ConfigError("signal 'loop-error' (Eq. 12) needs a linear classification head")
        eta = check_eta(eta)
        check_parameter_memory(out_dim * self.dim + self.dim,
                               f"the loop-error generator ({out_dim} x {self.dim})")
        # A plain reference, not a submodule: the head is owned (saved, trained) elsewhere.
        self.__dict__["_head"] = head
        self.eta = eta
        self.proj = nn.Linear(out_dim, self.dim)
        self._finish()

    def _error(self, fb: Feedback, onehot: Tensor) -> Tensor:
        w = self._head.weight.detach()
        return (fb.logits.softmax(-1) - onehot) @ w  # (..., d_L)

    def proj_input(self, y: Tensor, fb: Feedback | None) -> Tensor:
        """h_L - η dL/dh_L, what ``proj`` maps (t1 = f(proj(.)), Eq. 12 =
        SF.loop_back_error)."""
        assert fb is not None
        onehot = F.one_hot(y, self.num_classes).to(fb.h_out.dtype)
        return fb.h_out - self.eta * self._error(fb, onehot)

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        assert fb is not None
        n, m = h1.shape[0], self.num_classes
        probs = fb.logits.softmax(-1).unsqueeze(1)  # (n, 1, m)
        err = (probs - self._eye(h1).unsqueeze(0)) @ self._head.weight.detach()  # (n, m, d_L)
        t = leaky(F.linear(fb.h_out.unsqueeze(1) - self.eta * err, self.proj.weight,
                           self.proj.bias))
        return t.view(n, m, *self.target_shape)
