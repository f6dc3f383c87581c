"""Networks: plain ``nn.Module`` stacks of blocks plus a classification head, built by
registered name (``build_network("vgg8b", (3, 32, 32), 10, dropout=0.1)``).

    base.py   Network, build_network, Dropout (shared pieces)
    batchnorm.py  BatchNorm with statistics from the inputs only (Sec. III-D)
    fc.py     fc-<layers>x<width> (Table VI)
    conv.py   conv (Table VI's CONV), vgg8b, vgg8b-2x (Tables I-IV)
    hopfield.py  hopfield-<D>x<W> (Sec. V)
    spiking.py   snn-conv: integrate-and-fire blocks, time-major (Sec. VI)
"""

from . import conv, fc, hopfield, spiking  # noqa: F401  (registration side effects)
from .base import (
    DROPOUT_LEVELS,
    LEAKY_SLOPE,
    MAX_DROPOUT,
    TRAINING_COPIES,
    Dropout,
    Network,
    build_network,
    check_dropout,
    check_parameter_memory,
    dropout_spared_from,
    dropout_spares_rows_from,
)
from .fc import (
    MAX_FC_DEPTH,
    MAX_FC_WIDTH,
    fc_block,
    fc_parameter_count,
    fully_connected,
    parse_fc_arch,
)

__all__ = [
    "DROPOUT_LEVELS", "LEAKY_SLOPE", "MAX_DROPOUT", "MAX_FC_DEPTH", "MAX_FC_WIDTH",
    "TRAINING_COPIES", "Dropout", "Network", "build_network", "check_dropout",
    "check_parameter_memory", "dropout_spared_from", "dropout_spares_rows_from", "fc_block",
    "fc_parameter_count", "fully_connected",
    "parse_fc_arch",
]
