"""The Forward-Forward algorithm (``ff``; Hinton 2022, "The Forward-Forward Algorithm:
Some Preliminary Investigations", Sec. 3.3's supervised version; the numbers and
choices below follow its careful reproduction loeweX/Forward-Forward).

The label is part of the input: the first ``classes`` values of the flattened image are
replaced by its one-hot code. A positive sample carries its true label, a negative one
the same image with a wrong label drawn uniformly from the others. Each block learns
from its own loss on its activity h (the block's output after its activation, before its
dropout; rules/local_learning.split_block) for the batch of n positives and n negatives:

    goodness  G = sum_j h_j^2            logit = G - threshold x units
    loss      binary cross-entropy of the logit, 1 for positives, 0 for negatives,
              averaged over the 2n samples (+ peer normalisation, below)

loeweX's threshold is the layer's number of units (1 per unit); ours 0.5 per unit
(``ff_threshold``; BatchNorm fixes the blocks' scale, see the option's comment). The
input of every block, the image too, is length-normalised, h / sqrt(mean_j h_j^2)
(eps 1e-8): the next block cannot read the goodness off its input's length and must
use its direction. No gradient crosses a block boundary. Peer normalisation (loeweX's,
weight ``ff_peer_norm`` 0.03): a running mean of each unit's activity over the
positives (momentum 0.9, from 0.5) is pulled toward the layer's mean, so no unit stays
off or always on; the running means are buffers, saved and resumed.

Prediction (``ff_predict``): ``goodness`` (the paper's) runs the net once per label and
picks the label whose goodness, summed over every layer but the first (over the one
layer of a one-layer net), is highest: all labels in one batch of (classes x n) rows,
C times a forward pass. ``softmax`` (the paper's faster variant) trains a linear
classifier, no bias, from zero as loeweX, on the concatenated normalised activities of
every layer but the first for the input with a neutral label (every label value
1/classes), by cross-entropy on detached features: one forward pass to predict. It
sees those features as it will at test time, in evaluation mode (BatchNorm's running
statistics, no dropout), so that its pass leaves the statistics to the positives and
negatives.

Train accuracy of the goodness exit: the share of samples whose positive goodness
(summed over the scoring layers) beats their negative's; the prediction over every
label would cost classes forward passes per batch. Its test accuracy is the real
prediction. Per-layer losses and that separation are logged each epoch
(``ff_loss_layers``, ``ff_separation_layers``).

Fully connected networks only (fc-<layers>x<width>): the paper defines the label in the
input and a goodness per layer for fully connected layers (its conv experiments use
local receptive fields without weight sharing, not these nets); conv and vgg8b are
refused. The network's own head is unused. Where this differs from loeweX: the
library's blocks (Linear without bias -> BatchNorm over the 2n samples -> LeakyReLU,
theirs Linear -> ReLU with a straight-through gradient), and one Adam for every rule
(theirs SGD with momentum 0.9, lr 1e-3, weight decay 3e-4, the classifier at lr 1e-2,
and a linear cool-down over the second half). Pixels in [0, 1] by default
(``engine_defaults``): the label code is written as pixel values, as theirs.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..networks import Network
from ..networks.hopfield import HopfieldNetwork
from ..options import Option
from ..registry import register_rule
from .base import LearningRule, RuleConfig, make_grouped_adam
from .local_learning import core_shapes, split_block

EPS = 1e-8  # loeweX's, in the length normalisation
PEER_MOMENTUM = 0.9  # loeweX's running-mean momentum of peer normalisation
PEER_START = 0.5  # and the running means' start

# BatchNorm sets each unit's scale: LeakyReLU of a unit normal has mean square 0.5, so
# 0.5 per unit starts every layer at its threshold. loeweX's 1 per unit (its layers have
# no BatchNorm) leaves BatchNorm's gain to climb by Adam steps to cross it: test accuracy
# 0.63 against 0.76 after 3 epochs on 5,000 images (docs/studies/forward-forward.md)
FF_THRESHOLD = Option(
    "ff_threshold", float, 0.5, "ff: goodness threshold per unit: a layer's logit is "
    "sum(h^2) - threshold x units (0.5: the mean square of the BatchNorm blocks' "
    "activity at the start; loeweX/Forward-Forward's 1 is for layers without)",
    low=0.0, high=1e6)
FF_PEER_NORM = Option(
    "ff_peer_norm", float, 0.03, "ff: weight of the peer-normalisation loss (loeweX's 0.03; "
    "0: none)", low=0.0, high=1e6)
FF_PREDICT = Option(
    "ff_predict", str, "goodness", "ff: prediction: goodness (every label tried, the "
    "highest goodness over all layers but the first) | softmax (a linear classifier on "
    "the normalised activities with a neutral label: one pass)",
    choices=("goodness", "softmax"))


# --------------------------------------------------------------------------- the math


def normalise(h: Tensor) -> Tensor:
    """(n, d): each row divided by its root mean square (length sqrt(d))."""
    return h / (h.pow(2).mean(1, keepdim=True).sqrt() + EPS)


def embed_label(x: Tensor, code: Tensor) -> Tensor:
    """(n, d) flattened ``x`` with its first ``classes`` values replaced by ``code``
    (n, classes) (one-hot, or the neutral 1/classes)."""
    flat = x.flatten(1)
    return torch.cat([code.to(flat.dtype), flat[:, code.shape[1]:]], 1)


def wrong_labels(y: Tensor, num_classes: int) -> Tensor:
    """(n,) a label other than ``y``, uniform over the other ``num_classes - 1``."""
    shift = torch.randint(1, num_classes, y.shape, device=y.device)
    return (y + shift) % num_classes


def goodness(h: Tensor) -> Tensor:
    """(n,) the sum of squared activities of each row."""
    return h.pow(2).sum(1)


def ff_loss(h: Tensor, positive: Tensor, threshold: float) -> Tensor:
    """Binary cross-entropy of goodness - threshold x units against ``positive`` (n,)."""
    logits = goodness(h) - threshold * h.shape[1]
    return F.binary_cross_entropy_with_logits(logits, positive)


class PeerNorm(nn.Module):
    """Per layer, a running mean of each unit's activity over the positives (buffers)."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        for k, d in enumerate(widths):
            self.register_buffer(f"mean{k}", torch.full((d,), PEER_START))

    def loss(self, k: int, h_pos: Tensor) -> Tensor:
        """The squared distance of each unit's running mean from the layer's, averaged;
        the running mean moves to include ``h_pos`` (n, d) (the gradient flows through
        this batch's share, as loeweX's)."""
        buf = getattr(self, f"mean{k}")
        running = PEER_MOMENTUM * buf + (1 - PEER_MOMENTUM) * h_pos.mean(0)
        with torch.no_grad():
            buf.copy_(running)
        return (running.mean() - running).pow(2).mean()


