"""One stage process of a staged run: where it sits in the job, how long it waits for
its peers, and which part of the rule it keeps."""

from __future__ import annotations

import os

from ..errors import ConfigError


# below a second the process group's own setup times out; above a week, a hung stage
# is never given up (and torch's timedelta overflows at 1e300)
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 7 * 24 * 3600.0


def timeout_s() -> float:
    """How long a stage waits for any one message or collective before it gives up
    (``SIGPROP_STAGE_TIMEOUT``, default 300 s). A stage that dies is noticed at once
    (its sockets close); this bounds a stage that hangs."""
    text = os.environ.get("SIGPROP_STAGE_TIMEOUT", "300")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:  # NaN fails too
        raise ConfigError(f"SIGPROP_STAGE_TIMEOUT must be a number of seconds from "
                          f"{MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}, got {text!r}; set another "
                          "or unset it (default 300)")
    return value


class StageEnv:
    """Where this process sits: rank, world size, and the local process count (for
    threads), from torchrun's environment or sigprop's own launcher's."""

    def __init__(self) -> None:
        try:
            self.rank = int(os.environ["RANK"])
            self.world = int(os.environ["WORLD_SIZE"])
            self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        except (KeyError, ValueError):
            raise ConfigError("a stage process needs RANK and WORLD_SIZE in its environment "
                              "(torchrun sets them; or let `sigprop train --stages S` start "
                              "the stages)") from None
        self.ours = os.environ.get("SIGPROP_LAUNCHER") == "1"  # started by launch.py


def stage_threads(cfg, processes: int) -> int:
    """Intra-op threads of each stage process: ``--stage-threads``, else this machine's
    cores shared among its ``processes``."""
    return cfg.train.stage_threads or max(1, (os.cpu_count() or 1) // processes)


def in_distributed_env() -> bool:
    """Whether this process was started as one rank of a job (torchrun, our launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def release_unowned(rule, start: int, stop: int) -> int:
    """Free the parameters and buffers of the blocks a stage does not run (and the
    signal's after the first stage): every process builds the whole rule from the seed,
    so that its own blocks start as in one process, then keeps only what it trains.
    The released tensors become empty; they are never read (their state entries are
    not this stage's part). Returns the values freed."""
    freed = 0
    drop = [b for i, b in enumerate(rule.network.blocks) if not start <= i < stop]
    if start > 0:
        drop.append(rule.signal)
    for module in drop:
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and p.numel():
                    freed += p.numel()
                    p.data = p.data.new_empty(0)
            for name, b in m._buffers.items():
                if b is not None and b.numel():
                    freed += b.numel()
                    m._buffers[name] = b.new_empty(0)
    return freed
