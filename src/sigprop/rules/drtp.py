"""Direct random target projection (``drtp``; Frenkel, Lefebvre & Bol 2021, "Learning
without feedback", ChFrenkel/DirectRandomTargetProjection).

Every hidden block learns from a fixed random projection of the one-hot *target* y*,
not of the error: the target is known before the forward pass, so a block's update
needs nothing from the blocks above it (update-unlocked, like sigprop). For block k with
pre-activation a_k, activity h_k = f(a_k) and input h_{k-1}:

    delta_k = (B_k^T y*) ⊙ f'(a_k)        dW_k = delta_k h_{k-1}^T     (summed over the batch)

``B_k`` (classes, values of the block's activity) is drawn once, U(±sqrt(6 / values)) as
the reference's kaiming_uniform_ on its (classes, *shape) hook matrix, kept as a buffer
(saved, never trained). A conv block's projection has the conv layer's output shape
(C, H, W), before its pooling, as the reference's hook. The output layer learns from
its own error: with ``drtp_output="sigmoid"`` (the paper's default) sigmoid outputs and
binary cross-entropy, delta = (sigmoid(a) - y*) / (n classes) (BCE's mean); with
``"softmax"`` the cross-entropy's (softmax(a) - y*) / n.

On the library's blocks, "f'(a_k)" is the Jacobian of the block up to its activation
(Linear or Conv2d -> BatchNorm -> LeakyReLU; rules/local_learning.split_block): the
projection enters at the activation's output and flows back through the block's own
modules only, as in DFA here. Dropout and pooling after the activation pass the
activity on to the next block and take no part in the update. The reference uses tanh
and no BatchNorm; the blocks are the library's, shared by every rule.

Where this differs from the reference: one Adam over all blocks (theirs SGD with
Nesterov momentum 0.9, lr 1e-4), so every rule here has the same optimizer; the hidden
signal is summed over the batch and the output error averaged, as the reference's hook
and loss, which Adam's per-parameter scaling makes immaterial.
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

DRTP_OUTPUT = Option(
    "drtp_output", str, "sigmoid", "drtp: the output layer's loss: sigmoid (sigmoid outputs "
    "and binary cross-entropy, the paper's) | softmax (cross-entropy)",
    choices=("sigmoid", "softmax"))


class TargetProjections(nn.Module):
    """The fixed random matrices B_k (classes, values of block k's activity), as buffers."""

    def __init__(self, shapes: list[tuple[int, ...]], num_classes: int) -> None:
        super().__init__()
        for k, shape in enumerate(shapes):
            d = math.prod(shape)
            bound = math.sqrt(6.0 / d)  # kaiming_uniform_ with fan_in = d (the reference's)
            self.register_buffer(f"B{k}", torch.empty(num_classes, d).uniform_(-bound, bound))
        self.shapes = shapes

    def signal(self, k: int, y: Tensor) -> Tensor:
        """(n, *shape_k): B_k^T y* for every sample, a row of B_k picked by its label."""
        B = getattr(self, f"B{k}")
        return B.index_select(0, y).view(len(y), *self.shapes[k])


@register_rule("drtp")
class DirectRandomTargetProjection(LearningRule):
    """DRTP (module docstring): each block from B_k^T y* alone, the head from its error."""
    # its step on channels-last maps / on NCHW: VGG8b 0.90, CONV 0.86
    # (docs/studies/fast-path.md)
    channels_last_pays = True

    options = (DRTP_OUTPUT,)
    exit_names: ClassVar[list[str]] = ["output"]
    layered = True

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        if isinstance(network, HopfieldNetwork):
            raise ConfigError("rule 'drtp' trains feedforward networks; a hopfield network's "
                              "state is the fixed point of its dynamics (ep-loopback, "
                              "ep-symmetric); use --network fc-<layers>x<width>, conv or vgg8b")
        super().__init__(network, num_classes, cfg)
        self.parts = [split_block(b) for b in network.blocks]
        ref = next(network.parameters())
        self.targets = TargetProjections(core_shapes(network, self.parts), num_classes).to(
            device=ref.device, dtype=ref.dtype)
        self.modules["targets"] = self.targets
        groups = {f"block{i + 1}": b.parameters() for i, b in enumerate(network.blocks)}
        groups["head"] = network.head.parameters()
        self.optimizer = make_grouped_adam(groups, cfg)
        self.optimizers = [self.optimizer] if self.optimizer is not None else []
        self._trainable = [p for p in self.modules.parameters() if p.requires_grad]
        self.sigmoid = self.opts.drtp_output == "sigmoid"

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        for p in self._trainable:
            p.grad = None
        h = x
        for k, (core, tail) in enumerate(self.parts):
            self._mark(f"block{k + 1}")
            a = core(h.detach())  # this block's graph only: nothing crosses
            if a.requires_grad:  # dL/dh_k := B_k^T y*, so dW_k = (B_k^T y* ⊙ f'(a_k)) h_{k-1}^T
                a.backward(self.targets.signal(k, y).to(a.dtype))
            with torch.no_grad():
                h = tail(a.detach())
        self._mark("head")
        logits = self.network.head(h)
        if self.sigmoid:
            onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
            loss = F.binary_cross_entropy_with_logits(logits, onehot)
        else:
            loss = F.cross_entropy(logits, y)
        if loss.requires_grad:
            loss.backward()
        self._mark("step")
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach().view(1), (logits.argmax(1) == y).sum().view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        return [self.network(x)]
