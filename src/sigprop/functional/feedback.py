"""Feedback alignment (Lillicrap et al. 2016) and direct feedback alignment (Nøkland
2016) as pure backward rules.

FA: a layer's input gradient goes through a fixed random matrix ``B`` of the weight's
shape instead of the weight itself; the weight's own gradient is the true one. With
``B = W`` it is backprop exactly. DFA: a hidden block's output gets the output error
``e = dL/dlogits`` through a fixed random ``B_i`` of shape (classes, values of the
block's output), straight from the output layer, and nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fa_linear_backward(grad_out: Tensor, x: Tensor, B: Tensor, needs: tuple[bool, bool, bool]
                       = (True, True, True)) -> tuple[Tensor | None, Tensor | None,
                                                      Tensor | None]:
    """Gradients of ``y = x Wᵀ + b`` under FA: ``(dL/dx = g B, dL/dW = gᵀ x, dL/db =
    Σ g)``; ``needs`` says which are wanted (None for the others). Leading dimensions
    beyond the last are flattened as rows."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    gx = (g @ B).view(x.shape) if needs[0] else None
    gw = g.T @ rows if needs[1] else None
    gb = g.sum(0) if needs[2] else None
    return gx, gw, gb


def fa_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, B: Tensor, stride,
                       padding, dilation, groups: int, needs: tuple[bool, bool, bool]
                       = (True, True, True)) -> tuple[Tensor | None, Tensor | None,
                                                      Tensor | None]:
    """Gradients of ``conv2d(x, W) + b`` under FA: the input's through ``B`` (the
    transposed convolution with B instead of W), the weight's and bias's true."""
    gx = gw = gb = None
    if needs[0]:
        gx = torch.ops.aten.convolution_backward(
            grad_out, x, B, None, stride, padding, dilation, False, [0, 0], groups,
            [True, False, False])[0]
    if needs[1] or needs[2]:
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if needs[2] else None, stride, padding,
            dilation, False, [0, 0], groups, [False, needs[1], needs[2]])
    return gx, gw, gb


def dfa_feedback(error: Tensor, B: Tensor, shape: tuple[int, ...]) -> Tensor:
    """DFA's signal for a hidden block: the output error ``(n, classes)`` through the
    block's fixed ``B (classes, d)``, shaped like the block's output ``(n, *shape)``."""
    return (error @ B).view(error.shape[0], *shape)


def fa_init_(B: Tensor, like: torch.nn.Module) -> Tensor:
    """Draw ``B`` in place from the layer's own init distribution (what
    ``reset_parameters`` draws its weight from), without touching the layer."""
    if isinstance(like, (torch.nn.Linear, torch.nn.Conv2d)):
        # nn.Linear and nn.Conv2d: kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), ...)
        torch.nn.init.kaiming_uniform_(B, a=5 ** 0.5)
        return B
    raise TypeError(f"no init distribution known for {type(like).__name__}")
