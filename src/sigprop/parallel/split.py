"""Which blocks each stage runs: by hand (``--split 2,1``) or balanced by counted cost.

A block's cost per training step is counted, not timed, so that every process of a
job (and a user predicting a bigger one) gets the same answer without running
anything: ``4 * rows * MACs`` (the forward product and the weight gradient, 2 FLOPs a
multiply-add each; sigprop computes no input gradient) plus ``BYTE_FLOPS * 32`` per
parameter (Adam reads the parameter, its gradient and two moments and writes three:
~32 bytes, priced in FLOPs at this CPU's ratio of matmul rate to memory bandwidth).
The signal's parameters count with the first stage, the classifier head with the last.
The split minimises the most expensive stage (the pipeline's pace) over every way of
cutting the blocks into contiguous, non-empty stages.
"""

from __future__ import annotations

import math

from torch import nn

from ..engine.stagespec import parse_split, stage_count
from ..errors import ConfigError
from .replicas import check_shards

# FLOPs one byte of memory traffic costs as much time as: the benchmark machine's float32
# matmul rate over its streaming bandwidth per core (~100 GFLOP/s / ~12 GB/s;
# docs/studies/layer-parallel.md)
BYTE_FLOPS = 8.0
ADAM_BYTES = 32


def _macs(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Multiply-adds per sample of a block's weight layers (Linear; Conv2d, whose output
    size follows from the block's input ``(C, H, W)``, its first op)."""
    total = 0
    h, w = in_shape[-2:] if len(in_shape) == 3 else (1, 1)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d):
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
                m.kernel_size, m.stride, m.padding, m.dilation)
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            total += m.in_channels // m.groups * kh * kw * m.out_channels * h * w
    return total


def block_costs(network, target_rows: int, batch: int) -> list[float]:
    """Counted cost of each block's training step (module docstring) for a batch of
    ``batch`` samples and ``target_rows`` target rows."""
    rows = batch + target_rows
    costs = []
    inputs = [tuple(network.input_shape), *map(tuple, network.block_shapes[:-1])]
    for block, shape in zip(network.blocks, inputs):
        params = sum(p.numel() for p in block.parameters() if p.requires_grad)
        costs.append(4.0 * rows * _macs(block, shape) + BYTE_FLOPS * ADAM_BYTES * params)
    return costs


def head_cost(network, batch: int) -> float:
    params = sum(p.numel() for p in network.head.parameters() if p.requires_grad)
    return 6.0 * batch * params + BYTE_FLOPS * ADAM_BYTES * params


def balanced_split(costs: list[float], stages: int, last_extra: float = 0.0,
                   first_extra: float = 0.0) -> list[int]:
    """Blocks per stage minimising the most expensive stage (ties: the earliest cut),
    contiguous and non-empty; ``first_extra`` / ``last_extra`` are the signal's and the
    head's costs, carried by the first and the last stage."""
    n = len(costs)
    check_stages(stages, n)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, k: int) -> float:  # blocks a..b-1 as stage k
        extra = (first_extra if k == 0 else 0.0) + (last_extra if k == stages - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # best[k][b]: (the most expensive stage, cuts) for blocks 0..b-1 in stages 0..k
    inf = math.inf
    best = [[(inf, ())] * (n + 1) for _ in range(stages)]
    for b in range(1, n + 1):
        best[0][b] = (cost(0, b, 0), (b,))
    for k in range(1, stages):
        for b in range(k + 1, n + 1):
            options = []
            for a in range(k, b):
                prev, cuts = best[k - 1][a]
                options.append((max(prev, cost(a, b, k)), cuts + (b,)))
            best[k][b] = min(options, key=lambda o: o[0])
    ends = best[stages - 1][n][1]
    return [b - a for a, b in zip((0, *ends[:-1]), ends)]


def check_stages(stages: int, blocks: int) -> None:
    if stages < 1:
        raise ConfigError(f"train.stages must be a positive integer, got {stages}")
    if stages > blocks:
        raise ConfigError(f"{stages} stages but the network has {blocks} blocks; every stage "
                          f"needs at least one block: use --stages {blocks} or fewer")


def resolve_split(network, stages: int, split: str | None, target_rows: int,
                  batch: int) -> list[int]:
    """Blocks per stage: ``split`` checked against the network, else balanced."""
    n = len(network.blocks)
    if split is not None:
        sizes = parse_split(split)
        if sum(sizes) != n:
            raise ConfigError(f"train.split {split!r} covers {sum(sizes)} blocks but the network "
                              f"has {n}; give blocks per stage that add up to {n}")
        return sizes
    check_stages(stages, n)
    return balanced_split(block_costs(network, target_rows, batch), stages,
                          last_extra=head_cost(network, batch))


def stage_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """[2, 1] -> [(0, 2), (2, 3)]: each stage's blocks as start, stop."""
    out, a = [], 0
    for k in sizes:
        out.append((a, a + k))
        a += k
    return out


def plan_split(rule, cfg) -> list[int]:
    """Blocks per stage of a run's rule, after checking that it can be staged at all
    (sigprop, a generator that allows it); the launcher calls it before any process
    starts, each stage again with the rule it built."""
    flags = "--stages/--split/--replicas"
    if not hasattr(rule, "stage_step"):
        raise ConfigError(f"{flags} train sigprop (each block learns from what arrives from "
                          f"below); rule {cfg.rule.name!r} is not split into stages: drop "
                          f"{flags}")
    why = rule.staging_unsupported()
    if why is not None:
        raise ConfigError(f"{flags}: {why}")
    replicas = cfg.train.replicas
    err = check_shards(replicas, [cfg.data.batch_size], [cfg.data.eval_batch_size])
    if err is not None:  # the full batches; the stages check the last ones too
        raise err
    if replicas > 1 and cfg.rule.resolved().get("pipeline") == "on":
        raise ConfigError("--replicas all-reduces every gradient of a step before its one "
                          "Adam step, so updates cannot overlap the forward on a second "
                          "thread: use --pipeline auto or off with --replicas")
    batch = cfg.data.batch_size
    return resolve_split(rule.network, stage_count(cfg.train.stages, cfg.train.split),
                         cfg.train.split, rule.stage_rows(batch, True), batch)


def check_devices(cfg, processes: int) -> None:
    """On CUDA every process of this machine needs a device of its own (NCCL refuses
    two ranks on one)."""
    import torch

    if not cfg.train.device.startswith("cuda") or not torch.cuda.is_available():
        return  # a missing CUDA is the device check's to report
    have = torch.cuda.device_count()
    if processes > have:
        raise ConfigError(f"{processes} stage processes on this machine but {have} CUDA "
                          f"device(s): NCCL needs one device per process; use fewer "
                          f"--stages/--replicas per machine (torchrun --nproc-per-node "
                          f"{have} or fewer) or --device cpu")
