"""BatchNorm that takes its statistics from the inputs only (Sec. III-D).

In sigprop a block sees ``[h, t]`` stacked on the batch axis. Targets from the
Eq. 1 generator are one row per class and are not distributed like the inputs, so
letting them into the batch statistics would skew both the normalisation of the
inputs and the running estimates used at test time. Inside
``stats_from_first(n)`` a converted BatchNorm computes mean and variance over the
first ``n`` rows (the inputs) and normalises *all* rows with them; outside that
context it is an ordinary BatchNorm. Networks keep plain ``nn.BatchNorm*d``; the
sigprop rule converts them (state_dict keys are unchanged).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_STATS_ROWS: ContextVar[int | None] = ContextVar("sigprop_bn_stats_rows", default=None)


@contextmanager
def stats_from_first(n: int | None) -> Iterator[None]:
    """Within this block, converted BatchNorms use rows ``[:n]`` for statistics."""
    token = _STATS_ROWS.set(n)
    try:
        yield
    finally:
        _STATS_ROWS.reset(token)


class InputStatsBatchNorm(_BatchNorm):
    """A BatchNorm (any of 1d/2d/3d) whose training statistics can skip rows."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = _STATS_ROWS.get()
        if not self.training or n is None or n >= x.shape[0]:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        stats = x[:n]
        # Differentiable statistics: the targets' loss also shapes them through the
        # normalisation. Holding them constant for the target rows (BN "in inference
        # mode" for targets) cost 10-15 points of deep-layer accuracy in a 3x1000 net
        # (docs/ARCHITECTURE.md). mean + centred square: torch.var_mean over dim 0
        # measured 50x slower than this on a (128, 1000) batch on this CPU.
        mean = stats.mean(dims)
        var = (stats - mean.view(shape)).square().mean(dims)
        if self.track_running_stats and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                )
                count = stats.numel() // stats.shape[1]
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * (count / max(count - 1, 1)), momentum)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
            shift = self.bias - mean * scale
        else:
            shift = -mean * scale
        return x * scale.view(shape) + shift.view(shape)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every ``_BatchNorm`` in ``module`` for an :class:`InputStatsBatchNorm`.

    Parameters and buffers are shared, not copied, so the swap is free and the
    state_dict is unchanged. Returns the (possibly new) module.
    """
    if isinstance(module, _BatchNorm) and not isinstance(module, InputStatsBatchNorm):
        new = InputStatsBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child))
    return module
