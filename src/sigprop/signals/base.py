"""What every target generator is (Sec. III-D): the learning signal -> the first
layer's target, with the pieces a rule needs to train it.

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

A generator may also write out its own step for sigprop's fast path
(:meth:`TargetGenerator.fast_targets`: its forward without autograd, and a function
that writes its gradients). A new generator is one class in one file of this package
and a ``@register_signal`` line; without ``fast_targets`` it trains through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks import LEAKY_SLOPE
from ..options import Option

# (dL/dt1, dL/dh1) -> None: writes the generator's gradients; a generator whose t1
# depends on h1 (Eq. 10) also adds its term to dL/dh1 in place
TargetsBackward = Callable[[Tensor, Tensor], None]


@dataclass
class Feedback:
    """Output of a label-free pass: last hidden output and the head's logits."""

    h_out: Tensor  # (n, d_L)
    logits: Tensor  # (n, classes)


def leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


# every generator: fixed (a random projection that never moves) or learned from L_1
SIGNAL_LEARNED = Option("signal_learned", bool, True,
                        "whether the target generator learns (false: a fixed random projection)",
                        switch=("--signal-fixed", False))


class TargetGenerator(nn.Module):
    # options a rule passes to the generator (sigprop.options); a subclass adds its own
    options: ClassVar[tuple[Option, ...]] = (SIGNAL_LEARNED,)
    per_sample: ClassVar[bool] = False
    needs_feedback: ClassVar[bool] = False
    # targets for block 1's *input* (sparse targets, Sec. III-E), which block 1 then
    # takes with the inputs; otherwise targets of block 1's output (Eq. 1)
    at_input: ClassVar[bool] = False

    def __init__(self, num_classes: int, target_shape: tuple[int, ...], learned: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.target_shape = tuple(target_shape)
        self.learned = learned

    def _finish(self) -> None:
        if not self.learned:  # fixed generator: a random projection that never moves
            self.requires_grad_(False)

    @property
    def dim(self) -> int:
        """Values per target row."""
        return math.prod(self.target_shape)

    def targets(self, h1: Tensor, y: Tensor, fb: Feedback | None = None) -> Tensor:
        raise NotImplementedError

    def candidates(self, h1: Tensor, fb: Feedback | None = None) -> Tensor:
        """(n, m, *D): the target of every sample under every class (per-sample only)."""
        raise NotImplementedError

    def fast_targets(self, h1: Tensor, y: Tensor, fb: Feedback | None, out: Tensor
                     ) -> tuple[Tensor, TargetsBackward]:
        """The fast path's targets, without autograd: t1 written into ``out`` ((rows,
        *D): m rows per class or n per sample), and the function that sets the
        generator's gradients from dL/dt1 (:data:`TargetsBackward`). Same numbers as
        :meth:`targets` and its autograd gradients (tests/test_fastpath.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no written-out step")

    @property
    def has_fast_path(self) -> bool:
        """Whether :meth:`fast_targets` computes what :meth:`targets` does: both
        written by the same class (a subclass that changes ``targets`` alone does not
        inherit a written-out step that no longer matches)."""
        cls = type(self)
        return (_defined_in(cls, "fast_targets") is _defined_in(cls, "targets")
                and _defined_in(cls, "targets") is not TargetGenerator)

    def _eye(self, like: Tensor) -> Tensor:
        return torch.eye(self.num_classes, device=like.device, dtype=like.dtype)


def _defined_in(cls: type, name: str) -> type:
    return next(k for k in cls.__mro__ if name in k.__dict__)
