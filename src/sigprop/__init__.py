"""sigprop: learning in a forward pass (signal propagation) and its baselines.

What a rule's, network's or generator's author needs is importable from here
(docs/EXTENDING.md); plugins from other packages load with :func:`load_plugins`.
"""

__version__ = "0.1.0"

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    SigpropError,
    TrainingError,
)
from .networks import Network, build_network
from .options import Option, Options
from .registry import (
    DATASETS,
    NETWORKS,
    RULES,
    SIGNALS,
    register_dataset,
    register_network,
    register_rule,
    register_signal,
)
from .rules import (
    LearningRule,
    RuleConfig,
    build_rule,
    load_plugins,
    make_adam,
    make_grouped_adam,
)
from .signals import TargetGenerator, build_signal

__all__ = [
    "__version__",
    "SigpropError", "ConfigError", "DataError", "TrainingError", "CheckpointError",
    "InputError",
    "Network", "build_network", "LearningRule", "RuleConfig", "build_rule", "make_adam",
    "make_grouped_adam", "Option", "Options",
    "TargetGenerator", "build_signal", "RULES", "NETWORKS", "DATASETS", "SIGNALS",
    "register_rule", "register_network", "register_signal", "register_dataset",
    "load_plugins",
]
