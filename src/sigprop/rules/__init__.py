"""Learning rules, registered by name (``RULES``); importing this registers them all.

A rule is one class in one file with ``@register_rule("name")`` and its own options
(``options = (Option(...), ...)``, :mod:`sigprop.options`); docs/EXTENDING.md.
"""

from .. import registry
from ..errors import ConfigError
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
           "check_registered", "declared_options", "load_plugins", "make_adam",
           "make_grouped_adam"]


def check_registered() -> None:
    """What is registered fits together: every rule implements its step and scores, and
    no option name is declared twice with different meanings; else a ConfigError."""
    for name, cls in registry.RULES.items():
        if isinstance(cls, type) and issubclass(cls, LearningRule):
            missing = [m for m in ("_train_step", "_exit_scores")
                       if getattr(cls, m) is getattr(LearningRule, m)]
            if missing:
                raise ConfigError(f"rule {name!r} does not implement {' and '.join(missing)}")
    try:
        declared_options()
    except TypeError as err:
        raise ConfigError(str(err)) from None


def load_plugins() -> dict[str, str]:
    """:func:`sigprop.registry.load_plugins`, each plugin's registrations checked
    (:func:`check_registered`) as it loads, so that an error names the plugin."""
    return registry.load_plugins(check_registered)
