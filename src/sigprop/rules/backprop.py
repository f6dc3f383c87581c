"""Reference rules on the same networks: end-to-end backprop, and ``shallow``
(hidden blocks stay at their random initialisation; only the head learns)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..networks import Network
from ..registry import register_rule
from .base import LearningRule, RuleConfig, _full, make_adam
from .config import SPIKE_THRESHOLD


@register_rule("backprop")
class Backprop(LearningRule):
    """One loss at the output, gradients through every block, one Adam."""

    exit_names: ClassVar[list[str]] = ["output"]
    trains_spiking = True  # through the spikes' surrogate gradient (bp-surrogate)
    supports_amp = True
    # its step on channels-last maps / on NCHW: VGG8b 0.90, CONV 0.89; FA 0.88, 0.77
    # (docs/studies/fast-path.md)
    channels_last_pays = True
    options = (SPIKE_THRESHOLD,)

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(network, num_classes, cfg)
        self.opt = make_adam(network.parameters(), cfg)
        self.optimizers = [self.opt]

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast(x):
            logits = _full(self.network(x))
        loss = F.cross_entropy(logits, y)
        self._step(self.opt, loss)
        return loss.detach().view(1), (logits.argmax(1) == y).sum().view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        return [self.network(x)]


@register_rule("shallow")
class Shallow(LearningRule):
    """Only the classification head learns, on features of the fixed random blocks."""
    # its step on channels-last maps / on NCHW: VGG8b 0.79, CONV 0.70
    # (docs/studies/fast-path.md)
    channels_last_pays = True

    exit_names: ClassVar[list[str]] = ["output"]
    trains_spiking = True
    supports_amp = True
    options = (SPIKE_THRESHOLD,)

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(network, num_classes, cfg)
        network.blocks.requires_grad_(False)
        self.opt = make_adam(network.head.parameters(), cfg)
        self.optimizers = [self.opt]

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast(x):
            h = x
            with torch.no_grad():
                for block in self.network.blocks:
                    h = block(h)
            logits = _full(self.network.head(h))
        loss = F.cross_entropy(logits, y)
        self._step(self.opt, loss)
        return loss.detach().view(1), (logits.argmax(1) == y).sum().view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        return [self.network(x)]
