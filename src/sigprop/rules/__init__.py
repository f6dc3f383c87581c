"""Learning rules, registered by name (``RULES``); importing this registers them all."""

from . import backprop, sigprop  # noqa: F401  (registration side effects)
from .base import LearningRule, RuleConfig, build_rule, make_adam

__all__ = ["LearningRule", "RuleConfig", "build_rule", "make_adam"]
