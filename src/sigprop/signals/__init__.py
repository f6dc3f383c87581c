"""Target generators (Sec. III-D), registered by name (``SIGNALS``): one class a file.

    base.py          TargetGenerator (what a generator implements), Feedback
    label.py         label (Eq. 1), one target per class
    label_input.py   label-input (Eq. 10), one per sample
    loop.py          loop-pred (Eq. 11), loop-error (Eq. 12): from the label-free pass
    sparse.py        sparse targets (Sec. III-E): the label projection for block 1's input
    projection.py    t1 = f(S u + d) written out (Eq. 1, 11, 12 share it)
"""

from __future__ import annotations

from ..errors import ConfigError
from ..registry import SIGNALS, SPARSE_SIGNALS
from . import label, label_input, loop, sparse  # noqa: F401  (registration side effects)
from .base import SIGNAL_LEARNED, Feedback, TargetGenerator, TargetsBackward
from .label import LabelProjection
from .label_input import LabelInputModulation
from .loop import ETA, LoopBackError, LoopBackPrediction, check_eta
from .sparse import SparseLabelProjection, default_sparse_size

__all__ = ["ETA", "SIGNAL_LEARNED", "Feedback", "LabelInputModulation", "LabelProjection", "LoopBackError",
           "LoopBackPrediction", "SparseLabelProjection", "TargetGenerator",
           "TargetsBackward", "build_signal", "check_eta", "default_sparse_size"]


def build_signal(
    name: str, num_classes: int, target_shape: tuple[int, ...], learned: bool = True, *,
    targets: str = "dense", **kw
) -> TargetGenerator:
    """The generator ``name`` (``targets="sparse"``: its sparse variant, Sec. III-E)."""
    if targets == "sparse":
        SIGNALS.get(name)  # an unknown name says so first
        if name not in SPARSE_SIGNALS:
            raise ConfigError(f"signal {name!r} has no sparse variant; sparse targets "
                              f"(Sec. III-E) exist for: {', '.join(SPARSE_SIGNALS.names())}")
        return SPARSE_SIGNALS.get(name)(num_classes, target_shape, learned, **kw)
    return SIGNALS.get(name)(num_classes, target_shape, learned, **kw)
