"""Spiking networks (Sec. VI): integrate-and-fire blocks, time-major, ``snn-conv``.

``snn-conv`` is the paper's 4-layer convolutional SNN (Sec. VI-A): two blocks of
Conv -> BatchNorm -> IF -> 2x2 max-pool, a fully connected block, and the classification
layer, whose output is averaged over the ``T = 4`` time steps. The paper gives neither
widths nor kernels; we take SpikingJelly's convolutional Fashion-MNIST SNN, which the
paper's description matches (3x3 convolutions of 128 channels, padding 1, no conv bias;
a 2048-unit fully connected layer, 128 * 4 * 4 in that code). Our fully connected block
also has a BatchNorm (Linear without bias -> BatchNorm1d -> IF), as the conv blocks: the
paper names BatchNorm for the conv layers only; with it the block's voltage scale does
not depend on how many of its 6,272 inputs spike, which the sigprop models' threshold of
0.5 and BP's of 1.0 both rely on.

Every tensor between blocks is time-major, ``[T, N, ...]`` (SpikingJelly's multi-step
convention); ``network.block_shapes`` hold one sample's ``(T, ...)``. The network is fed
still images ``(N, C, H, W)``: the first block's convolution and BatchNorm run once and
its neurons receive the same current at every step; later blocks run their synapses on
all ``T`` steps in one call (``[T * N, ...]``, the weights do not change within a
sequence) and only the neurons step through time. The membrane voltage is kept in
float32 under 16-bit autocast (spikes are exact in any precision; voltages summed in
bf16 would lose the threshold's resolution).

The threshold (a buffer, saved with the weights) is 1.0 at construction, the paper's
value for BP and Shallow; the sigprop rules set 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import spiking as SNN
from ..registry import register_network
from .base import Network, check_parameter_memory
from .batchnorm import input_stats_norm
from .conv import _image_shape

TIME_STEPS = 4  # Sec. VI-A: "All models is simulated for 4 time-steps"
SNN_CONV = (128, 128)  # conv widths (3x3, padding 1), each followed by a 2x2 max-pool
SNN_HIDDEN = 2048
BP_THRESHOLD = 1.0  # Sec. VI-A: 1.0 for BP and Shallow, 0.5 for sigprop
SP_THRESHOLD = 0.5


class IFNode(nn.Module):
    """Multi-step integrate-and-fire neurons (Eq. 15), hard reset to 0, time-major.

    ``forward(h)`` takes ``[T, N, ...]`` currents (or one ``[N, ...]`` current and
    ``steps``) and returns the spikes ``[T, N, ...]``; :meth:`run` also returns the
    charged voltages. The spike's gradient is the arctan surrogate (Eq. 17).
    """

    def __init__(self, threshold: float = BP_THRESHOLD) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def run(self, h: Tensor, steps: int | None = None, detach_carry: bool = False
            ) -> tuple[Tensor, Tensor]:
        """(spikes, charged voltages), both ``[T, N, ...]``; voltages float32, spikes
        float32 where they carry a gradient, else bool (module docstring)."""
        if h.dtype in (torch.float16, torch.bfloat16):  # 16-bit currents: float32 voltages
            h = h.float()
        return SNN.if_run(h, self.threshold, steps, bptt=not detach_carry)

    def forward(self, h: Tensor, steps: int | None = None) -> Tensor:
        s = self.run(h, steps)[0]
        return s if s.dtype != torch.bool else s.to(_compute_dtype(h))

    def extra_repr(self) -> str:
        return f"threshold={float(self.threshold):g}, v_reset=0, surrogate=atan(alpha=2)"


def _compute_dtype(like: Tensor) -> torch.dtype:
    """The dtype the next synapse computes in: autocast's where it is on, else float32."""
    kind = like.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.float32


def _or_pool(s: Tensor) -> Tensor:
    """2x2 max-pool (stride 2, floor) of bool spikes ``[T, N, C, H, W]``: a logical or."""
    t, n, c, h, w = s.shape
    h2, w2 = h // 2, w // 2
    if (h, w) != (2 * h2, 2 * w2):
        s = s[..., :2 * h2, :2 * w2]
    return s.reshape(t, n, c, h2, 2, w2, 2).any(6).any(4)


