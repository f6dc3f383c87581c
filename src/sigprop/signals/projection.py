"""t1 = f(S u + d): the written-out forward and backward of a projected target, shared by
the generators built on it (Eq. 1: u = the one-hot classes; Eq. 11, 12: u from the
label-free pass)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def projection_targets(proj: nn.Linear, u: Tensor | None, slope: float,
                       out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """t1 = LeakyReLU(proj(u)), into ``out`` (viewed flat) if given; returns (t1 flat,
    proj(u)).

    ``u`` None: one row per class, u = I (Eq. 1: t1 = f(S c + d) for every one-hot c);
    else per-sample inputs computed without gradient (Eq. 11: y_L + y*; Eq. 12:
    h_L - η dL/dh_L)."""
    w = proj.weight.T
    if u is None:
        pre = w + proj.bias if proj.bias is not None else w.clone()
    else:
        pre = torch.addmm(proj.bias, u, w) if proj.bias is not None else u @ w
    if out is None:
        return F.leaky_relu(pre, slope), pre
    if not out.is_contiguous():  # channels-last maps: values in (C, H, W) order, copied in
        t1 = F.leaky_relu(pre, slope)
        out.copy_(t1.view(out.shape))
        return t1, pre
    return torch.ops.aten.leaky_relu.out(pre, slope, out=out.view(pre.shape)), pre


def projection_backward(proj: nn.Linear, u: Tensor | None, pre: Tensor, slope: float,
                        dt: Tensor) -> None:
    """Gradients of :func:`projection_targets`' ``proj`` from dL/dt1."""
    dpre = torch.ops.aten.leaky_relu_backward(dt.reshape(pre.shape), pre, slope, False)
    if proj.weight.requires_grad:
        proj.weight.grad = dpre.T.contiguous() if u is None else dpre.T @ u
    if proj.bias is not None and proj.bias.requires_grad:
        proj.bias.grad = dpre.sum(0)
