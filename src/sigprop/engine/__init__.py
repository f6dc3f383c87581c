"""Running a configured experiment: the config, the training loop, the run folder and its
state, evaluation of a trained run, and the benchmark of rules side by side."""

from .trainer import load_trained

__all__ = ["load_trained"]
