"""Learning rules, registered by name (``RULES``); importing this registers them all."""

from . import backprop, feedback_alignment, local_learning, sigprop, spiking  # noqa: F401  (registration)
from .base import LearningRule, RuleConfig, build_rule, make_adam

__all__ = ["LearningRule", "RuleConfig", "build_rule", "make_adam"]
