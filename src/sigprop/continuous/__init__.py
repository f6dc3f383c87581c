"""Continuous-time models whose dynamics are not a stack of blocks: layered continuous
Hopfield networks trained by equilibrium propagation, with sigprop's loop-back
(``ep-loopback``, Sec. V, Fig. 2c) or with symmetric feedback (``ep-symmetric``,
Scellier & Bengio 2017). Importing this registers the rules."""

from . import rules  # noqa: F401  (registration side effects)
from .rules import EPLoopback, EPSymmetric, EquilibriumPropagation

__all__ = ["EPLoopback", "EPSymmetric", "EquilibriumPropagation"]
