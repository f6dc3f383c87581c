"""What every network is: ``Network`` (blocks + head), the registry lookup
``build_network``, and the pieces the builders share (the 16-bit-lane ``Dropout``).

A network knows nothing of how it is trained. A learning rule sees
``network.blocks`` (the units it may train one at a time) and ``network.head``.
Builders are registered by family name; ``"fc-3x1000"`` is family ``fc`` with
architecture string ``3x1000``, ``"vgg8b-2x"`` family ``vgg8b`` with ``2x``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from .. import resources
from ..errors import ConfigError, SigpropError
from ..registry import NETWORKS

LEAKY_SLOPE = 0.01  # Sec. IV: leaky ReLU with negative slope 0.01
# Dropout's mask compares 16-bit lanes with a threshold: p is rounded to a multiple of
# 1/65536, and at least one of the 65536 levels must keep the unit.
DROPOUT_LEVELS = 65536
MAX_DROPOUT = (DROPOUT_LEVELS - 1) / DROPOUT_LEVELS
# training keeps per parameter: the weight, its gradient and Adam's two moments
TRAINING_COPIES = 4


class Network(nn.Module):
    """``blocks`` applied in order, then ``head`` (a classifier on the last block).

    ``input_shape`` is one sample's shape, e.g. (1, 28, 28); ``block_shapes`` holds
    each block's output shape and ``output_shape`` the head's (without batch), found
    by one dummy forward pass; a block or head that rejects its input raises
    ConfigError here, not at the first training step. ``time_major`` networks pass
    ``[T, N, ...]`` between blocks (spiking nets); their block shapes are ``(T, ...)``.
    """

    time_major: bool = False

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
                                                             self.input_shape, self.time_major)

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
def _infer_shapes(blocks: nn.ModuleList, head: nn.Module, input_shape: tuple[int, ...],
                  time_major: bool = False) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
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
            shapes.append((x.shape[0], *x.shape[2:]) if time_major else tuple(x.shape[1:]))
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

# rows from this index on (a sigprop batch's target rows) pass Dropout unchanged
_SPARED_FROM: ContextVar[int | None] = ContextVar("sigprop_dropout_spared_from", default=None)


@contextmanager
def dropout_spares_rows_from(n: int | None) -> Iterator[None]:
    """Within this context every sigprop ``Dropout`` drops only rows ``[:n]`` of its
    input and passes the rest unchanged (not scaled either: as in eval mode). Sigprop
    uses it for ``target_dropout='off'``: the inputs are regularised, the targets stacked
    after them are not. ``None``: every row is dropped (the default)."""
    token = _SPARED_FROM.set(n)
    try:
        yield
    finally:
        _SPARED_FROM.reset(token)


def dropout_spared_from() -> int | None:
    """The first row Dropout spares in this context (None: it spares none)."""
    return _SPARED_FROM.get()


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving only the 1-byte mask for backward (not a float copy).

    The mask multiplies as uint8: a float x bool product converts element by element and
    is several times slower (measured: docs/studies/fast-path.md).
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


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D ``x`` is laid out channels-last (NHWC in memory) and not also NCHW
    (a map with one channel or one position is both)."""
    return x.dim() == 4 and not x.is_contiguous() \
        and x.is_contiguous(memory_format=torch.channels_last)


def laid_out_as(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous, e.g. just drawn in (C, H, W) order) laid out as ``ref``: random
    draws made so are the same values whatever ``ref``'s layout (``*_like`` draws fill
    the storage in memory order)."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last(ref) else t


class Dropout(nn.Module):
    """Inverted dropout with a mask from 16-bit random draws.

    Same contract as ``nn.Dropout`` (zero each element with probability ``p``, scale
    the rest by 1/(1-p); identity in eval mode). One full-range 64-bit draw feeds four
    16-bit lanes, each compared with a threshold: ``nn.Dropout``'s per-element
    ``bernoulli_`` cost more than the layer's matmul on a CPU (measured:
    docs/studies/fast-path.md). ``p`` is rounded to a multiple of 1/65536.
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
        """A bool mask shaped (and laid out) like ``x``, True with probability 1 - p;
        drawn in ``x``'s memory order."""
        words = (x.numel() + 3) // 4
        # from = int64 min, to = None: all 64 bits uniform (ATen's full-range kernel)
        bits = torch.empty(words, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        lanes = bits.view(torch.int16)[: x.numel()]  # uniform in [-2^15, 2^15)
        # compared flat (a channels-last 4-d comparison took 2.4x as long) into uint8,
        # then viewed as bool: ~5x faster than a bool result (docs/studies/fast-path.md)
        keep = torch.ge(lanes, self._cut - 32768, out=torch.empty_like(lanes, dtype=torch.uint8))
        if channels_last(x):
            n, c, h, w = x.shape  # channels-last maps: the mask in their memory order
            return keep.view(n, h, w, c).permute(0, 3, 1, 2).view(torch.bool)
        return keep.view(x.shape).view(torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        keep = self.keep_mask(x)  # drawn for every row: the same draws either way
        n = _SPARED_FROM.get()
        if n is None or n >= x.shape[0]:
            return _MaskedScale.apply(x, keep, self.scale)
        return torch.cat([_MaskedScale.apply(x[:n], keep[:n], self.scale), x[n:]])


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
    net = builder(arch, input_shape, int(num_classes), dropout=dropout)
    if not isinstance(net, Network):  # a plugin's builder (the built-in ones return one)
        raise ConfigError(f"network builder {family!r} ({getattr(builder, '__module__', '?')}) "
                          f"returned a {type(net).__name__}, not a sigprop.Network; fix the "
                          "builder or uninstall its plugin")
    return net


def check_parameter_memory(count: int, name: str) -> None:
    """Refuse a network whose training state (weights, gradients, Adam's moments) of
    ``count`` parameters cannot fit, before anything is allocated."""
    per_value = torch.finfo(torch.get_default_dtype()).bits // 8
    resources.check_fits(
        TRAINING_COPIES * per_value * count,
        f"network {name}: {_count(count)} parameters (weights, gradients and Adam's "
        "two moments)",
        "choose a smaller --network",
    )


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**9 else f"{n:.2e}"
