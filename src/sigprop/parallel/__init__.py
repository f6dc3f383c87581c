"""Layer-parallel training: sigprop's blocks in stages, one process each, over
torch.distributed (gloo on a CPU, NCCL on CUDA). See runner.py for one stage's loop,
stage.py for a stage process's place in the job, split.py for which blocks each stage
runs (settled once per job; calibrate.py times each block's step for it), transport.py for the point-to-point messages, replicas.py for data-parallel
replicas of the stages (``--replicas R``), launch.py for ``sigprop train --stages S`` on
one machine (torchrun for several); the consistent checkpoints are
sigprop.engine.runstate's."""

from ..engine.stagespec import parse_split
from .split import balanced_split, block_costs, resolve_split, stage_ranges

__all__ = ["balanced_split", "block_costs", "parse_split", "resolve_split", "stage_ranges"]
