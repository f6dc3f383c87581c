"""Feedback alignment (``fa``, Lillicrap et al. 2016) and direct feedback alignment
(``dfa``, Nøkland 2016) on any network of blocks and a head.

``fa``: every Linear and Conv2d of the network (blocks and head) sends its input
gradient back through a fixed random matrix ``B`` of its weight's shape instead of the
weight (``FALinear``, ``FAConv2d``: the modules share the original parameters and add
``B`` as the buffer ``fa_weight``, drawn once from the layer's own init distribution,
kept in the state_dict, never trained); weight gradients are the true ones. One loss at
the output, one backward pass, one Adam: backprop's schedule with another backward.

``dfa``: the output error ``e = dL/dlogits`` of the head's cross-entropy goes straight
to every hidden block's output through a fixed random ``B_i (classes, values of the
block's output)`` (uniform in ±1/sqrt(values), as anokland/dfa-torch's ErrorFeedback;
for conv blocks a dense matrix over C x H x W, as there). Each block's input is
detached, so its update uses only ``e B_i`` and its own local derivative: one backward
call per block, from its own output, through its own modules. No gradient chain
through the network is ever computed. The head learns from its true gradient (its
input detached too). All blocks update after the one forward pass.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.feedback import (
    dfa_feedback,
    fa_conv2d_backward,
    fa_init_,
    fa_linear_backward,
)
from ..networks import Network
from ..networks.base import laid_out_as
from ..registry import register_rule
from .backprop import Backprop
from .base import LearningRule, RuleConfig, make_grouped_adam


def _as_grad_dtype(g: Tensor, saved: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The saved tensors in the incoming gradient's dtype: under autocast the forward
    ran in 16 bits (g is 16-bit) while x, W and B were saved as given (32-bit), and the
    products of the backward want one dtype, as autocast's own backward computes them.
    Autograd casts the returned gradients to each input's dtype."""
    return tuple(t.to(g.dtype) for t in saved)


class _FALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, B):
        ctx.save_for_backward(x, B)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, B = _as_grad_dtype(g, ctx.saved_tensors)
        needs = ctx.needs_input_grad
        gx, gw, gb = fa_linear_backward(g, x, B, (needs[0], needs[1], needs[2]))
        return gx, gw, gb, None


class _FAConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, B, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, B)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, weight, B = _as_grad_dtype(g, ctx.saved_tensors)
        needs = ctx.needs_input_grad
        gx, gw, gb = fa_conv2d_backward(g, x, weight, B, *ctx.conv,
                                        needs=(needs[0], needs[1], needs[2]))
        return gx, gw, gb, None, None, None, None, None


class FALinear(nn.Linear):
    """An ``nn.Linear`` whose input gradient goes through ``fa_weight`` (feedback
    alignment); built from a Linear by :func:`convert_fa`, sharing its parameters."""

    fa_weight: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return _FALinearFn.apply(x, self.weight, self.bias, self.fa_weight)


class FAConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose input gradient goes through ``fa_weight``."""

    fa_weight: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return _FAConv2dFn.apply(x, self.weight, self.bias, self.fa_weight, self.stride,
                                 self.padding, self.dilation, self.groups)


def convert_fa(module: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` and zero-padded ``nn.Conv2d`` in ``module`` for its FA
    version: parameters shared (not copied), ``fa_weight`` drawn from the layer's init
    distribution. Returns the (possibly new) module."""
    if type(module) in (nn.Linear, nn.Conv2d):
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError("feedback alignment supports zero-padded Conv2d with "
                                 "numeric padding")
            new: nn.Module = FAConv2d(module.in_channels, module.out_channels,
                                      module.kernel_size, module.stride, module.padding,
                                      module.dilation, module.groups, module.bias is not None,
                                      device="meta")
        else:
            new = FALinear(module.in_features, module.out_features, module.bias is not None,
                           device="meta")
        new.weight, new.bias = module.weight, module.bias
        w = module.weight  # B drawn in (C, H, W) order: the same matrix on either layout
        B = fa_init_(torch.empty(w.shape, dtype=w.dtype, device=w.device), module)
        new.register_buffer("fa_weight", laid_out_as(B, w))
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_fa(child))
    return module


@register_rule("fa")
class FeedbackAlignment(Backprop):
    """Backprop's loss, schedule and optimizer; every layer's backward through its fixed
    random ``B`` (module docstring)."""

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        convert_fa(network)
        super().__init__(network, num_classes, cfg)


class _Feedback(nn.Module):
    """DFA's fixed random matrices, one per block, as buffers (saved, never trained)."""

    def __init__(self, shapes: list[tuple[int, ...]], num_classes: int) -> None:
        super().__init__()
        for i, shape in enumerate(shapes):
            d = math.prod(shape)
            bound = 1.0 / math.sqrt(d)
            self.register_buffer(f"B{i}", torch.empty(num_classes, d).uniform_(-bound, bound))

    def get(self, i: int) -> Tensor:
        return getattr(self, f"B{i}")


@register_rule("dfa")
class DirectFeedbackAlignment(LearningRule):
    """DFA (module docstring): one forward pass, then every block from ``e B_i``."""
    # its step on channels-last maps / on NCHW: VGG8b 0.94, CONV 0.91
    # (docs/studies/fast-path.md)
    channels_last_pays = True

    exit_names: ClassVar[list[str]] = ["output"]
    layered = True

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(network, num_classes, cfg)
        self.feedback = _Feedback(network.block_shapes, num_classes)
        self.modules["feedback"] = self.feedback
        groups = {f"block{i + 1}": b.parameters() for i, b in enumerate(network.blocks)}
        groups["head"] = network.head.parameters()
        self.optimizer = make_grouped_adam(groups, cfg)
        self.optimizers = [self.optimizer] if self.optimizer is not None else []
        self._trainable = [p for p in self.modules.parameters() if p.requires_grad]

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for p in self._trainable:
            p.grad = None
        outs = []
        h = x
        for i, block in enumerate(self.network.blocks):
            self._mark(f"block{i + 1}")
            h = block(h.detach())  # each block's graph is its own: nothing crosses
            outs.append(h)
        self._mark("head")
        logits = self.network.head(h.detach())
        loss = F.cross_entropy(logits, y)
        if loss.requires_grad:
            loss.backward()  # the head's own gradient
        # e = dL/dlogits of the mean cross-entropy, in closed form: (softmax - onehot)/n
        with torch.no_grad():
            e = logits.softmax(1)
            e[torch.arange(len(y), device=y.device), y] -= 1
            e /= len(y)
        for i, (h_out, shape) in enumerate(zip(outs, self.network.block_shapes)):
            self._mark(f"block{i + 1}")  # its backward, from e B_i
            if h_out.requires_grad:
                h_out.backward(dfa_feedback(e, self.feedback.get(i).to(e.dtype), shape))
        self._mark("step")
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach().view(1), (logits.argmax(1) == y).sum().view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        return [self.network(x)]
