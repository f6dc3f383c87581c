"""Networks: plain ``nn.Module`` stacks of blocks plus a classification head.

A network knows nothing of how it is trained. A learning rule sees
``network.blocks`` (the units it may train one at a time) and ``network.head``.
Builders are registered by family name; ``"fc-3x1000"`` is family ``fc`` with
architecture string ``3x1000``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .registry import NETWORKS, register_network

LEAKY_SLOPE = 0.01  # Sec. IV: leaky ReLU with negative slope 0.01


class Network(nn.Module):
    """``blocks`` applied in order, then ``head`` (a classifier on the last block).

    ``input_shape`` is one sample's shape, e.g. (1, 28, 28); ``block_shapes`` holds
    each block's output shape (without batch), found by one dummy forward pass.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], head: nn.Module, input_shape: Sequence[int]
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ConfigError("a network needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = tuple(int(s) for s in input_shape)
        self.block_shapes = _infer_shapes(self.blocks, self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@torch.no_grad()
def _infer_shapes(blocks: nn.ModuleList, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    was_training = [m.training for m in blocks]
    blocks.eval()  # BN in eval mode accepts a tiny batch and leaves running stats alone
    try:
        param = next(blocks.parameters(), None)
        x = torch.zeros(2, *input_shape, device=param.device if param is not None else "cpu")
        shapes = []
        for block in blocks:
            try:
                x = block(x)
            except RuntimeError as err:
                raise ConfigError(
                    f"block {len(shapes) + 1} does not accept input of shape "
                    f"{tuple(x.shape[1:])}: {str(err).splitlines()[0]}"
                ) from None
            shapes.append(tuple(x.shape[1:]))
    finally:
        for m, t in zip(blocks, was_training):
            m.train(t)
    return shapes


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the 1-byte mask for backward (not a float copy).

    The mask multiplies as uint8: on this CPU a float x bool product took 0.27 ms on a
    (138, 1000) batch, float x uint8 0.06 ms (the bool path converts element by element).
    """

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep.view(torch.uint8)).mul_(scale)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return torch.mul(g, keep.view(torch.uint8)).mul_(ctx.scale), None, None


class Dropout(nn.Module):
    """Inverted dropout with a mask from 16-bit random draws.

    Same contract as ``nn.Dropout`` (zero each element with probability ``p``, scale
    the rest by 1/(1-p); identity in eval mode), but ``nn.Dropout``'s per-element
    ``bernoulli_`` cost 1.9 ms on a (138, 1000) batch on this CPU, more than the
    layer's matmul (1.3 ms). Here one full-range 64-bit draw feeds four 16-bit lanes,
    each compared with a threshold: about 0.3 ms with the multiply. ``p`` is rounded
    to a multiple of 1/65536.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self._cut = round(p * 65536)  # drop where the 16-bit lane, as unsigned, < cut

    def extra_repr(self) -> str:
        return f"p={self.p}"

    @property
    def active(self) -> bool:
        return self.training and self._cut > 0

    @property
    def scale(self) -> float:
        """The factor 1/(1-p) applied to kept elements (p as rounded)."""
        return 65536.0 / (65536 - self._cut)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """A bool mask shaped like ``x``, True with probability 1 - p."""
        words = (x.numel() + 3) // 4
        # from = int64 min, to = None: all 64 bits uniform (ATen's full-range kernel)
        bits = torch.empty(words, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        lanes = bits.view(torch.int16)[: x.numel()].view(x.shape)  # uniform in [-2^15, 2^15)
        # compared into uint8, then viewed as bool: 19 us against 100 us for a bool
        # result on a (138, 1000) batch on this CPU (one thread)
        keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        return torch.ge(lanes, self._cut - 32768, out=keep).view(torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return _MaskedScale.apply(x, self.keep_mask(x), self.scale)


def fc_block(d_in: int, d_out: int, dropout: float, flatten: bool = False) -> nn.Sequential:
    """[Flatten ->] Linear -> BatchNorm -> LeakyReLU(0.01) -> Dropout (Sec. IV order)."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []  # first block takes images
    layers += [
        nn.Linear(d_in, d_out),
        nn.BatchNorm1d(d_out),
        nn.LeakyReLU(LEAKY_SLOPE),
    ]
    if dropout > 0:
        layers.append(Dropout(dropout))
    return nn.Sequential(*layers)


@register_network("fc")
def fully_connected(
    arch: str, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0
) -> Network:
    """Table VI fully connected nets: ``arch`` is ``<layers>x<width>``, e.g. ``3x1000``."""
    m = re.fullmatch(r"(\d+)x(\d+)", arch)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(
            f"bad fully connected architecture 'fc-{arch}'; expected e.g. fc-3x1000 "
            "(<layers>x<width>)"
        )
    depth, width = int(m.group(1)), int(m.group(2))
    d_in = math.prod(input_shape)
    blocks = [
        fc_block(d_in if i == 0 else width, width, dropout, flatten=i == 0) for i in range(depth)
    ]
    return Network(blocks, nn.Linear(width, num_classes), input_shape)


def build_network(
    name: str, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0
) -> Network:
    """Build a registered network from ``family-arch`` (e.g. ``fc-2x800``)."""
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    family, _, arch = name.partition("-")
    builder = NETWORKS.get(family)
    return builder(arch, input_shape, num_classes, dropout=dropout)
