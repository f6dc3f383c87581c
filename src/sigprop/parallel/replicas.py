"""Data-parallel replicas of the stages (``--replicas R``): what keeps them one model.

A run of S stages and R replicas has S x R processes, rank ``replica * S + stage``;
replica j is a pipeline of its own that learns from rows :func:`.transport.shard` (j) of
every batch, and the R processes of a stage form one process group. In that group:

* :func:`reduce_grads`: each step's gradients, weighted by the replica's share of the
  batch, summed by one all-reduce of one buffer, before the stage's Adam step (the rule
  calls it through ``Sigprop.grad_reduce``): with each shard's BatchNorm statistics its
  own, the gradient of the batch's mean loss, and the same update on every replica;
* :func:`sync_stage`: at an epoch's end, the BatchNorm running statistics averaged, the
  prototypes merged, and the parameters compared (they must agree bit for bit: the
  same parameters, the same reduced gradients, the same Adam step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import ConfigError, SigpropError

MIN_SHARD = 2  # training rows per replica: BatchNorm cannot learn from fewer


def check_shards(replicas: int, train_sizes: list[int], test_sizes: list[int]
                 ) -> ConfigError | None:
    """Why the epoch's batches cannot be shared out among ``replicas``, or None."""
    if replicas == 1:
        return None
    small = min(train_sizes, default=MIN_SHARD * replicas)
    if small < MIN_SHARD * replicas:
        return ConfigError(
            f"with {replicas} replicas every training batch is shared out, {MIN_SHARD} "
            f"samples at least to each (BatchNorm), but a batch holds {small}: choose a "
            f"--batch-size of {MIN_SHARD * replicas} or more whose last batch (the training "
            f"samples modulo it) also holds {MIN_SHARD * replicas} or more, or fewer --replicas")
    small = min(test_sizes, default=replicas)
    if small < replicas:
        return ConfigError(
            f"with {replicas} replicas every test batch is shared out, but the last holds "
            f"{small} samples: choose an --eval-batch-size that leaves {replicas} or more in it")
    return None


def reduce_grads(grads: list[Tensor], share: float, group) -> None:
    """Replace each gradient by the sum over the group of ``share`` x the replica's own."""
    flat = _flatten_dense_tensors(grads).mul_(share)
    dist.all_reduce(flat, group=group)
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def stage_modules(rule, stage: int, stages: int, start: int, stop: int) -> list[nn.Module]:
    """The modules a stage trains: its blocks, the signal at the first, the head at the last."""
    mods: list[nn.Module] = list(rule.network.blocks[start:stop])
    if stage == 0:
        mods.append(rule.signal)
    if stage == stages - 1 and getattr(rule.network, "head", None) is not None:
        mods.append(rule.network.head)
    return mods


@torch.no_grad()
def sync_stage(rule, stage: int, stages: int, start: int, stop: int, group,
               replicas: int) -> None:
    """At an epoch's end: the group's BatchNorm running statistics averaged and its
    prototypes merged (each class's mean over the replicas that have seen it), so every
    replica evaluates and saves the same state; then a check that the parameters agree."""
    mods = stage_modules(rule, stage, stages, start, stop)
    stats = [b for m in mods for name, b in m.named_buffers()
             if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    if stats:
        flat = _flatten_dense_tensors(stats)
        dist.all_reduce(flat, group=group)
        flat /= replicas
        for b, v in zip(stats, _unflatten_dense_tensors(flat, stats)):
            b.copy_(v)
    protos = rule.prototypes
    if protos is not None:
        for i in range(start, stop):
            mean, seen = protos.get(i)
            w = seen.to(mean.dtype)
            rows = w.view(-1, *(1,) * (mean.dim() - 1))
            total = mean * rows
            dist.all_reduce(total, group=group)
            dist.all_reduce(w, group=group)
            mean.copy_(torch.where(rows > 0, total / rows.clamp(min=1), mean))
            seen.copy_(w > 0)
    params = [p for m in mods for p in m.parameters() if p.numel()]
    check = (torch.stack([p.detach().double().sum() for p in params]) if params
             else torch.zeros(1, dtype=torch.float64))
    low, high = check.clone(), check.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise SigpropError(f"the replicas of stage {stage + 1} hold different parameters "
                           "after the same updates; this is a fault of this machine or of "
                           "sigprop: please report it")
