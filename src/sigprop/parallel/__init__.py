"""Layer-parallel training: sigprop's blocks in stages, one process each, over
torch.distributed (gloo on a CPU, NCCL on CUDA). See runner.py for one stage's loop,
transport.py for the point-to-point messages, checkpoint.py for consistent checkpoints,
replicas.py for data-parallel replicas of the stages (``--replicas R``), launch.py for
``sigprop train --stages S`` on one machine (torchrun for several)."""

from .split import balanced_split, block_costs, parse_split, resolve_split, stage_ranges

__all__ = ["balanced_split", "block_costs", "parse_split", "resolve_split", "stage_ranges"]
