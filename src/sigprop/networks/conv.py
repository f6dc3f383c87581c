"""Convolutional networks: Table VI's small CONV net and VGG8b (Tables I-IV).

Every conv block is ``Conv2d -> BatchNorm2d -> LeakyReLU(0.01) -> Dropout [-> MaxPool]``
(Sec. IV: batch normalisation before the activation, dropout after; the pooling the
architecture puts after this conv closes the block), so a local rule trains one conv
and the pooling after it as one unit, and the block's output is what the next block
reads. The conv has no bias: BatchNorm subtracts the batch mean right after it (as in
the fc blocks). Dropout is elementwise (sigprop's 16-bit-lane Dropout), where
anokland/local-loss drops whole channels (Dropout2d): with channel dropout sigprop's
blocks past the first did not learn on CONV (measured: docs/studies/target-dropout.md).

* ``vgg8b`` (Nøkland & Eidnes 2019, anokland/local-loss ``cfg['vgg8b']``):
  conv 3x3 (stride 1, padding 1) 128, 256, M, 256, 512, M, 512, M, 512, M ('M' a 2x2
  max-pool), then one fully connected block of 1024 and the classifier: 8 weight layers,
  7 blocks. ``vgg8b-<k>x`` multiplies every conv width by k (``vgg8b-2x``, Tables
  III/IV); the 1024 block stays.
* ``conv`` (Nøkland 2016, anokland/dfa-torch ``Models/conv.lua``): conv 5x5 (padding 2)
  96, 128, 256, each followed by a 3x3 max-pool of stride 2, then two fully connected
  blocks of 2048 and the classifier. The 2016 net used tanh (and BatchNorm only as an
  option); here every block follows the paper's Sec. IV recipe instead.

Both take 1- or 3-channel images; sizes shrink by the pools (32 px: VGG8b ends at 2x2,
CONV at 3x3; 28 px: 1x1 and 2x2), and an input too small for the pools is a ConfigError
before anything is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from ..registry import register_network
from .base import (
    LEAKY_SLOPE,
    Dropout,
    Network,
    _check_input_shape,
    check_dropout,
    check_parameter_memory,
)
from .fc import fc_block

VGG8B = (128, 256, "M", 256, 512, "M", 512, "M", 512, "M")
VGG8B_HIDDEN = 1024
CONV = (96, 128, 256)
CONV_HIDDEN = (2048, 2048)
MAX_WIDTH_FACTOR = 64


class Pool:
    """A max-pool's geometry (kernel, stride), for sizes before anything is built."""

    def __init__(self, kernel: int, stride: int) -> None:
        self.kernel, self.stride = kernel, stride

    def out(self, size: int) -> int:
        return (size - self.kernel) // self.stride + 1 if size >= self.kernel else 0

    def module(self) -> nn.MaxPool2d:
        return nn.MaxPool2d(self.kernel, self.stride)


def conv_block(c_in: int, c_out: int, kernel: int, padding: int, dropout: float,
               pool: Pool | None = None) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> LeakyReLU(0.01) -> Dropout -> [MaxPool]."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride=1, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(LEAKY_SLOPE),
    ]
    if dropout > 0:
        layers.append(Dropout(dropout))
    if pool is not None:
        layers.append(pool.module())
    return nn.Sequential(*layers)


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = _check_input_shape(input_shape)
    if len(shape) != 3:
        raise ConfigError(f"network {name} takes images (channels, height, width), got samples "
                          f"of shape {shape}; use an fc network for flat inputs")
    return shape  # type: ignore[return-value]


