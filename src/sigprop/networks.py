"""Networks: plain ``nn.Module`` stacks of blocks plus a classification head.

A network knows nothing of how it is trained. A learning rule sees
``network.blocks`` (the units it may train one at a time) and ``network.head``.
Builders are registered by family name; ``"fc-3x1000"`` is family ``fc`` with
architecture string ``3x1000``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import torch
from torch import nn

from . import resources
from .errors import ConfigError, SigpropError
from .registry import NETWORKS, register_network

LEAKY_SLOPE = 0.01  # Sec. IV: leaky ReLU with negative slope 0.01
# Dropout's mask compares 16-bit lanes with a threshold: p is rounded to a multiple of
# 1/65536, and at least one of the 65536 levels must keep the unit.
DROPOUT_LEVELS = 65536
MAX_DROPOUT = (DROPOUT_LEVELS - 1) / DROPOUT_LEVELS
# fc-<layers>x<width>: hard caps, so that counting the parameters (and the list of
# blocks) stays small whatever the string says; memory is checked within them.
MAX_FC_DEPTH = 1000
MAX_FC_WIDTH = 10**12
# training keeps per parameter: the weight, its gradient and Adam's two moments
TRAINING_COPIES = 4


class Network(nn.Module):
    """``blocks`` applied in order, then ``head`` (a classifier on the last block).

    ``input_shape`` is one sample's shape, e.g. (1, 28, 28); ``block_shapes`` holds
    each block's output shape and ``output_shape`` the head's (without batch), found
    by one dummy forward pass; a block or head that rejects its input raises
    ConfigError here, not at the first training step.
    """

    def __init__(
        self, blocks: Sequence[nn.Module], head: nn.Module, input_shape: Sequence[int]
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise ConfigError("a network needs at least one block; pass a list of modules")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = _check_input_shape(input_shape)
        self.block_shapes, self.output_shape = _infer_shapes(self.blocks, head,
                                                             self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """One sample's shape as a tuple of positive ints, else ConfigError."""
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = None
    if dims is None or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ConfigError(f"input_shape must be a sequence of positive integers (one "
                          f"sample's shape, e.g. (1, 28, 28)), got {input_shape!r}")
    return tuple(int(d) for d in dims)


@torch.no_grad()
def _infer_shapes(blocks: nn.ModuleList, head: nn.Module, input_shape: tuple[int, ...]
                  ) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Output shape of every block and of the head, from one pass of a dummy batch of
    two in eval mode (which leaves BatchNorm's running statistics alone); every
    module's training flag is restored after."""
    modules = [*blocks.modules(), *head.modules()]
    was_training = [m.training for m in modules]
    blocks.eval()
    head.eval()
    try:
        ref = next((p for p in blocks.parameters() if p.is_floating_point()), None)
        x = torch.zeros(2, *input_shape, device=ref.device if ref is not None else "cpu",
                        dtype=ref.dtype if ref is not None else None)
        shapes = []
        for block in blocks:
            try:
                x = block(x)
            except SigpropError:
                raise
            except (RuntimeError, ValueError) as err:
                raise ConfigError(
                    f"block {len(shapes) + 1} does not accept input of shape "
                    f"{tuple(x.shape[1:])}: {_first_line(err)}; check the blocks' sizes"
                ) from None
            shapes.append(tuple(x.shape[1:]))
        try:
            out = head(x)
        except SigpropError:
            raise
        except (RuntimeError, ValueError) as err:
            raise ConfigError(_head_mismatch(head, len(shapes), shapes[-1], err)) from None
    finally:
        for m, t in zip(modules, was_training):
            m.training = t
    return shapes, tuple(out.shape[1:])


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _head_mismatch(head: nn.Module, k: int, shape: tuple[int, ...], err: BaseException) -> str:
    """The message for a head that rejects the last block's output: both sizes."""
    linear = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    size = math.prod(shape)
    if linear is not None:
        return (f"head {type(head).__name__} takes {linear.in_features} input features, but "
                f"block {k} (the last) outputs {size} per sample (shape {shape}); make the "
                f"head's first Linear take {size} features")
    return (f"head {type(head).__name__} does not accept block {k}'s output of shape "
            f"{shape} ({size} values per sample): {_first_line(err)}; make the head take "
            "that shape")

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
        self.p = check_dropout(p)
        self._cut = round(self.p * DROPOUT_LEVELS)  # drop where the 16-bit lane, as unsigned, < cut

    def extra_repr(self) -> str:
        return f"p={self.p}"

    @property
    def active(self) -> bool:
        return self.training and self._cut > 0

    @property
    def scale(self) -> float:
        """The factor 1/(1-p) applied to kept elements (p as rounded)."""
        return DROPOUT_LEVELS / (DROPOUT_LEVELS - self._cut)

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


def check_dropout(p: object) -> float:
    """``p`` as a float if it is a dropout probability sigprop's Dropout can draw: a
    finite number in [0, 1) that leaves at least 1/65536 kept (p is rounded to a
    multiple of 1/65536; p = 0.9999999 would round to 1 and keep nothing)."""
    wrong = None
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        wrong = f"got {p!r} ({type(p).__name__})"
    elif not (math.isfinite(float(p)) and 0.0 <= float(p) < 1.0):
        wrong = f"got {p!r}"
    elif round(float(p) * DROPOUT_LEVELS) >= DROPOUT_LEVELS:
        wrong = f"got {p!r}, which rounds to 1 at the 1/{DROPOUT_LEVELS} steps of the mask"
    if wrong is not None:
        raise ConfigError(
            f"dropout must be a number in [0, 1) that keeps at least 1/{DROPOUT_LEVELS} of "
            f"the units, {wrong}; choose a p in [0, {MAX_DROPOUT:.6f}]")
    return float(p)


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


@register_network("fc")
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
    per_value = torch.finfo(torch.get_default_dtype()).bits // 8
    resources.check_fits(
        TRAINING_COPIES * per_value * count,
        f"network fc-{arch}: {_count(count)} parameters (weights, gradients and Adam's "
        "two moments)",
        "choose a smaller --network",
    )
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


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**9 else f"{n:.2e}"


def _count_digits(digits: str) -> str:
    digits = digits.lstrip("0") or "0"
    return digits if len(digits) <= 15 else f"a {len(digits)}-digit number of"


def build_network(
    name: str, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0
) -> Network:
    """Build a registered network from ``family-arch`` (e.g. ``fc-2x800``)."""
    if not isinstance(name, str):
        raise ConfigError(f"network name must be a string like 'fc-3x1000', got {name!r}")
    dropout = check_dropout(dropout)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}; "
                          "pass the number of classes of the dataset")
    family, _, arch = name.partition("-")
    builder = NETWORKS.get(family)
    return builder(arch, input_shape, int(num_classes), dropout=dropout)
