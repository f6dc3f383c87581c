"""PEPITA (``pepita``; Dellaferrera & Kreiman, ICML 2022, "Error-driven Input Modulation:
Solving the Credit Assignment Problem without a Backward Pass"; GiorgiaD/PEPITA).

Two forward passes per batch and no backward pass. With ``h_0 = x`` and ``h_l`` the output
of block l (n rows, one per sample):

    standard pass:   h_l = block_l(h_{l-1}),  logits = head(h_L),  e = softmax(logits) - onehot(y)
    modulated pass:  h'_0 = x + e Fᵀ           (F: (d_in, classes), fixed and random)
                     h'_l = block_l(h'_{l-1})
    updates (descended by SGD with momentum; n the batch size):
        block l's Linear:  dW_l = (h_l - h'_l)ᵀ h'_{l-1} / n     (h'_0 flattened)
        the head:          dW   = eᵀ h'_L / n,  db = mean of e over the batch

``F``'s entries are uniform in ±0.05·sqrt(6/d_in) (the reference's He-uniform bound
times 0.05); the sign of ``F e`` is the reference's ``+`` (F is symmetric around zero,
so either sign draws the same matrices). The head learns from the standard pass's
error ``e`` as the paper's Algorithm 1 writes it; ``pepita_last_error = modulated``
takes the modulated pass's error instead, as the reference code does. Dropout masks
are the same in both passes (the random stream is rewound before the second).

Settings (the reference's fully connected MNIST runs): SGD with momentum 0.9, batches
of 64, learning rate 0.1 (x0.1 at 60% and 90% of the epochs: their epochs 60 and 90 of
100), dropout 0.1, He-uniform weights, pixels in [0, 1]. Where we differ: the library's
fc blocks hold BatchNorm (the reference's have none); it normalises each pass with its
own batch statistics, only the standard pass counts in the running estimates, and its
scale and shift stay at 1 and 0 (PEPITA updates weight matrices only, as the
reference's conv models leave their BatchNorm). Momentum is torch's (``v = m v + g``,
``w -= lr v``), the reference's ``v = m v + lr g``: the same until the rate changes.

Fully connected networks only: a conv block's output is pooled, and PEPITA's update
needs the activity right at the weights' output (the reference's conv net has one conv
layer and no BatchNorm); conv and vgg8b are refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError
from ..networks import Dropout, Network
from ..options import Option
from ..registry import register_rule
from .base import LearningRule, RuleConfig

_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.GELU, nn.Identity)
_AFTER_LINEAR = (nn.BatchNorm1d, Dropout, nn.Dropout, *_ACTIVATIONS)
HE_BOUND = 6.0  # He uniform: U(-sqrt(6 / fan_in), +sqrt(6 / fan_in))


# --------------------------------------------------------------------------- the math


def output_error(logits: Tensor, y: Tensor) -> Tensor:
    """e = softmax(logits) - onehot(y), (n, classes): the error PEPITA projects."""
    return logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)


def modulate(x: Tensor, e: Tensor, feedback: Tensor) -> Tensor:
    """The modulated input x + e Fᵀ, shaped like ``x`` (``feedback``: F, (d_in, classes))."""
    return x + (e @ feedback.T).view_as(x)


def layer_update(h: Tensor, h_mod: Tensor, pre_mod: Tensor) -> Tensor:
    """PEPITA's weight change of a hidden layer, (out, in): ``(h - h')ᵀ pre' / n``."""
    return (h - h_mod).T @ pre_mod / h.shape[0]


def feedback_matrix(d_in: int, classes: int, scale: float,
                    generator: torch.Generator | None = None) -> Tensor:
    """F (d_in, classes): uniform in ±scale·sqrt(6/d_in)."""
    bound = scale * math.sqrt(HE_BOUND / d_in)
    return torch.empty(d_in, classes).uniform_(-bound, bound, generator=generator)


# --------------------------------------------------------------------------- the rule

PEPITA_F_SCALE = Option(
    "pepita_f_scale", float, 0.05, "pepita: F's entries are uniform in ±scale·sqrt(6/d_in) "
    "(the reference's 0.05)", low=0.0, low_open=True, high=1e3)
PEPITA_MOMENTUM = Option("pepita_momentum", float, 0.9, "pepita: SGD momentum", low=0.0,
                         high=1.0, high_open=True)
PEPITA_LAST_ERROR = Option(
    "pepita_last_error", str, "standard", "pepita: the error the head learns from: standard "
    "(the first pass's, the paper's Algorithm 1) | modulated (the second pass's, as the "
    "reference code)", choices=("standard", "modulated"))
PEPITA_INIT = Option(
    "pepita_init", str, "he-uniform", "pepita: initial weights: he-uniform (the reference's; "
    "head bias zero) | network (the network's own)", choices=("he-uniform", "network"))