def _plan(name: str, shape: tuple[int, int, int], convs: Sequence[tuple[int, Pool | None]],
          kernel: int, padding: int, hidden: Sequence[int], num_classes: int
          ) -> tuple[int, int, int]:
    """Check that the pools fit the image and the parameters fit in memory; the last
    conv block's output shape (C, H, W)."""
    c, h, w = shape
    count = 0
    for i, (width, pool) in enumerate(convs):
        count += c * width * kernel * kernel + 2 * width  # conv, BatchNorm
        c = width
        h, w = (h, w) if pool is None else (pool.out(h), pool.out(w))
        if h < 1 or w < 1:
            pools = sum(p is not None for _, p in convs)
            raise ConfigError(
                f"network {name} does not fit {shape[1]}x{shape[2]} images: its {pools} "
                f"max-pools ({pool.kernel}x{pool.kernel}, stride {pool.stride}) leave no pixel "
                f"after conv block {i + 1}; use larger images (e.g. 28 or 32 px) or an fc "
                "network")
    d = c * h * w
    for width in hidden:
        count += d * width + 2 * width
        d = width
    count += d * num_classes + num_classes
    check_parameter_memory(count, name)
    return c, h, w


def _build(name: str, shape: tuple[int, int, int], convs: Sequence[tuple[int, Pool | None]],
           kernel: int, padding: int, hidden: Sequence[int], num_classes: int,
           dropout: float) -> Network:
    dropout = check_dropout(dropout)
    c, h, w = _plan(name, shape, convs, kernel, padding, hidden, num_classes)
    blocks: list[nn.Module] = []
    c_in = shape[0]
    for width, pool in convs:
        blocks.append(conv_block(c_in, width, kernel, padding, dropout, pool))
        c_in = width
    d = c * h * w
    for i, width in enumerate(hidden):
        blocks.append(fc_block(d, width, dropout, flatten=i == 0))  # (n, C, H, W) -> (n, d)
        d = width
    return Network(blocks, nn.Linear(d, num_classes), shape)


def _vgg_layers(cfg: Sequence[int | str], factor: int) -> list[tuple[int, Pool | None]]:
    """(width, pool after it) per conv of a VGG config ('M' pools the conv before)."""
    convs: list[tuple[int, Pool | None]] = []
    for item in cfg:
        if item == "M":
            width, _ = convs[-1]
            convs[-1] = (width, Pool(2, 2))
        else:
            convs.append((int(item) * factor, None))
    return convs


@register_network("vgg8b", usage="vgg8b, vgg8b-<k>x")
def vgg8b(arch: str, input_shape: Sequence[int], num_classes: int,
          dropout: float = 0.0) -> Network:
    """VGG8b (``arch`` empty), or with every conv width times k (``arch`` ``"<k>x"``)."""
    m = re.fullmatch(r"([0-9]{1,3})x", arch)
    if arch and (m is None or not 1 <= int(m.group(1)) <= MAX_WIDTH_FACTOR):
        raise ConfigError(f"bad network 'vgg8b-{arch}'; use vgg8b, or vgg8b-<k>x for conv "
                          f"widths times k (1 <= k <= {MAX_WIDTH_FACTOR}), e.g. vgg8b-2x")
    factor = int(m.group(1)) if m else 1
    name = "vgg8b" + (f"-{arch}" if arch else "")
    shape = _image_shape(name, input_shape)
    return _build(name, shape, _vgg_layers(VGG8B, factor), 3, 1, (VGG8B_HIDDEN,),
                  num_classes, dropout)


@register_network("conv")
def small_conv(arch: str, input_shape: Sequence[int], num_classes: int,
               dropout: float = 0.0) -> Network:
    """Table VI's CONV net (``arch`` must be empty)."""
    if arch:
        raise ConfigError(f"bad network 'conv-{arch}'; the CONV net of Table VI is 'conv'")
    shape = _image_shape("conv", input_shape)
    pool = Pool(3, 2)
    return _build("conv", shape, [(w, pool) for w in CONV], 5, 2, CONV_HIDDEN, num_classes,
                  dropout)


def conv_output_size(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    """Output size of a conv along one axis (for shape references in tests and docs)."""
    return math.floor((size + 2 * padding - kernel) / stride) + 1
