"""Signal propagation (Sec. III): every block learns from its own L_pred, at once.

One training step, for blocks B_1..B_L and target generator G:

    h1 = B_1(x);  t1 = G(h1, y)                 # Eq. 1 / 10 / 11 / 12
    [h_i, t_i] = B_i([h_{i-1}, t_{i-1}])        # Eq. 2-3: one call, same weights
    L_i = CE(y, O(h_i, t_i))  ->  step B_i now  # Eq. 9; B_1's step also moves G
    (classifier head: CE(y, head(h_L)) -> step head)          # Fig. 2b

Inputs of each block are detached, so no gradient crosses a block boundary and
only one block's activations are alive at a time. Each block has its own Adam.
Prediction: the last block's output-target comparison (Fig. 2a), or the head
(Fig. 2b, which needs neither labels nor the generator at inference).

Per-sample generators (Eq. 10-12) make one target per sample, built from its label;
L_pred compares each output with the class means of the batch's targets. Their early
exits compare, by default, with *prototypes*: running means of those class means,
kept per layer while training (the comparison L_pred trained). The alternative,
``exit_targets="candidates"``, builds every sample's target under every class and
sends all of them through the blocks (m x the target work).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as SF
from ..batchnorm import convert_batchnorm, frozen_running_stats, stats_from_first
from ..errors import ConfigError
from ..networks import Network
from ..registry import register_rule
from ..signals import Feedback, TargetGenerator, build_signal
from .base import LearningRule, RuleConfig, make_adam

PROTOTYPE_MOMENTUM = 0.1  # as BatchNorm's running statistics


class Prototypes(nn.Module):
    """Per layer, a running mean of the class means of the training targets.

    ``mean{i}`` (m, *D) and ``seen{i}`` (m,) are buffers, so they travel with the
    state_dict (checkpoints, resume). A class's first batch sets its prototype; later
    batches move it by ``momentum``. Classes never seen score -inf.
    """

    def __init__(self, shapes: list[tuple[int, ...]], num_classes: int,
                 momentum: float = PROTOTYPE_MOMENTUM) -> None:
        super().__init__()
        self.momentum = momentum
        for i, shape in enumerate(shapes):
            self.register_buffer(f"mean{i}", torch.zeros(num_classes, *shape))
            self.register_buffer(f"seen{i}", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, i: int, means: Tensor, present: Tensor) -> None:
        mean, seen = getattr(self, f"mean{i}"), getattr(self, f"seen{i}")
        rows = (-1,) + (1,) * (mean.dim() - 1)
        moved = torch.where(seen.view(rows), mean.lerp(means, self.momentum), means)
        mean.copy_(torch.where(present.view(rows), moved, mean))
        seen.logical_or_(present)

    def get(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"mean{i}"), getattr(self, f"seen{i}")


@register_rule("sigprop")
class Sigprop(LearningRule):
    def __init__(
        self, network: Network, num_classes: int, cfg: RuleConfig,
        signal: TargetGenerator | None = None,
    ) -> None:
        super().__init__(network, num_classes, cfg)
        convert_batchnorm(network.blocks)
        shapes = network.block_shapes
        if signal is None:
            signal = build_signal(
                cfg.signal, num_classes, shapes[0], cfg.signal_learned,
                head=network.head, out_dim=math.prod(shapes[-1]), eta=cfg.eta,
            )
        if signal.target_shape != shapes[0]:
            raise ConfigError(
                f"target generator makes targets of shape {signal.target_shape}, "
                f"but the first block outputs {shapes[0]}"
            )
        if signal.needs_feedback and cfg.head != "classifier":
            raise ConfigError(
                f"signal {cfg.signal!r} loops the network's prediction back (Fig. 2c); "
                "it needs --head classifier"
            )
        self.signal = signal
        self.modules["signal"] = signal
        self.prototypes: Prototypes | None = None
        if signal.per_sample and cfg.exit_targets == "prototypes":
            self.prototypes = Prototypes(shapes, num_classes)
            self.modules["prototypes"] = self.prototypes
        self.classifier = cfg.head == "classifier"
        self.scales = [
            cfg.logit_scale or SF.default_scale(cfg.loss, math.prod(s), signal.per_sample)
            for s in shapes
        ]
        # The first block learns together with the generator (Eq. 1: L_1(h1, t1)); a
        # fixed generator's parameters do not require grad and make_adam skips them.
        blocks = network.blocks
        self.block_opts = [make_adam([*blocks[0].parameters(), *signal.parameters()], cfg)]
        self.block_opts += [make_adam(b.parameters(), cfg) for b in blocks[1:]]
        self.head_opt = make_adam(network.head.parameters(), cfg) if self.classifier else None
        self.optimizers = [o for o in [*self.block_opts, self.head_opt] if o is not None]
        self.exit_names = [f"layer{i + 1}" for i in range(len(blocks))]
        if self.classifier:
            self.exit_names.append("head")

    # --- training ---------------------------------------------------------------
    def _stats_rows(self, n: int) -> int | None:
        return n if self.cfg.bn_stats == "inputs" else None

    def _feedback(self, x: Tensor) -> Feedback:
        """A label-free pass for loop-back generators (Fig. 2c), without gradients.

        In training mode it normalises with the batch's statistics, as the pass that
        follows will, but does not count the batch in the running statistics twice.
        """
        with torch.no_grad(), frozen_running_stats():
            h = x
            for block in self.network.blocks:
                h = block(h)
            return Feedback(h.flatten(1), self.network.head(h))

    def _layer_logits(self, i: int, h: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """(n, classes) logits of L_pred at block i; per-sample targets become class means."""
        if not self.signal.per_sample:
            return SF.compare(h, t, self.cfg.loss, self.scales[i])
        means, present = SF.class_targets(t, y, self.num_classes)
        if self.prototypes is not None:
            self.prototypes.update(i, means.detach(), present)
        logits = SF.compare(h, means, self.cfg.loss, self.scales[i])
        return logits.masked_fill(~present, float("-inf"))  # absent classes: no target

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        fb = self._feedback(x) if self.signal.needs_feedback else None
        losses, logits_seen = [], []
        h = t = x
        z = None  # the last block's (n + m)-row output
        for i, (block, opt) in enumerate(zip(self.network.blocks, self.block_opts)):
            if i == 0:
                h_out = block(x)  # only inputs here: BN statistics are the inputs'
                t_out = self.signal.targets(h_out, y, fb)
            else:
                # [h, t]: built once after block 1; later it is z itself (no copy)
                stacked = torch.cat([h, t]) if z is None else z.detach()
                with stats_from_first(self._stats_rows(n)):
                    z = block(stacked)  # (n + m, *D): inputs, then targets
                h_out, t_out = z.split([n, z.shape[0] - n])  # backward: one cat, no zero-fill
            logits = self._layer_logits(i, h_out, t_out, y)
            loss = F.cross_entropy(logits, y)
            self._step(opt, loss)
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
            h, t = h_out.detach(), t_out.detach()
        if self.classifier:
            logits = self.network.head(h)
            loss = F.cross_entropy(logits, y)
            self._step(self.head_opt, loss)
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
        correct = (torch.stack(logits_seen).argmax(2) == y).sum(1)  # every exit at once
        return torch.stack(losses), correct

    # --- inference ----------------------------------------------------------------
    def exit_scores(self, x: Tensor) -> list[Tensor]:
        """Early exits (Eq. 8) of every block, then the head's logits if there is one.

        Per-class generators: h and the m class targets go through each block and are
        compared. Per-sample generators: with ``exit_targets="prototypes"`` (default)
        h is compared with each layer's running class means of the training targets;
        with ``"candidates"`` each sample's m candidate targets (one per class) go
        through each block, m x the target work, and the best match wins.
        """
        if self.prototypes is not None:
            return self._prototype_scores(x)
        with torch.no_grad():
            n = x.shape[0]
            fb = self._feedback(x) if self.signal.needs_feedback else None
            scores = []
            h = x
            t = None
            for i, block in enumerate(self.network.blocks):
                h = block(h)
                if i == 0:
                    t = (
                        self.signal.candidates(h, fb).flatten(0, 1)  # (n * m, *D)
                        if self.signal.per_sample
                        else self.signal.targets(h)  # (m, *D)
                    )
                else:
                    t = block(t)
                if self.signal.per_sample:
                    paired = t.view(n, self.num_classes, *t.shape[1:])
                    scores.append(SF.compare_paired(h, paired, self.cfg.loss, self.scales[i]))
                else:
                    scores.append(SF.compare(h, t, self.cfg.loss, self.scales[i]))
            if self.classifier:
                scores.append(self.network.head(h))
            return scores

    def _prototype_scores(self, x: Tensor) -> list[Tensor]:
        """Exits of per-sample generators compared with each layer's prototypes: no
        label, no generator, no target rows at inference."""
        assert self.prototypes is not None
        with torch.no_grad():
            scores = []
            h = x
            for i, block in enumerate(self.network.blocks):
                h = block(h)
                proto, seen = self.prototypes.get(i)
                s = SF.compare(h, proto, self.cfg.loss, self.scales[i])
                scores.append(s.masked_fill(~seen, float("-inf")))
            if self.classifier:
                scores.append(self.network.head(h))
            return scores
