"""Layered continuous Hopfield networks (Sec. V): ``hopfield-<D>x<W>``, D hidden layers of
W units and an output layer of one unit per class, for the equilibrium-propagation
rules (``ep-loopback``, ``ep-symmetric``, :mod:`sigprop.rules.equilibrium`).

The network holds the weights as plain Linear layers: ``blocks[l]`` maps layer l's
source to layer l (its weight's transpose is the (in, out) matrix of the dynamics, its
bias the layer's bias), ``head`` maps the last hidden layer to the output units. Its
``forward`` is one feedforward sweep of those maps, which is not how such a network
computes: its state is the fixed point the EP rules relax to. Weights start as in
Scellier & Bengio 2017: Glorot-uniform, biases zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from ..registry import register_network
from .base import Network, _check_input_shape, check_parameter_memory
from .fc import parse_fc_arch


class HopfieldNetwork(Network):
    """A :class:`Network` whose blocks are the layers of a continuous Hopfield net."""

    def linears(self) -> list[nn.Linear]:
        """The weight of every layer, input to output (the head last)."""
        return [b[-1] for b in self.blocks] + [self.head]


def _glorot(layer: nn.Linear) -> nn.Linear:
    bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)
    return layer


@register_network("hopfield", usage="hopfield-<layers>x<units>")
def hopfield(arch: str, input_shape: Sequence[int], num_classes: int,
             dropout: float = 0.0) -> HopfieldNetwork:
    """``hopfield-<D>x<W>`` (e.g. hopfield-2x1500); dropout is not part of the model."""
    if dropout:
        raise ConfigError("hopfield networks have no dropout (the dynamics relax to a fixed "
                          "point); set --dropout 0 (a rule may default to dropout: pepita does)")
    try:
        depth, width = parse_fc_arch(arch)
    except ConfigError:
        raise ConfigError(f"bad network 'hopfield-{arch}'; expected hopfield-<layers>x<units>, "
                          "e.g. hopfield-2x1500") from None
    d_in = math.prod(_check_input_shape(input_shape))
    count = d_in * width + width + (depth - 1) * (width * width + width) \
        + width * num_classes + num_classes
    check_parameter_memory(count, f"hopfield-{arch}")
    blocks = [nn.Sequential(nn.Flatten(), _glorot(nn.Linear(d_in, width)))]
    blocks += [nn.Sequential(_glorot(nn.Linear(width, width))) for _ in range(depth - 1)]
    return HopfieldNetwork(blocks, _glorot(nn.Linear(width, num_classes)), input_shape)
