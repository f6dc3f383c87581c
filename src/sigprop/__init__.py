"""sigprop: learning in a forward pass (signal propagation) and its baselines."""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, SigpropError, TrainingError
from .networks import Network, build_network
from .registry import DATASETS, NETWORKS, RULES, SIGNALS
from .rules import LearningRule, RuleConfig, build_rule
from .signals import TargetGenerator, build_signal
from . import continuous  # noqa: E402,F401  (registers ep-loopback, ep-symmetric)

__all__ = [
    "__version__",
    "SigpropError", "ConfigError", "DataError", "TrainingError", "CheckpointError",
    "Network", "build_network", "LearningRule", "RuleConfig", "build_rule",
    "TargetGenerator", "build_signal", "RULES", "NETWORKS", "DATASETS", "SIGNALS",
]
