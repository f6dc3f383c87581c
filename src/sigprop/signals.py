"""Target generators (Sec. III-D): the learning signal -> the first layer's target.

Every generator maps to the *first block's output* (Eq. 1): ``h1 = block1(x)`` and
``t1 = generator(...)`` have the same per-row shape, and layer 1's loss
``L(h1, t1)`` trains block 1 and the generator together.

Two kinds:
* per class (``per_sample = False``): ``targets(h1, y, fb)`` is ``(m, *D)``, one
  row per class, independent of the batch (Eq. 1);
* per sample (``per_sample = True``): ``(n, *D)``, one row per sample, built from
  that sample's label and its input or the network's output (Eq. 10-12). For
  inference without labels, ``candidates(h1, fb)`` gives ``(n, m, *D)``: the
  target each sample would get under each candidate class.

Loop-back generators read ``Feedback``: the network's output on the same batch
from a first, gradient-free pass (Fig. 2c). They need a classification head.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as SF
from .errors import ConfigError
from .networks import LEAKY_SLOPE
from .registry import SIGNALS, register_signal


@dataclass
class Feedback:
    """Output of a label-free pass: last hidden output and the head's logits."""

    h_out: Tensor  # (n, d_L)
    logits: Tensor  # (n, classes)


def _leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class TargetGenerator(nn.Module):
    per_sample: ClassVar[bool] = False
    needs_feedback: ClassVar[bool] = False

    def __init__(self, num_classes: int, target_shape: tuple[int, ...], learned: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.target_shape = tuple(target_shape)
        self.learned = learned

    def _finish(self) -> None:
        if not self.learned:  # fixed generator: a random projection that never moves
            self.requires_grad_(False)

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        raise NotImplementedError

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        """(n, m, *D): the target of every sample under every class (per-sample only)."""
        raise NotImplementedError

    def _eye(self, like: Tensor) -> Tensor:
        return torch.eye(self.num_classes, device=like.device, dtype=like.dtype)


@register_signal("label")
class LabelProjection(TargetGenerator):
    """Eq. 1: t1 = f(S1 c_m + d1) for each class one-hot c_m; one target per class."""

    def __init__(self, num_classes: int, target_shape, learned: bool = True, **_) -> None:
        super().__init__(num_classes, target_shape, learned)
        self.proj = nn.Linear(num_classes, math.prod(target_shape))
        self._finish()

    def targets(self, h1: Tensor, y: Tensor | None = None, fb: Feedback | None = None) -> Tensor:
        t = SF.label_projection(self._eye(h1), self.proj.weight, self.proj.bias, _leaky)
        return t.view(self.num_classes, *self.target_shape)  # (m, *D)


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
        d = math.prod(target_shape)
        self.scale = nn.Linear(num_classes, d)
        self.shift = nn.Linear(num_classes, d)
        self._finish()

    def _modulate(self, h1_flat: Tensor, c: Tensor) -> Tensor:
        return SF.label_input_modulation(
            h1_flat, c, self.scale.weight, self.scale.bias, self.shift.weight, self.shift.bias,
            torch.sigmoid, _leaky,
        )

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        c = F.one_hot(y, self.num_classes).to(h1.dtype)
        return self._modulate(h1.flatten(1), c).view_as(h1)  # (n, *D)

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        t = self._modulate(h1.flatten(1).unsqueeze(1), self._eye(h1))  # (n, m, d)
        return t.view(h1.shape[0], self.num_classes, *self.target_shape)


@register_signal("loop-pred")
class LoopBackPrediction(TargetGenerator):
    """Eq. 11: t1 = f(S1 y_L + S1 y* + d1), from the output prediction and the label."""

    per_sample = True
    needs_feedback = True

    def __init__(self, num_classes: int, target_shape, learned: bool = True, **_) -> None:
        super().__init__(num_classes, target_shape, learned)
        self.proj = nn.Linear(num_classes, math.prod(target_shape))
        self._finish()

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        return _leaky(self.proj(self.proj_input(y, fb))).view_as(h1)

    def proj_input(self, y: Tensor, fb: Feedback | None) -> Tensor:
        """y_L + y*, what ``proj`` maps (t1 = f(proj(.)), Eq. 11 = SF.loop_back_prediction)."""
        assert fb is not None
        p = fb.logits.softmax(1)
        return p + F.one_hot(y, self.num_classes).to(p.dtype)

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        assert fb is not None
        # f(S p + S c + d) for every c: S p computed once, S c is column c of S.
        base = F.linear(fb.logits.softmax(1), self.proj.weight, self.proj.bias)  # (n, d)
        t = _leaky(base.unsqueeze(1) + self.proj.weight.T.unsqueeze(0))  # (n, m, d)
        return t.view(h1.shape[0], self.num_classes, *self.target_shape)


@register_signal("loop-error")
class LoopBackError(TargetGenerator):
    """Eq. 12: t1 = f(S1 (h_L - η dL/dh_L) + d1), the output corrected by its error.

    L is the head's cross-entropy. For a linear head W the error has a closed form,
    dL/dh_L = (softmax(W h_L) - onehot(y)) W, so no autograd pass is needed and every
    candidate label's target is cheap at inference.
    """

    per_sample = True
    needs_feedback = True

    def __init__(
        self, num_classes: int, target_shape, learned: bool = True, *,
        head: nn.Module | None = None, out_dim: int | None = None, eta: float = 1.0, **_,
    ) -> None:
        super().__init__(num_classes, target_shape, learned)
        if not isinstance(head, nn.Linear) or out_dim is None:
            raise ConfigError("signal 'loop-error' (Eq. 12) needs a linear classification head")
        check_eta(eta)
        # A plain reference, not a submodule: the head is owned (saved, trained) elsewhere.
        self.__dict__["_head"] = head
        self.eta = eta
        self.proj = nn.Linear(out_dim, math.prod(target_shape))
        self._finish()

    def _error(self, fb: Feedback, onehot: Tensor) -> Tensor:
        w = self._head.weight.detach()
        return (fb.logits.softmax(-1) - onehot) @ w  # (..., d_L)

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        return _leaky(self.proj(self.proj_input(y, fb))).view_as(h1)

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
        t = _leaky(F.linear(fb.h_out.unsqueeze(1) - self.eta * err, self.proj.weight, self.proj.bias))
        return t.view(n, m, *self.target_shape)


def check_eta(eta: object) -> None:
    """Eq. 12's error step must be a finite number > 0: the target is built from the
    output moved by -eta times its loss gradient, towards the label; eta = 0 drops the
    label from the target, a negative eta moves away from it, NaN or inf poisons it."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (
            math.isfinite(eta) and eta > 0):
        raise ConfigError(
            f"eta (the error step of the loop-error signal, Eq. 12) must be a finite number "
            f"> 0, got {eta!r}; 1.0 is the default")


def build_signal(
    name: str, num_classes: int, target_shape: tuple[int, ...], learned: bool = True, **kw
) -> TargetGenerator:
    return SIGNALS.get(name)(num_classes, target_shape, learned, **kw)
