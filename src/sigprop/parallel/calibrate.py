"""Each block's measured training step: the calibration that a staged run's split
balances by default (``--split-by measured``; :func:`.split.settle_plan`).

What is timed is the rule's own staged step (:meth:`Sigprop.stage_step`) of one block
at a time, as a one-block stage would run it: block 1 with the target signal (the
first stage's), the last block with the classifier head (the last stage's), every
block with its update (the pipelined updates awaited) and the rows it hands on. It runs
on a throwaway copy of the run's rule (built from the seed, then discarded; the global
random streams are restored), on a synthetic batch of the run's batch size (one
replica's share with ``--replicas``), on the run's device and with the stage processes'
intra-op thread count. One untimed pass makes each block's input rows (and warms the
kernels up); then ``repeats`` timed passes visit the blocks in an order that rotates
between passes, so that a machine whose speed drifts (other jobs, frequency changes)
slows every block alike; each block's cost is the median of its repeats. The repeats
fit a time budget: at least ``MIN_REPEATS``, at most ``MAX_REPEATS``.

A one-block step also pays what a stage pays once per batch (the batch checks, zeroing
the gradients, the optimizer's walk over its parameters, the rows sent on): a few tens
of microseconds, which a block's share slightly overstates for very small blocks.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ..engine.config import Config
from ..engine.trainer import build_config_rule
from .transport import shard

MIN_REPEATS = 3
MAX_REPEATS = 9
BUDGET_S = 2.0  # timed passes after the first, as far as MIN_REPEATS allows


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """The clock a calibration on ``device`` reads, and its name for the records: on a
    CPU this process's CPU time (every thread's; what other jobs on a loaded machine
    take from it between two reads is not counted), on CUDA the wall clock (the
    device awaited at every read)."""
    if device.type == "cuda":
        return time.perf_counter, "wall"
    return time.process_time, "process cpu"


def time_blocks(rule, batch: int, device: torch.device, *, max_repeats: int = MAX_REPEATS,
                budget_s: float = BUDGET_S,
                clock: Callable[[], float] | None = None) -> tuple[list[float], int]:
    """(Each block's median step time in seconds, the timed passes) of ``rule``'s staged
    step on a synthetic batch of ``batch`` samples (module docstring). The rule trains
    on it: pass one that is thrown away afterwards."""
    clock = clock or default_clock(device)[0]
    net = rule.network
    blocks = len(net.blocks)
    dtype = next(net.parameters()).dtype
    x = torch.randn(batch, *net.input_shape, device=device, dtype=dtype)
    y = torch.arange(batch, device=device) % rule.num_classes  # every class present
    rule.set_training(True)

    def step(i: int, z: torch.Tensor) -> torch.Tensor | None:
        out = rule.stage_step(z, y, i, i + 1)[2]
        rule.sync()  # the block's updates, pipelined or not, belong to its cost
        _wait(device)
        return out

    inputs = [x]
    start = clock()
    for i in range(blocks - 1):  # untimed: each block's input rows, kernels warmed up
        inputs.append(step(i, inputs[i].clone() if i else x).clone())
    step(blocks - 1, inputs[-1].clone() if blocks > 1 else x)
    first = clock() - start
    repeats = max(MIN_REPEATS, min(max_repeats, int(budget_s / max(first, 1e-9))))
    times: list[list[float]] = [[] for _ in range(blocks)]
    for r in range(repeats):
        for k in range(blocks):
            i = (k + r) % blocks  # the order rotates between passes
            z = inputs[i].clone() if i else x
            _wait(device)
            t = clock()
            step(i, z)
            times[i].append(clock() - t)
    return [statistics.median(t) for t in times], repeats


def measure_split_costs(cfg: Config, threads: int, device: torch.device
                        ) -> tuple[list[float], dict]:
    """Each block's measured step time in milliseconds for ``cfg``'s run (module
    docstring), and how it was measured (batch, threads, device, repeats) for the
    run's records."""
    batch = max(1, shard(cfg.data.batch_size, cfg.train.replicas, 0)[1])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    saved = torch.get_num_threads()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.set_num_threads(threads)
            rule = build_config_rule(cfg, device)
            if cfg.train.replicas > 1:  # as in a replica: no update thread (sigprop's rule)
                rule.grad_reduce = lambda grads: None
            seconds, repeats = time_blocks(rule, batch, device)
            del rule
    finally:
        torch.set_num_threads(saved)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return [1e3 * s for s in seconds], {"batch": batch, "threads": threads,
                                        "device": str(device), "repeats": repeats,
                                        "clock": default_clock(device)[1]}