class SpikingBlock(nn.Module):
    """Synapse (Conv2d or Linear, no bias) -> BatchNorm -> IF -> [2x2 max-pool].

    ``first``: fed still images ``(N, C, H, W)``; the synapse and BatchNorm run once and
    the neurons see that current for ``steps`` steps. Otherwise fed ``[T, N, ...]``
    spikes (``flatten``: an fc block flattens ``[T, N, C, H, W]`` to ``[T, N, D]``).
    """

    def __init__(self, synapse: nn.Module, norm: nn.Module, pool: bool, first: bool,
                 steps: int = TIME_STEPS, flatten: bool = False) -> None:
        super().__init__()
        self.synapse, self.norm = synapse, norm
        self.node = IFNode()
        self.pool = nn.MaxPool2d(2) if pool else None
        self.first, self.steps, self.flatten = first, steps, flatten

    def charge(self, x: Tensor, n: int | None = None) -> Tensor:
        """The current ``h`` into the neurons: ``(B, ...)`` for a first block (the same
        at every step), else ``[T, B, ...]``; BatchNorm's statistics from the first
        ``n`` samples (all if None)."""
        if self.first:
            z = self.synapse(x)
            if n is None or n >= z.shape[0] or not self.norm.training:
                return self.norm(z)
            return input_stats_norm(self.norm, z, n)
        if self.flatten:
            x = x.flatten(2)
        t, b = x.shape[:2]
        z = self.synapse(x.flatten(0, 1))
        if n is None or n >= b or not self.norm.training:
            return self.norm(z).unflatten(0, (t, b))
        # Sec. III-D: statistics from the inputs only; in the step-major [T * B, ...]
        # batch they are the first n samples of every step
        return input_stats_norm(self.norm, z, n, steps=t).unflatten(0, (t, b))

    def run(self, x: Tensor, n: int | None = None, detach_carry: bool = False,
            extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(output spikes ``[T, B, ...]`` after pooling, charged voltages ``[T, B, ...]``
        before firing). ``extra``: currents of more rows, appended to ``x``'s after its
        synapse and BatchNorm (a first block's targets made as currents)."""
        h = self.charge(x, n)
        if extra is not None:
            h = torch.cat([h, extra.to(h.dtype)])
        spikes, charged = self.node.run(h, self.steps if self.first else None, detach_carry)
        if spikes.dtype == torch.bool:  # no gradient: pool as a logical or, 1 byte a value
            if self.pool is not None:
                spikes = _or_pool(spikes)
            return spikes.to(_compute_dtype(h)), charged
        if self.pool is not None:
            spikes = F.max_pool2d(spikes.flatten(0, 1), 2).unflatten(0, spikes.shape[:2])
        return spikes, charged

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]


class TimeAveragedHead(nn.Module):
    """The classification layer on ``[T, N, D]`` spikes, its output averaged over T."""

    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, num_classes)

    def forward(self, s: Tensor) -> Tensor:
        return self.linear(s).mean(0)


class SpikingNetwork(Network):
    """A :class:`Network` of :class:`SpikingBlock` s, time-major between blocks."""

    time_major = True

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module,
                 input_shape: Sequence[int], steps: int) -> None:
        super().__init__(blocks, head, input_shape)
        self.steps = steps

    def nodes(self) -> list[IFNode]:
        return [m for m in self.modules() if isinstance(m, IFNode)]

    def set_threshold(self, threshold: float) -> None:
        """Every IF neuron's firing threshold."""
        for node in self.nodes():
            node.threshold.fill_(float(threshold))


@register_network("snn", usage="snn-conv")
def snn(arch: str, input_shape: Sequence[int], num_classes: int,
        dropout: float = 0.0) -> SpikingNetwork:
    """``snn-conv``: the convolutional SNN of Sec. VI (module docstring)."""
    if arch != "conv":
        raise ConfigError(f"bad network 'snn-{arch}'; the spiking network of Sec. VI is "
                          "'snn-conv'")
    if dropout:
        raise ConfigError("snn-conv has no dropout (Sec. VI-A uses none); set --dropout 0 (a rule "
                          "may default to dropout: pepita does)")
    c, h, w = _image_shape("snn-conv", input_shape)
    if h < 4 or w < 4:
        raise ConfigError(f"network snn-conv does not fit {h}x{w} images: its two 2x2 "
                          "max-pools need at least 4x4 pixels; use 28 or 32 px images")
    count = c * SNN_CONV[0] * 9 + SNN_CONV[0] * SNN_CONV[1] * 9 + 2 * sum(SNN_CONV)
    d = SNN_CONV[-1] * (h // 4) * (w // 4)
    count += d * SNN_HIDDEN + 2 * SNN_HIDDEN + SNN_HIDDEN * num_classes + num_classes
    check_parameter_memory(count, "snn-conv")
    blocks: list[nn.Module] = []
    c_in = c
    for i, width in enumerate(SNN_CONV):
        blocks.append(SpikingBlock(nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(width), pool=True, first=i == 0))
        c_in = width
    blocks.append(SpikingBlock(nn.Linear(d, SNN_HIDDEN, bias=False),
                               nn.BatchNorm1d(SNN_HIDDEN), pool=False, first=False,
                               flatten=True))
    return SpikingNetwork(blocks, TimeAveragedHead(SNN_HIDDEN, num_classes), (c, h, w),
                          TIME_STEPS)
