"""What ``--resume`` may change in a run's configuration: where and how the run computes,
never what it computes (and the rule options declared ``resumable``).

Everything else is the run's identity; changing it needs a new run folder.
:func:`resume_changes` checks a resume (the engine's run start), :func:`config_changes`
and :func:`resumable` tell a reproduction whether a finished run serves another plan.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..rules.config import declared_options
from .config import Config

RESUMABLE_SECTIONS = (
    "train.epochs",  # a longer run: the schedule follows the new total from the next epoch
    "train.device", "train.progress", "train.check_every", "train.run_dir",
    "train.layout",  # how the maps lie in memory: the same updates up to rounding
    "data.data_dir",  # the same files elsewhere (their checksums are compared)
    "data.eval_batch_size",  # evaluation is per sample
    # where the blocks run: the same updates (sigprop.parallel)
    "train.stages", "train.split", "train.split_by", "train.stage_threads",
)


def resumable() -> tuple[str, ...]:
    """Every ``section.key`` that ``--resume`` may change."""
    return RESUMABLE_SECTIONS + tuple(f"rule.{o.name}" for o in declared_options().values()
                                      if o.resumable)


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old, new)}`` for every value that differs."""
    a, b = old.to_dict(), new.to_dict()
    keys = {s: list(dict.fromkeys([*a[s], *b[s]])) for s in a}
    return {f"{s}.{k}": (a[s].get(k), b[s].get(k)) for s in a for k in keys[s]
            if a[s].get(k) != b[s].get(k)}


def resume_changes(recorded: Config, requested: Config, epochs_done: int
                   ) -> dict[str, tuple[Any, Any]]:
    """The changes a resume makes to a run that finished ``epochs_done`` epochs; a
    ConfigError if any of them is not one resume may make (:func:`resumable`)."""
    changes = config_changes(recorded, requested)
    allowed = resumable()
    fixed = {k: v for k, v in changes.items() if k not in allowed}
    if fixed:
        listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in fixed.items())
        raise ConfigError(
            f"--resume continues a run as it was configured, but these settings differ from "
            f"the run's: {listed}; drop them, or start a new run in another --run-dir "
            f"(resume may change only {', '.join(allowed)})")
    if requested.train.epochs < epochs_done:
        raise ConfigError(
            f"train.epochs {requested.train.epochs} is fewer than the {epochs_done} epochs this "
            f"run has trained; resume can only extend a run (evaluate it with `sigprop eval`)")
    return changes
