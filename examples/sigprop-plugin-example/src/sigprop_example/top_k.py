"""``top-k``: backprop through the last K blocks and the head; the blocks below keep
their random initialisation (K = 0 is ``shallow``, K = all blocks is ``backprop``).

A complete sigprop rule in one file: its option (``--trainable-blocks``) is declared
here, and sigprop's command line, configs, run folders, bench and reproduce take it
from this declaration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sigprop import ConfigError, LearningRule, Option, make_adam, register_rule

TRAINABLE_BLOCKS = Option(
    "trainable_blocks", int, 1, "top-k: how many of the last blocks learn (0: only the head)",
    low=0, high=1000, metavar="K")


@register_rule("top-k")
class TopK(LearningRule):
    """The last ``trainable_blocks`` blocks and the head learn by backprop."""

    options = (TRAINABLE_BLOCKS,)
    exit_names = ["output"]

    def __init__(self, network, num_classes, cfg) -> None:
        super().__init__(network, num_classes, cfg)
        k = self.opts.trainable_blocks
        blocks = network.blocks
        if k > len(blocks):
            raise ConfigError(f"trainable_blocks {k} exceeds the network's {len(blocks)} "
                              f"blocks; choose K <= {len(blocks)}")
        self.frozen = len(blocks) - k  # blocks[:frozen] keep their initial weights
        blocks[: self.frozen].requires_grad_(False)
        self.opt = make_adam(network.parameters(), cfg)
        self.optimizers = [self.opt]

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = x
        with torch.no_grad():  # no graph through the fixed blocks
            for block in self.network.blocks[: self.frozen]:
                h = block(h)
        for block in self.network.blocks[self.frozen:]:
            h = block(h)
        logits = self.network.head(h)
        loss = F.cross_entropy(logits, y)
        self._step(self.opt, loss)
        return loss.detach().view(1), (logits.argmax(1) == y).sum().view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        return [self.network(x)]