# --------------------------------------------------------------------------- the rule


def check_fully_connected(network: Network, num_classes: int) -> None:
    """ConfigError unless every block is fully connected and the input holds more values
    than the label code."""
    if isinstance(network, HopfieldNetwork):
        raise ConfigError("rule 'ff' trains feedforward networks; a hopfield network's state "
                          "is the fixed point of its dynamics; use --network fc-<layers>x<width>")
    if any(isinstance(m, nn.Conv2d) for m in network.modules()):
        raise ConfigError(
            "rule 'ff' trains fully connected networks: Hinton (2022) defines the label in "
            "the input and the goodness per layer for fully connected layers; use --network "
            "fc-<layers>x<width> (e.g. fc-4x2000, the paper's MNIST net)")
    d = math.prod(network.input_shape)
    if d <= num_classes:
        raise ConfigError(f"rule 'ff' writes the label into the first {num_classes} input "
                          f"values; samples of {d} values leave no image; use larger inputs")


@register_rule("ff")
class ForwardForward(LearningRule):
    """Forward-Forward (module docstring): per block, goodness up for positives, down for
    negatives; prediction by goodness over every label, or a linear softmax."""

    options = (FF_THRESHOLD, FF_PEER_NORM, FF_PREDICT)
    layered = True
    # the label code is written as pixel values 0 and 1, on pixels in [0, 1] (loeweX's)
    engine_defaults: ClassVar[dict] = {"data.inputs": "unit"}

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        check_fully_connected(network, num_classes)
        super().__init__(network, num_classes, cfg)
        self.parts = [split_block(b) for b in network.blocks]
        widths = [math.prod(s) for s in core_shapes(network, self.parts)]
        # the scoring layers: all but the first (the paper's), or the only one
        self.scored = list(range(1, len(widths))) or [0]
        self.softmax = self.opts.ff_predict == "softmax"
        self.exit_names = ["softmax" if self.softmax else "goodness"]
        ref = next(network.parameters())
        self.peer = PeerNorm(widths).to(device=ref.device, dtype=ref.dtype)
        self.modules["peer"] = self.peer
        groups = {f"block{i + 1}": b.parameters() for i, b in enumerate(network.blocks)}
        if self.softmax:
            self.readout = nn.Linear(sum(widths[k] for k in self.scored), num_classes,
                                     bias=False, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.readout.weight)  # loeweX starts its classifier at zero
            self.modules["readout"] = self.readout
            groups["readout"] = self.readout.parameters()
        self.optimizer = make_grouped_adam(groups, cfg)
        self.optimizers = [self.optimizer] if self.optimizer is not None else []
        self._trainable = [p for p in self.modules.parameters() if p.requires_grad]
        # per layer: summed loss and positives above their negatives, over the epoch
        self._sums: Tensor | None = None
        self._seen = 0

    def _codes(self, labels: Tensor, like: Tensor) -> Tensor:
        return F.one_hot(labels, self.num_classes).to(like.dtype)

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for p in self._trainable:
            p.grad = None
        n = len(y)
        negative = wrong_labels(y, self.num_classes)
        z = torch.cat([embed_label(x, self._codes(y, x)),
                       embed_label(x, self._codes(negative, x))])  # (2n, d): positives first
        positive = torch.cat([torch.ones(n, device=x.device, dtype=z.dtype),
                              torch.zeros(n, device=x.device, dtype=z.dtype)])
        peer = self.opts.ff_peer_norm
        h = normalise(z)
        stats, score = [], torch.zeros(2 * n, device=x.device, dtype=z.dtype)
        for k, (core, tail) in enumerate(self.parts):
            self._mark(f"block{k + 1}")
            a = core(h).flatten(1)  # h holds no graph: this block's alone
            loss = ff_loss(a, positive, self.opts.ff_threshold)
            if peer > 0:
                loss = loss + peer * self.peer.loss(k, a[:n])
            if loss.requires_grad:
                loss.backward()
            with torch.no_grad():
                g = goodness(a)
                if k in self.scored:
                    score += g
                stats.append(torch.stack([loss.detach() * n,
                                          (g[:n] > g[n:]).sum().to(loss.dtype)]))
                h = normalise(tail(a.detach()).flatten(1))
        if self.softmax:
            self._mark("head")
            logits = self.readout(self._features(x))
            loss = F.cross_entropy(logits, y)
            loss.backward()
            out_loss, correct = loss.detach(), (logits.detach().argmax(1) == y).sum()
        else:
            out_loss = sum(s[0] for s in stats) / n
            correct = (score[:n] > score[n:]).sum()
        self._mark("step")
        if self.optimizer is not None:
            self.optimizer.step()
        step = torch.stack(stats).detach()
        self._sums = step if self._sums is None else self._sums + step
        self._seen += n
        return out_loss.view(1), correct.view(1)

    def _features(self, x: Tensor) -> Tensor:
        """(n, features): the neutral-label input's normalised activities of the scoring
        layers, concatenated, in evaluation mode, without a graph."""
        blocks = self.network.blocks
        was = blocks.training
        blocks.eval()
        try:
            with torch.no_grad():
                neutral = torch.full((len(x), self.num_classes), 1.0 / self.num_classes,
                                     device=x.device, dtype=x.dtype)
                h = normalise(embed_label(x, neutral))
                feats = []
                for k, (core, tail) in enumerate(self.parts):
                    a = core(h).flatten(1)
                    h = normalise(tail(a).flatten(1))
                    if k in self.scored:
                        feats.append(normalise(a))
                return torch.cat(feats, 1)
        finally:
            blocks.train(was)

    def goodness_scores(self, x: Tensor) -> Tensor:
        """(n, classes): per label, the goodness summed over the scoring layers with that
        label in the input, all labels in one batch of (classes x n) rows."""
        n, c = len(x), self.num_classes
        labels = torch.arange(c, device=x.device).repeat_interleave(n)  # (c n,): label-major
        h = normalise(embed_label(x.flatten(1).repeat(c, 1), self._codes(labels, x)))
        score = torch.zeros(c * n, device=x.device, dtype=h.dtype)
        for k, (core, tail) in enumerate(self.parts):
            a = core(h).flatten(1)
            if k in self.scored:
                score += goodness(a)
            h = normalise(tail(a).flatten(1))
        return score.view(c, n).T

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        if self.softmax:
            return [self.readout(self._features(x))]
        return [self.goodness_scores(x)]

    def epoch_metrics(self) -> dict:
        if self._sums is None:
            return {}
        per_layer = (self._sums / self._seen).tolist()  # one host read, at the epoch's end
        self._sums, self._seen = None, 0
        return {"ff_loss_layers": [round(s[0], 6) for s in per_layer],
                "ff_separation_layers": [round(s[1], 6) for s in per_layer]}
