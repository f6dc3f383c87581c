"""Local learning with the predsim loss (Nøkland & Eidnes 2019, anokland/local-loss):
``ll-bp`` and its more biologically plausible variant ``ll-fa`` (their ``--bio``).

Every block learns from auxiliary losses on its own output, its input detached, with
the block and its auxiliaries in one Adam parameter group (the arithmetic of their one
optimizer per block; every group steps after the sweep, which is the same as stepping
each block right after its loss: no block's input depends on another's update within a
step). The head learns from the cross-entropy of the last block's detached output.

Per block, on ``h``: the block's output after its nonlinearity, before its dropout and
pooling (local-loss computes its losses there; a block that is not an ``nn.Sequential``
ending in [activation, dropout, pooling] is used whole):

* ``ll-bp``: pred = cross-entropy of a Linear classifier (initialised at zero) on ``h``,
  average-pooled to at most ``ll_features`` (2048) values for conv blocks (the
  pooling of functional.pool_kernel); sim = MSE between the similarity matrix of
  ``conv3x3(h)`` (conv blocks; a bias-free C -> C conv) or ``Linear(h)`` (fc blocks; bias-
  free d -> d) and that of the one-hot labels; loss = (1 - beta) pred + beta sim,
  beta = 0.99.
* ``ll-fa``: the classifier is a feedback-alignment Linear to 128 outputs, trained with
  binary cross-entropy against the sign bits of a fixed random projection of the label
  (``proj_y``, bias-free, never trained); sim compares the similarity matrix of ``h``
  itself (average-pooled for conv blocks) with that of the projected label; beta = 0.01.

Where this differs from local-loss: our conv blocks have no conv bias (BatchNorm
follows), dropout is elementwise (theirs Dropout2d), our blocks end with their max-pool
(theirs is a separate layer; the losses are taken before it either way). Early exits:
each block's auxiliary classifier (``ll-fa``: the class whose bit code its binary
logits fit best, functional.predsim.binary_scores) and the head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.predsim import binary_scores, pool_kernel, predsim_loss
from ..networks import Dropout, Network
from ..options import Option
from ..registry import register_rule
from .base import LearningRule, RuleConfig, make_grouped_adam
from .feedback_alignment import convert_fa

_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.GELU)
_TAIL = (Dropout, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d)
PROJ_SIZE = 128  # local-loss's --target-proj-size


def split_block(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(core, tail): the block up to its last activation, and the dropout and pooling
    after it (where local-loss takes its losses); (block, Identity) otherwise."""
    if isinstance(block, nn.Sequential):
        mods = list(block)
        k = len(mods)
        while k and isinstance(mods[k - 1], _TAIL):
            k -= 1
        if 0 < k < len(mods) and isinstance(mods[k - 1], _ACTIVATIONS):
            return nn.Sequential(*mods[:k]), nn.Sequential(*mods[k:])
    return block, nn.Identity()


@torch.no_grad()
def core_shapes(network: Network, parts: list[tuple[nn.Module, nn.Module]]
                ) -> list[tuple[int, ...]]:
    """Each block's output before its tail (``parts`` from :func:`split_block`): one
    dummy pass of two samples in eval mode, every module's training flag restored."""
    modules = list(network.modules())
    was = [m.training for m in modules]
    network.eval()
    try:
        ref = next(network.parameters())
        h = torch.zeros(2, *network.input_shape, device=ref.device, dtype=ref.dtype)
        shapes = []
        for core, tail in parts:
            h = core(h)
            shapes.append(tuple(h.shape[1:]))
            h = tail(h)
        return shapes
    finally:
        for m, t in zip(modules, was):
            m.training = t


