"""Which blocks each stage runs: by hand (``--split 2,1``), or balanced by each block's
measured step time (``--split-by measured``, the default: :mod:`.calibrate`) or by its
counted cost (``--split-by counted``, and the fallback where timing cannot run).

The split is decided once per job (:func:`settle_plan`: sigprop's launcher, or rank 0
under torchrun) and handed to every stage process, which never times or balances
anything itself, so no two processes can disagree; the plan is recorded in the run's
config.json (``stage_plan``) and a resumed run keeps it.

The counted cost needs no run (a user can predict a bigger job with it), but it prices
memory traffic at one machine's ratio and misses what is not arithmetic, so uneven
blocks (a conv block's layout work, the head, the signal) can end up in unbalanced
stages; the measured time sees them. A block's counted cost per training step:
``4 * rows * MACs`` (the forward product and the weight gradient, 2 FLOPs a
multiply-add each; sigprop computes no input gradient) plus ``BYTE_FLOPS * 32`` per
parameter (Adam reads the parameter, its gradient and two moments and writes three:
~32 bytes, priced in FLOPs at this CPU's ratio of matmul rate to memory bandwidth).
The signal's parameters count with the first stage, the classifier head with the last.
The split minimises the most expensive stage (the pipeline's pace) over every way of
cutting the blocks into contiguous, non-empty stages.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from ..engine import runio
from ..engine.interrupt import one_line
from ..engine.stagespec import parse_split, stage_count
from ..errors import ConfigError
from . import calibrate
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
    """Blocks per stage: ``split`` checked against the network, else balanced by counted
    cost."""
    if split is not None:
        return fit_split(split, network)
    check_stages(stages, len(network.blocks))
    return balanced_split(block_costs(network, target_rows, batch), stages,
                          last_extra=head_cost(network, batch))


def stage_ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """[2, 1] -> [(0, 2), (2, 3)]: each stage's blocks as start, stop."""
    out, a = [], 0
    for k in sizes:
        out.append((a, a + k))
        a += k
    return out


def check_staging(rule, cfg) -> int:
    """Check that a run's rule can be staged at all (sigprop, a generator that allows
    it) and that its stages fit the network; the number of stages. The launcher calls
    it before any process starts, each stage again with the rule it built."""
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
    stages = stage_count(cfg.train.stages, cfg.train.split)
    if cfg.train.split is not None:
        fit_split(cfg.train.split, rule.network)
    check_stages(stages, len(rule.network.blocks))
    return stages


def fit_split(split: str | list[int], network) -> list[int]:
    """Blocks per stage (``"2,1"`` or [2, 1]) checked against the network."""
    sizes = parse_split(split) if isinstance(split, str) else list(split)
    n = len(network.blocks)
    if sum(sizes) != n or min(sizes) < 1:
        raise ConfigError(f"train.split {split!r} covers {sum(sizes)} blocks but the network "
                          f"has {n}; give blocks per stage that add up to {n}")
    return sizes


# --- the plan: decided once, handed to every stage ----------------------------------------
SPLIT_BY = ("measured", "counted")


def counted_costs(rule, batch: int) -> list[float]:
    """Each block's counted cost (module docstring) in GFLOP, the head's with the last."""
    costs = block_costs(rule.network, rule.stage_rows(batch, True), batch)
    costs[-1] += head_cost(rule.network, batch)
    return [c / 1e9 for c in costs]


def _plan(sizes: list[int], costs: list[float], unit: str, by: str, split_by: str) -> dict:
    loads = [sum(costs[a:b]) for a, b in stage_ranges(sizes)]
    total = sum(loads) or 1.0
    shares = [v / total for v in loads]
    return {"split": sizes, "by": by, "split_by": split_by, "unit": unit,
            "block_costs": [round(c, 4) for c in costs],
            "shares": [round(v, 4) for v in shares], "balance": round(max(shares), 4)}


def _keeps(recorded, cfg, stages: int, blocks: int) -> bool:
    """Whether a resumed run's recorded plan still holds: the same number of stages and
    the same --split-by, blocks per stage that fit the network (and a plan as
    :func:`settle_plan` writes it: one that does not is settled afresh)."""
    if not isinstance(recorded, dict):
        return False

    def numbers(key: str, n: int) -> bool:
        v = recorded.get(key)
        return isinstance(v, list) and len(v) == n and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

    split = recorded.get("split")
    return (recorded.get("split_by") == cfg.train.split_by
            and recorded.get("by") in ("measured", "counted", "hand")
            and numbers("split", stages) and all(isinstance(k, int) and k >= 1 for k in split)
            and sum(split) == blocks and numbers("block_costs", blocks)
            and numbers("shares", stages) and isinstance(recorded.get("balance"), (int, float))
            and (recorded["by"] != "measured" or isinstance(recorded.get("calibration"), dict)
                 and {"repeats", "batch", "threads", "device"} <= set(recorded["calibration"])))


