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
_FROZEN: ContextVar[bool] = ContextVar("sigprop_bn_frozen", default=False)


@contextmanager
def stats_from_first(n: int | None) -> Iterator[None]:
    """Within this block, converted BatchNorms use rows ``[:n]`` for statistics."""
    token = _STATS_ROWS.set(n)
    try:
        yield
    finally:
        _STATS_ROWS.reset(token)


@contextmanager
def frozen_running_stats() -> Iterator[None]:
    """Converted BatchNorms normalise with batch statistics but leave running ones alone.

    For extra passes over the same batch (the loop-back generators' label-free pass),
    which must not count the batch twice in the running estimates.
    """
    token = _FROZEN.set(True)
    try:
        yield
    finally:
        _FROZEN.reset(token)


def _stats_rows(x: torch.Tensor, n: int, steps: int) -> list[torch.Tensor]:
    """The rows whose statistics count: ``x[:n]``, or with ``steps`` > 1 (``x`` is
    step-major, ``steps`` groups of B samples: a spiking net's ``[T * B, ...]``) the first
    n samples of every group."""
    if steps == 1:
        return [x[:n] if n < x.shape[0] else x]
    groups = x.unflatten(0, (steps, x.shape[0] // steps))
    return [groups[s, :n] for s in range(steps)]


def input_stats_forward(x: torch.Tensor, weight, bias, n: int, eps: float,
                        running: tuple | None, shift: torch.Tensor | None = None,
                        steps: int = 1):
    """y = (x - mu) * r * w + b for all rows, mu and var from rows [:n] only (with
    ``steps``: the first n samples of each step-major group, :func:`_stats_rows`);
    returns (y, mu, var). ``running`` = (running_mean, running_var, momentum) is updated
    as nn.BatchNorm does, for ``x + shift`` when a shift (a bias the normalisation
    cancels) was left out of x. Statistics of 16-bit x are float32, as nn.BatchNorm's."""
    rows = _stats_rows(x, n, steps)
    means, vars_ = zip(*(torch.batch_norm_update_stats(r, None, None, 0.0) for r in rows))
    if len(rows) == 1:
        mean, var = means[0], vars_[0]  # biased var
    else:  # groups of equal size: the union's mean and biased variance
        m = torch.stack(means)
        mean = m.mean(0)
        var = (torch.stack(vars_) + m.square()).mean(0).sub_(mean.square()).clamp_(min=0)
    if x.dtype in (torch.float16, torch.bfloat16):
        mean, var = mean.float(), var.float()
    count = sum(r.numel() for r in rows) // x.shape[1]
    if running is not None:
        running_mean, running_var, momentum = running
        running_mean.lerp_(mean if shift is None else mean + shift, momentum)
        running_var.lerp_(var * (count / max(count - 1, 1)), momentum)
    y = torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
    return y, mean, var


def input_stats_backward(g: torch.Tensor, x: torch.Tensor, weight, mean, var, n: int,
                         eps: float, steps: int = 1):
    """Gradients (dx, dw, db) of :func:`input_stats_forward`, through the statistics:

        dx_j = r * (dxh_j - [j < n] * (sum(dxh) + xh_j * sum(dxh * xh)) / N),

    dxh = g * w, xh = (x - mu) * r, sums over all rows, N the element count per channel
    in rows [:n] (with ``steps``: the first n samples of every step-major group). ATen's
    eval-mode backward (statistics held fixed) yields the sums sum(g * xh) and sum(g);
    then dx = s g - (k x + c) on those rows, s g on the others, per channel: two passes
    over the map where the eval-mode dx and a correction took four
    (docs/studies/fast-path.md).
    """
    w = weight if weight is not None else torch.ones_like(mean)
    invstd = torch.rsqrt(var + eps)
    # The CUDA kernel wants save_mean / save_invstd defined even in eval mode (an
    # internal assert otherwise); they hold the same statistics, so every backend
    # computes the same thing.
    _, dw, db = torch.ops.aten.native_batch_norm_backward(
        g, x, w, mean, var, mean, invstd, False, eps, [False, True, True]
    )
    rows = _stats_rows(x, n, steps)
    count = sum(r.numel() for r in rows) // x.shape[1]
    dx = torch.empty_like(g)
    _apply_stats_grad(dx, g, x, n, steps, w, dw, db, mean, invstd, count)
    return dx, dw, db


def _apply_stats_grad(dx, g, x, n: int, steps: int, w, dw, db, mean, invstd, count: int
                      ) -> None:
    """Write dx = s g - (k x + c) into the statistics' rows of ``dx`` and s g into the
    others (s = w r, k = w r² sum(g xh) / N, c = w r sum(g) / N - k mu)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    k = w * dw * invstd.square() / count  # coefficient of (x_j - mu)
    neg_c = (mean * k - w * db * invstd / count).view(shape)
    neg_k, s = k.neg().view(shape), (w * invstd).view(shape)
    groups = [(x, g, dx)] if steps == 1 else \
        zip(*(t.unflatten(0, (steps, x.shape[0] // steps)) for t in (x, g, dx)))
    for xr, gr, dr in groups:  # each step-major group: rows [:n] are the statistics'
        torch.addcmul(neg_c, xr[:n], neg_k, out=dr[:n])
        dr[:n].addcmul_(gr[:n], s)
        if dr[n:].numel():
            torch.mul(gr[n:], s, out=dr[n:])


def input_stats_backward_pair(g: torch.Tensor, x: torch.Tensor, g_t: torch.Tensor,
                              t: torch.Tensor, weight, mean, var, eps: float):
    """Gradients (dx, dt, dw, db) when the statistics come from all of ``x`` and are
    also applied to ``t``, a separate tensor of other spatial size (sparse targets'
    fields, rules/sigprop/sparse.py): as :func:`input_stats_backward` with x's rows making the
    statistics and t's rows only using them, their sums taken over both."""
    w = weight if weight is not None else torch.ones_like(mean)
    invstd = torch.rsqrt(var + eps)
    mask = [False, True, True]
    _, dw, db = torch.ops.aten.native_batch_norm_backward(
        g, x, w, mean, var, mean, invstd, False, eps, mask)
    _, dw_t, db_t = torch.ops.aten.native_batch_norm_backward(
        g_t, t, w, mean, var, mean, invstd, False, eps, mask)
    dw, db = dw + dw_t, db + db_t
    count = x.numel() // x.shape[1]
    dx = torch.empty_like(g)
    _apply_stats_grad(dx, g, x, x.shape[0], 1, w, dw, db, mean, invstd, count)
    dt = torch.mul(g_t, (w * invstd).view((1, -1) + (1,) * (t.dim() - 2)))
    return dx, dt, dw, db


class _InputStatsBN(torch.autograd.Function):
    """:func:`input_stats_forward` with :func:`input_stats_backward` as its gradient.

    Saves only x (and the per-channel statistics); the same math in autograd ops saved
    three tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, n: int, eps: float, running: tuple | None,
                steps: int = 1):
        y, mean, var = input_stats_forward(x, weight, bias, n, eps, running, steps=steps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.n, ctx.eps, ctx.steps = n, eps, steps
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, mean, var = ctx.saved_tensors
        dx, dw, db = input_stats_backward(g.contiguous(), x, weight, mean, var, ctx.n, ctx.eps,
                                          ctx.steps)
        if weight is None:
            return dx, None, None, None, None, None, None
        return dx, dw, db, None, None, None, None


class InputStatsBatchNorm(_BatchNorm):
    """A BatchNorm (any of 1d/2d/3d) whose training statistics can skip rows."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = _STATS_ROWS.get()
        if self.training and _FROZEN.get():  # batch statistics, running ones untouched
            rows = x.shape[0] if n is None else n
            return _InputStatsBN.apply(x, self.weight, self.bias, rows, self.eps, None)
        if not self.training or n is None or n >= x.shape[0]:
            return super().forward(x)
        # The statistics stay differentiable for the target rows too: holding them
        # constant there cost deep layers accuracy (docs/studies/fc-accuracy.md).
        return _InputStatsBN.apply(x, self.weight, self.bias, n, self.eps, self.count_batch())

    def count_batch(self) -> tuple | None:
        return count_batch(self)


def count_batch(bn: _BatchNorm) -> tuple | None:
    """Count one training batch of ``bn``; (running_mean, running_var, momentum) to
    update, as ``nn.BatchNorm`` would, or None when running statistics are not tracked."""
    if not (bn.track_running_stats and bn.num_batches_tracked is not None):
        return None
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return (bn.running_mean, bn.running_var, momentum)


def input_stats_norm(bn: _BatchNorm, x: torch.Tensor, n: int, steps: int = 1) -> torch.Tensor:
    """``bn`` in training mode on ``x`` with statistics from its first ``n`` rows (with
    ``steps``: the first n samples of each step-major group), running statistics counted."""
    return _InputStatsBN.apply(x, bn.weight, bn.bias, n, bn.eps, count_batch(bn), steps)


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