class Auxiliary(nn.Module):
    """One block's auxiliary networks and its predsim loss."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, bio: bool, features: int
                 ) -> None:
        super().__init__()
        self.bio = bio
        conv = len(shape) == 3
        self.pool: nn.Module | None = None
        d = math.prod(shape)
        if conv:
            pk = pool_kernel(*shape, features)
            if pk is not None:
                (kh, kw), (ph, pw) = pk
                self.pool = nn.AvgPool2d((kh, kw), padding=(ph, pw))
                h, w = (shape[1] + 2 * ph - kh) // kh + 1, (shape[2] + 2 * pw - kw) // kw + 1
                d = shape[0] * h * w
        out = PROJ_SIZE if bio else num_classes
        decoder = nn.Linear(d, out)
        nn.init.zeros_(decoder.weight)  # local-loss starts its classifiers at zero
        if bio:
            nn.init.zeros_(decoder.bias)
            decoder = convert_fa(decoder)
        self.decoder = decoder
        self.sim: nn.Module | None = None
        if not bio:  # a learned map before the similarity matrix
            self.sim = (nn.Conv2d(shape[0], shape[0], 3, padding=1, bias=False) if conv
                        else nn.Linear(d, d, bias=False))
        if bio:  # the label's fixed random projection: sim target and binary pred target
            proj = nn.Linear(num_classes, PROJ_SIZE, bias=False)
            proj.requires_grad_(False)
            self.proj = proj

    def logits(self, h: Tensor) -> Tensor:
        pooled = self.pool(h) if self.pool is not None else h
        return self.decoder(pooled.flatten(1))

    def loss(self, h: Tensor, y: Tensor, num_classes: int, beta: float
             ) -> tuple[Tensor, Tensor]:
        """(predsim loss, the auxiliary classifier's logits) of block output ``h``."""
        logits = self.logits(h)
        onehot = F.one_hot(y, num_classes).to(h.dtype)
        if self.bio:
            code = self.proj(onehot)
            h_sim = self.pool(h) if self.pool is not None else h
        else:
            code = onehot
            h_sim = self.sim(h)
        return predsim_loss(logits, h_sim, y, code, beta, binary=self.bio), logits

    def scores(self, h: Tensor, num_classes: int) -> Tensor:
        """(n, classes) class scores of the auxiliary classifier (an early exit)."""
        logits = self.logits(h)
        if not self.bio:
            return logits
        codes = self.proj(torch.eye(num_classes, device=h.device, dtype=h.dtype))
        return binary_scores(logits, codes)


LL_BETA = Option("ll_beta", float, None, "ll-bp / ll-fa: the similarity share of the predsim "
                 "loss (default 0.99 / 0.01)", low=0.0, high=1.0, optional=True)
LL_FEATURES = Option("ll_features", int, 2048, "ll-bp / ll-fa: the most values an auxiliary "
                     "classifier reads", low=1, high=10**9)


class LocalLearning(LearningRule):
    """predsim local learning (module docstring); ``bio`` selects ``ll-fa``."""
    # its step on channels-last maps / on NCHW: VGG8b 0.87-0.89, CONV 0.82-0.84
    # (docs/studies/fast-path.md)
    channels_last_pays = True

    options = (LL_BETA, LL_FEATURES)
    layered = True
    bio = False
    default_beta = 0.99

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(network, num_classes, cfg)
        self.beta = self.default_beta if self.opts.ll_beta is None else self.opts.ll_beta
        self.parts = [split_block(b) for b in network.blocks]
        shapes = core_shapes(network, self.parts)
        self.aux = nn.ModuleList(Auxiliary(s, num_classes, self.bio, self.opts.ll_features)
                                 for s in shapes)
        self.modules["aux"] = self.aux
        groups = {f"block{i + 1}": [*b.parameters(), *a.parameters()]
                  for i, (b, a) in enumerate(zip(network.blocks, self.aux))}
        groups["head"] = network.head.parameters()
        self.optimizer = make_grouped_adam(groups, cfg)
        self.optimizers = [self.optimizer] if self.optimizer is not None else []
        self._trainable = [p for p in self.modules.parameters() if p.requires_grad]
        self.exit_names = [f"layer{i + 1}" for i in range(len(network.blocks))] + ["head"]

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for p in self._trainable:
            p.grad = None
        losses, logits_seen = [], []
        h = x
        for i, ((core, tail), aux) in enumerate(zip(self.parts, self.aux)):
            self._mark(f"block{i + 1}")
            out = core(h.detach())  # this block's graph only
            loss, logits = aux.loss(out, y, self.num_classes, self.beta)
            loss.backward()  # the block and its auxiliaries, nothing else
            with torch.no_grad():
                h = tail(out.detach())  # (an Identity tail would hand on out's graph)
                logits_seen.append(aux.scores(out, self.num_classes) if self.bio else logits)
            losses.append(loss.detach())
        self._mark("head")
        logits = self.network.head(h)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        losses.append(loss.detach())
        logits_seen.append(logits.detach())
        self._mark("step")
        if self.optimizer is not None:
            self.optimizer.step()
        correct = (torch.stack(logits_seen).argmax(2) == y).sum(1)
        return torch.stack(losses), correct

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        scores = []
        h = x
        for (core, tail), aux in zip(self.parts, self.aux):
            out = core(h)
            scores.append(aux.scores(out, self.num_classes))
            h = tail(out)
        scores.append(self.network.head(h))
        return scores


@register_rule("ll-bp")
class LocalLearningBP(LocalLearning):
    bio = False
    default_beta = 0.99


@register_rule("ll-fa")
class LocalLearningFA(LocalLearning):
    bio = True
    default_beta = 0.01
