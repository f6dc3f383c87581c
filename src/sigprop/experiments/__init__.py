"""The paper's tables as experiments: run them (``reproduce``), report them beside the
paper's numbers (``write_report``), and draw runs (``plots``).

    exp = load_experiment("table6-fmnist")       # or a path to an experiment .toml
    reproduce(exp, "quick", Path("runs/table6"))  # trains what is not finished, then reports
"""

from .read import builtin_names, load_experiment, parse_experiment
from .report import write_report
from .reproduce import reproduce
from .spec import BUDGETS, Experiment

__all__ = ["BUDGETS", "Experiment", "builtin_names", "load_experiment", "parse_experiment",
           "reproduce", "write_report"]
