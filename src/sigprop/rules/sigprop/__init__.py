"""Signal propagation (Sec. III), the rule ``sigprop`` and its machinery.

    rule.py       Sigprop: build, dispatch, the autograd step (the reference), the staged
                  API of sigprop.parallel, the head
    options.py    its options (``rule.opts.<name>``) and the checks between them
    travel.py     how targets go through a block: OUTPUT, ROWS, WINDOW, FIELD, each with
                  its forward, its exit forward and its written-out step
    fast_step.py  the written-out sweep, in sequence or pipelined, and its planning
    exits.py      the early exits without labels, prototypes, target shapes
    fastpath.py   one standard block's forward and gradients, written out
    sparse.py     windows and fields: how sparse targets pass conv blocks (Sec. III-E)
    pipeline.py   the update thread: block updates beside the forward sweep
"""

from .exits import PROTOTYPE_MOMENTUM, Prototypes
from .fast_step import PIPELINE_MIN_WEIGHTS
from .options import (
    BN_STATS,
    EXIT_TARGETS,
    FAST_PATH,
    HEAD,
    LOGIT_SCALE,
    LOSS,
    OPTIONS,
    PIPELINE,
    SIGNAL,
    SPARSE_GRID,
    SPARSE_SIZE,
    TARGET_DROPOUT,
    TARGETS,
)
from .rule import Sigprop

__all__ = ["BN_STATS", "EXIT_TARGETS", "FAST_PATH", "HEAD", "LOGIT_SCALE", "LOSS", "OPTIONS",
           "PIPELINE", "PIPELINE_MIN_WEIGHTS", "PROTOTYPE_MOMENTUM", "SIGNAL", "SPARSE_GRID",
           "SPARSE_SIZE", "TARGETS", "TARGET_DROPOUT", "Prototypes", "Sigprop"]