def _block_linear(block: nn.Module) -> nn.Linear | None:
    """The Linear of a fully connected block ([Flatten ->] Linear -> BatchNorm1d /
    activation / dropout), else None."""
    if not isinstance(block, nn.Sequential):
        return None
    mods = list(block)
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    if not mods or type(mods[0]) is not nn.Linear:
        return None
    if not all(isinstance(m, _AFTER_LINEAR) for m in mods[1:]):
        return None
    return mods[0]


@contextlib.contextmanager
def _batch_stats_only(bns: list[_BatchNorm]) -> Iterator[None]:
    """BatchNorms normalise with the batch's statistics and leave their running ones
    (and their batch count) alone: the modulated pass must not count the batch twice."""
    was = [bn.track_running_stats for bn in bns]
    for bn in bns:
        bn.track_running_stats = False
    try:
        yield
    finally:
        for bn, t in zip(bns, was):
            bn.track_running_stats = t


class _Feedback(nn.Module):
    """F as a buffer: saved with the rule, never trained."""

    def __init__(self, d_in: int, classes: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("F", feedback_matrix(d_in, classes, scale))


@register_rule("pepita")
class Pepita(LearningRule):
    """PEPITA (module docstring): a standard and a modulated forward pass, updates from
    their difference, SGD with momentum."""

    exit_names: ClassVar[list[str]] = ["output"]
    layered = True
    options = (PEPITA_F_SCALE, PEPITA_MOMENTUM, PEPITA_LAST_ERROR, PEPITA_INIT)
    # the reference's fully connected MNIST setting (module docstring)
    engine_defaults: ClassVar[dict[str, Any]] = {
        "rule.lr": 0.1, "data.batch_size": 64, "train.schedule": "step10",
        "data.inputs": "unit", "model.dropout": 0.1}

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        linears = [_block_linear(b) for b in network.blocks]
        if any(lin is None for lin in linears) or type(network.head) is not nn.Linear:
            raise ConfigError(
                "rule 'pepita' trains fully connected networks (blocks of Linear, "
                "BatchNorm1d, activation, dropout, and a Linear head): its update needs each "
                "layer's activity right at its weights' output; use --network "
                "fc-<layers>x<width>, e.g. fc-1x1024")
        super().__init__(network, num_classes, cfg)
        self.linears: list[nn.Linear] = linears  # type: ignore[assignment]
        if self.opts.pepita_init == "he-uniform":
            _he_uniform_(self.linears + [network.head])
        d_in = math.prod(network.input_shape)
        self.feedback = _Feedback(d_in, num_classes, self.opts.pepita_f_scale)
        self.feedback.to(next(network.parameters()).device)
        self.modules["feedback"] = self.feedback
        self.bns = [m for m in network.modules() if isinstance(m, _BatchNorm)]
        self.dropouts = [m for m in network.modules() if isinstance(m, (Dropout, nn.Dropout))]
        params = [p for lin in self.linears for p in lin.parameters()]
        params += list(network.head.parameters())
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=self.opts.pepita_momentum,
                                         weight_decay=cfg.weight_decay)
        self.optimizers = [self.optimizer]

    @torch.no_grad()
    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        blocks, head = self.network.blocks, self.network.head
        rewind = rng_state(x.device) if self.dropouts else None
        acts = []  # the standard pass's block outputs, (n, width) each
        h = x
        for i, block in enumerate(blocks):
            self._mark(f"block{i + 1}")
            h = block(h)
            acts.append(h)
        self._mark("head")
        logits = head(h)
        e = output_error(logits, y)  # (n, classes)
        loss = F.cross_entropy(logits, y)
        correct = (logits.argmax(1) == y).sum()
        h = modulate(x, e, self.feedback.F)
        if rewind is not None:
            set_rng_state(rewind, x.device)  # the standard pass's dropout masks again
        with _batch_stats_only(self.bns):
            for i, (block, lin) in enumerate(zip(blocks, self.linears)):
                self._mark(f"block{i + 1}")
                pre = h.flatten(1)
                h = block(h)
                lin.weight.grad = layer_update(acts[i], h, pre)
                if lin.bias is not None:  # its input is a constant 1
                    lin.bias.grad = (acts[i] - h).mean(0)
                acts[i] = None  # freed as the pass goes up
            self._mark("head")
            if self.opts.pepita_last_error == "modulated":
                e = output_error(head(h), y)
        head.weight.grad = e.T @ h / n
        if head.bias is not None:
            head.bias.grad = e.mean(0)
        self._mark("step")
        self.optimizer.step()
        return loss.view(1), correct.view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        return [self.network(x)]


@torch.no_grad()
def _he_uniform_(linears: list[nn.Linear]) -> None:
    """He-uniform weights U(±sqrt(6/fan_in)), zero biases (the reference's init)."""
    for lin in linears:
        bound = math.sqrt(HE_BOUND / lin.in_features)
        lin.weight.uniform_(-bound, bound)
        if lin.bias is not None:
            lin.bias.zero_()


def rng_state(device: torch.device) -> Tensor:
    """The random stream that draws ``device``'s dropout masks, to rewind it."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
