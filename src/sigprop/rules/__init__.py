"""Learning rules, registered by name (``RULES``); importing this registers them all.

A rule is one class in one file with ``@register_rule("name")`` and its own options
(``options = (Option(...), ...)``, :mod:`sigprop.options`); docs/EXTENDING.md.
"""

from . import (  # noqa: F401  (registration)
    backprop,
    drtp,
    equilibrium,
    feedback_alignment,
    ff,
    forward_grad,
    local_learning,
    pepita,
    sigprop,
    spiking,
)
from .base import LearningRule, build_rule, make_adam, make_grouped_adam
from .config import SHARED, SPIKE_THRESHOLD, RuleConfig, declared_options

__all__ = ["SHARED", "SPIKE_THRESHOLD", "LearningRule", "RuleConfig", "build_rule",
           "declared_options", "make_adam", "make_grouped_adam"]