def settle_plan(rule, cfg, threads: int, device, recorded: dict | None = None) -> dict:
    """The split of a staged run and how it was chosen, decided once (by sigprop's
    launcher before any stage starts; under torchrun by rank 0, which broadcasts it),
    so that no two stage processes can disagree: each takes the plan's ``split``.

    ``--split`` given: that split, no calibration. A resumed run (``recorded``: the plan
    in its config.json) keeps its split while the number of stages and ``--split-by``
    stay. Else ``--split-by measured`` (the default) balances each block's measured
    step time (:mod:`.calibrate`: ``threads`` intra-op threads on ``device``) and
    ``counted`` the counted cost; where the timing cannot run (a RuntimeError, out of
    memory) the counted cost decides and the plan's ``fallback`` says why.

    The plan (a JSON object, recorded in config.json as ``stage_plan``): ``split``,
    ``by`` (measured | counted | hand), ``split_by`` (the option asked), ``unit`` (ms |
    GFLOP), ``block_costs``, each stage's ``shares`` of the step by those costs,
    ``balance`` (the largest share: the pipeline's pace; 1/S is even), with
    ``calibration`` (batch, threads, device, repeats) when measured, ``kept`` when a
    resume kept it, ``fallback`` when the timing failed."""
    stages = check_staging(rule, cfg)
    blocks = len(rule.network.blocks)
    split_by = cfg.train.split_by
    counted = counted_costs(rule, cfg.data.batch_size)
    if cfg.train.split is not None:
        return _plan(fit_split(cfg.train.split, rule.network), counted, "GFLOP", "hand",
                     split_by)
    if _keeps(recorded, cfg, stages, blocks):
        return {**recorded, "kept": True}
    fallback = None
    if split_by == "measured":
        try:
            ms, how = calibrate.measure_split_costs(cfg, threads, device)
        except (RuntimeError, MemoryError) as err:
            fallback = f"timing the blocks failed ({one_line(err)})"
        else:
            plan = _plan(balanced_split(ms, stages), ms, "ms", "measured", split_by)
            return {**plan, "calibration": how}
    plan = _plan(balanced_split(counted, stages), counted, "GFLOP", "counted", split_by)
    return {**plan, "fallback": fallback} if fallback else plan


def describe_plan(plan: dict) -> list[str]:
    """The lines a staged run prints at its start: the split, how it was chosen, each
    stage's share of the step and the balance (a fallback's own line first)."""
    split = ",".join(map(str, plan["split"]))
    costs = " / ".join(f"{c:.0f}" if c >= 100 else f"{c:.3g}" for c in plan["block_costs"])
    shares = " / ".join(f"{v:.2f}" for v in plan["shares"])
    how = plan.get("calibration")
    if plan["by"] == "hand":
        why = "given by hand (no calibration); by counted cost"
    elif plan["by"] == "measured":
        clock = f" ({how['clock']} time)" if how and "clock" in how else ""
        runs = (f"; median of {how['repeats']} passes{clock}, batch {how['batch']}, "
                f"{how['threads']} thread(s), {how['device']}" if how else "")
        why = f"by measured step time (blocks {costs} ms{runs})"
    else:
        why = f"by counted cost (blocks {costs} GFLOP)"
    if plan.get("kept"):
        why = f"kept from the run's record, {why}"
    lines = [f"note: {plan['fallback']}; the split falls back to the counted cost"
             ] if plan.get("fallback") else []
    even = 1 / len(plan["split"])
    lines.append(f"split {split} {why}: stage shares {shares}, balance "
                 f"{plan['balance']:.2f} (even: {even:.2f})")
    return lines


def recorded_plan(run_dir) -> dict | None:
    """The ``stage_plan`` a run folder's config.json records, if any."""
    path = Path(run_dir) / runio.CONFIG
    if not path.is_file():
        return None
    plan = runio.read_run_config(path).get("stage_plan")
    return plan if isinstance(plan, dict) else None


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
