"""Fully connected networks (Table VI): ``fc-<layers>x<width>``, e.g. ``fc-3x1000``."""

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

# fc-<layers>x<width>: hard caps, so that counting the parameters (and the list of
# blocks) stays small whatever the string says; memory is checked within them.
MAX_FC_DEPTH = 1000
MAX_FC_WIDTH = 10**12


def fc_block(d_in: int, d_out: int, dropout: float, flatten: bool = False) -> nn.Sequential:
    """[Flatten ->] Linear -> BatchNorm -> LeakyReLU(0.01) -> Dropout (Sec. IV order).

    The Linear has no bias: BatchNorm subtracts the batch mean right after it, so a
    bias there has an exactly zero gradient, and Adam would turn the ~1e-8 rounding
    noise of that zero into full-size (lr) steps of a parameter that does nothing.
    """
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []  # first block takes images
    layers += [
        nn.Linear(d_in, d_out, bias=False),
        nn.BatchNorm1d(d_out),
        nn.LeakyReLU(LEAKY_SLOPE),
    ]
    if dropout > 0:
        layers.append(Dropout(dropout))
    return nn.Sequential(*layers)


@register_network("fc", usage="fc-<layers>x<width>")
def fully_connected(
    arch: str, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0
) -> Network:
    """Table VI fully connected nets: ``arch`` is ``<layers>x<width>``, e.g. ``3x1000``.

    The size is checked before anything is allocated: at most MAX_FC_DEPTH layers and
    MAX_FC_WIDTH units, and the parameters must fit in memory while training.
    """
    depth, width = parse_fc_arch(arch)
    dropout = check_dropout(dropout)
    d_in = math.prod(_check_input_shape(input_shape))
    count = fc_parameter_count(depth, width, d_in, num_classes)
    check_parameter_memory(count, f"fc-{arch}")
    blocks = [
        fc_block(d_in if i == 0 else width, width, dropout, flatten=i == 0) for i in range(depth)
    ]
    return Network(blocks, nn.Linear(width, num_classes), input_shape)


def parse_fc_arch(arch: str) -> tuple[int, int]:
    """(layers, width) from ``<layers>x<width>``; ConfigError unless both are ASCII
    integers (``\\d`` would also match other scripts' digits, "٣") within the caps."""
    m = re.fullmatch(r"([0-9]+)x([0-9]+)", arch) if isinstance(arch, str) else None
    # digit counts first: int() of a huge string is slow (and refused past 4300 digits)
    if m and len(m.group(1).lstrip("0")) > len(str(MAX_FC_DEPTH)):
        depth = MAX_FC_DEPTH + 1
    elif m:
        depth = int(m.group(1))
    if m and len(m.group(2).lstrip("0")) > len(str(MAX_FC_WIDTH)):
        width = MAX_FC_WIDTH + 1
    elif m:
        width = int(m.group(2))
    if not m or depth < 1 or width < 1:
        raise ConfigError(
            f"bad fully connected architecture 'fc-{arch}'; expected e.g. fc-3x1000 "
            "(<layers>x<width>, positive ASCII integers)"
        )
    if depth > MAX_FC_DEPTH:
        raise ConfigError(
            f"fc-{arch} asks for {_count_digits(m.group(1))} layers, more than the "
            f"{MAX_FC_DEPTH} this builder makes; choose a smaller --network")
    if width > MAX_FC_WIDTH:
        raise ConfigError(
            f"fc-{arch} asks for layers of {_count_digits(m.group(2))} units, more than the "
            f"{MAX_FC_WIDTH:.0e} this builder makes; choose a smaller --network")
    return depth, width


def fc_parameter_count(depth: int, width: int, d_in: int, num_classes: int) -> int:
    """Parameters of ``fully_connected``: per block the Linear's weight and BatchNorm's
    weight and bias, then the head's weight and bias."""
    first = d_in * width + 2 * width
    rest = (depth - 1) * (width * width + 2 * width)
    return first + rest + width * num_classes + num_classes


def _count_digits(digits: str) -> str:
    digits = digits.lstrip("0") or "0"
    return digits if len(digits) <= 15 else f"a {len(digits)}-digit number of"
