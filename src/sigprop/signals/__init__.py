"""Target generators (Sec. III-D), registered by name (``SIGNALS``): one class a file.

    base.py          TargetGenerator (what a generator implements), Feedback
    label.py         label (Eq. 1), one target per class
    label_input.py   label-input (Eq. 10), one per sample
    loop.py          loop-pred (Eq. 11), loop-error (Eq. 12): from the label-free pass
    projection.py    t1 = f(S u + d) written out (Eq. 1, 11, 12 share it)
"""

from __future__ import annotations

from ..registry import SIGNALS
from . import label, label_input, loop  # noqa: F401  (registration side effects)
from .base import Feedback, TargetGenerator, TargetsBackward, check_eta
from .label import LabelProjection
from .label_input import LabelInputModulation
from .loop import LoopBackError, LoopBackPrediction

__all__ = ["Feedback", "LabelInputModulation", "LabelProjection", "LoopBackError",
           "LoopBackPrediction", "TargetGenerator", "TargetsBackward", "build_signal",
           "check_eta"]


def build_signal(
    name: str, num_classes: int, target_shape: tuple[int, ...], learned: bool = True, **kw
) -> TargetGenerator:
    return SIGNALS.get(name)(num_classes, target_shape, learned, **kw)
