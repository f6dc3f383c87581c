"""How targets travel through a block beside the inputs: one object per way.

    OUTPUT  block 1 with a dense generator (Eq. 1): the block takes the inputs alone and
            the generator makes the targets at its output; stacked rows after it
    ROWS    targets shaped like the inputs' rows go through the block with them as one
            batch [h; t] of n + m rows (BatchNorm statistics from the inputs)
    WINDOW  block 1 (a conv) with sparse targets (Sec. III-E): each class's kernel window,
            taken once by the conv; fields after it
    FIELD   constant fields through conv blocks (sparse.py); a Flatten lays them out as rows

Each object runs a block on a :class:`Pair` of inputs and targets: with autograd in
training (:meth:`Travel.forward`), without labels for the exits (:meth:`Travel.infer`)
and written out for a standard block (:meth:`Travel.fast`: forward, L_pred's gradients
and the backward to run, :class:`Written`); each returns the travel after the block,
whose :meth:`Travel.compare` gives the exit's logits. At block 1 a ``make`` function
gives the generator's targets (before the block, or after it for OUTPUT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ... import functional as SF
from ...errors import ConfigError
from ...networks import Dropout, dropout_spares_rows_from
from ...networks.batchnorm import stats_from_first
from ...signals import TargetsBackward
from . import fastpath, sparse
from .fastpath import BlockBackward, BlockParts
from .pipeline import Backward

_ELEMENTWISE = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, Dropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)

Make = Callable[[Tensor], Tensor]  # block 1's targets from h (the inputs, or its outputs)
# the written-out generator: (h, out) -> (targets written into out, their backward)
MakeFast = Callable[[Tensor, Tensor], tuple[Tensor, TargetsBackward]]


class Pair:
    """The inputs' rows ``h`` (n, ...) and the targets ``t`` in their travel's form (None
    before block 1 makes them); ``z``: [h; t] as one tensor when they are its parts."""

    __slots__ = ("_h", "_t", "n", "z")

    def __init__(self, h: Tensor, t: Tensor | None, z: Tensor | None = None) -> None:
        self._h, self._t, self.z, self.n = h, t, z, h.shape[0]

    @classmethod
    def stacked(cls, z: Tensor, n: int) -> Pair:
        """The first ``n`` rows of ``z`` and the rest (views taken when asked for)."""
        pair = cls.__new__(cls)
        pair._h = pair._t = None
        pair.z, pair.n = z, n
        return pair

    @property
    def h(self) -> Tensor:
        if self._h is None:
            self._h = self.z[:self.n]
        return self._h

    @property
    def t(self) -> Tensor | None:
        if self._t is None and self.z is not None:
            self._t = self.z[self.n:]
        return self._t

    def rows(self) -> Tensor:
        """[h; t] stacked (no copy when they already are)."""
        return self.z if self.z is not None else torch.cat([self.h, self.t])

    def detached(self) -> Pair:
        z = self.z.detach() if self.z is not None else None
        return Pair(self.h.detach(), self.t.detach(), z)


@dataclass
class StepContext:
    """What every block of one training step shares."""

    n: int  # samples: rows [n:] of a stacked batch are targets
    y: Tensor
    stats_rows: int | None  # BatchNorm statistics from rows [:stats_rows] (None: all)
    drop_targets: bool  # dropout drops the targets too (target_dropout='on')
    kind: str = "dot"  # L_pred's comparison
    means_of: int | None = None  # per-sample targets: compared as means of this many classes
    classes: int = 0  # m: rows of per-class targets
    target_rows: int = 0  # rows the generator makes (m, or n per sample)
    target_shape: tuple[int, ...] = ()  # the generator's row (a window at block 1's input)
    after_matmul: Callable[[], None] | None = None  # the pipeline's wait before BatchNorm

    @property
    def spare_from(self) -> int | None:
        """The first row dropout spares in a stacked batch (None: it drops every row)."""
        return None if self.drop_targets else self.n


@dataclass
class Written:
    """One block's written-out forward and L_pred: its outputs, loss, logits, the
    per-sample targets' (class means, present) or None, and the backward to run."""

    pair: Pair
    travel: Travel
    loss: Tensor
    logits: Tensor
    classes: tuple[Tensor, Tensor] | None
    backward: Backward


class Travel:
    """A way targets go through a block (module docstring). ``shape``: the block's
    output shape; ``make``: block 1's generator, None at later blocks."""

    name: str = ""

    def forward(self, block: nn.Module, pair: Pair, shape: tuple[int, ...],
                ctx: StepContext, make: Make | None = None) -> tuple[Pair, Travel]:
        """The block in training, with autograd."""
        raise NotImplementedError

    def infer(self, block: nn.Module, pair: Pair, shape: tuple[int, ...],
              make: Make | None = None) -> tuple[Pair, Travel]:
        """The block without labels (the exits; call under no_grad)."""
        raise NotImplementedError

    def fast(self, parts: BlockParts, pair: Pair, shape: tuple[int, ...], scale: float,
             ctx: StepContext, make: MakeFast | None = None) -> Written:
        """The standard block written out (call under no_grad)."""
        raise NotImplementedError

    def compare(self, h: Tensor, t: Tensor, kind: str, scale: float) -> Tensor:
        """(n, m) logits of outputs ``h`` against targets ``t`` in this form."""
        return SF.compare(h, t, kind, scale)

    # how modules inside a block take the targets (forward_pair)
    def conv(self, conv: nn.Conv2d, t: Tensor, hw: tuple[int, int]) -> Tensor:
        raise ConfigError("a Conv2d after a Flatten cannot take sparse targets")

    def flatten(self, mod: nn.Flatten, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return mod(h), mod(t)

    def linear(self, mod: nn.Linear, h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise _unknown(mod)

    def __repr__(self) -> str:
        return self.name.upper()

    def __reduce__(self) -> str:
        return self.name.upper()  # copies and pickles are the module's one object


class Output(Travel):
    name = "output"

    def forward(self, block, pair, shape, ctx, make=None):
        h = block(pair.h)  # only inputs here: BN statistics are the inputs'
        return Pair(h, make(h)), ROWS

    def infer(self, block, pair, shape, make=None):
        h = block(pair.h)
        return Pair(h, make(h)), ROWS

    def fast(self, parts, pair, shape, scale, ctx, make=None):
        x, n = pair.h, ctx.n
        # [h1, t1] in one buffer, no cat; laid out as the block computes
        z = fastpath.new_maps(x, (n + ctx.target_rows, *shape), parts.op.weight)
        st = fastpath.block_forward(parts, x, n, out=z[:n])
        t1, targets_backward = make(st.o, z[n:])
        do, dt1 = torch.empty_like(st.o), torch.empty_like(t1)
        loss, logits, _, classes = fastpath.pred_grads(
            ctx.kind, scale, st.o, t1, ctx.y, do, dt1, num_classes=ctx.means_of)
        targets_backward(dt1, do)
        return Written(Pair.stacked(z, n), ROWS, loss, logits, classes,
                       BlockBackward(parts, st, do))


class Rows(Travel):
    name = "rows"

    def forward(self, block, pair, shape, ctx, make=None):
        if make is not None:  # block 1's input (sparse, fc): target rows like input rows
            stacked = torch.cat([pair.h, make(pair.h)])
        else:
            stacked = pair.rows()
        with stats_from_first(ctx.stats_rows), dropout_spares_rows_from(ctx.spare_from):
            z = block(stacked)  # (n + m, *D): inputs, then targets
        h, t = z.split([ctx.n, z.shape[0] - ctx.n])  # backward: one cat, no zero-fill
        return Pair(h, t, z), ROWS

    def infer(self, block, pair, shape, make=None):
        t = make(pair.h) if make is not None else pair.t
        h = block(pair.h)
        return Pair(h, block(t) if t.shape[0] else h[:0]), ROWS

    def fast(self, parts, pair, shape, scale, ctx, make=None):
        n = ctx.n
        if make is not None:  # block 1's input (sparse, fc): [x, t] rows in one buffer
            x = pair.h
            z = x.new_empty((n + ctx.classes, *x.shape[1:]))
            z[:n].copy_(x)
            _, t_backward = make(x, z[n:])

            def input_grad(da: Tensor) -> None:  # dL/dt = dL/da[n:] W, to the generator
                t_backward(da[n:] @ parts.op.weight, None)
        else:
            z, input_grad = pair.rows(), None
        st = fastpath.block_forward(parts, z, ctx.stats_rows or z.shape[0],
                                    after_matmul=ctx.after_matmul, spare_from=ctx.spare_from)
        z = st.o
        do = torch.empty_like(z)
        loss, logits, _, classes = fastpath.pred_grads(
            ctx.kind, scale, z[:n], z[n:], ctx.y, do[:n], do[n:], num_classes=ctx.means_of)
        return Written(Pair.stacked(z, n), ROWS, loss, logits, classes,
                       BlockBackward(parts, st, do, input_grad))

    def linear(self, mod, h, t):
        return mod(h), mod(t)


class Window(Travel):
    name = "window"

    def forward(self, block, pair, shape, ctx, make=None):
        return forward_pair(block, pair.h, make(pair.h), self, ctx.drop_targets)

    def infer(self, block, pair, shape, make=None):
        return forward_pair(block, pair.h, make(pair.h), self)

    def fast(self, parts, pair, shape, scale, ctx, make=None):
        x = pair.h
        window = x.new_empty((ctx.classes, *ctx.target_shape))
        t, t_backward = make(x, window)
        return _pair_block(parts, x, t, self, shape, scale, ctx, None, t_backward)

    def conv(self, conv, t, hw):
        return sparse.conv_window(conv, t)

    def conv_fast(self, conv, t, hw):
        return t, torch.conv2d(t, conv.weight, None, conv.kernel_size, 0)  # (m, C, G, G)

    def conv_fast_backward(self, conv, da_t, kept, input_grad):
        # one application of the kernel to each window
        dx_t, dw_t, _ = torch.ops.aten.convolution_backward(
            da_t, kept, conv.weight, None, list(conv.kernel_size), [0, 0], [1, 1], False,
            [0, 0], 1, [input_grad, True, False])
        return dx_t, dw_t


class Field(Travel):
    name = "field"

    def forward(self, block, pair, shape, ctx, make=None):
        return forward_pair(block, pair.h, sparse.fit_grid(pair.t, shape), self,
                            ctx.drop_targets)

    def infer(self, block, pair, shape, make=None):
        return forward_pair(block, pair.h, sparse.fit_grid(pair.t, shape), self)

    def fast(self, parts, pair, shape, scale, ctx, make=None):
        h = pair.h
        if not parts.conv:  # a Flatten: the fields laid out over the map, stacked
            laid = SF.lay_out(pair.t, tuple(h.shape[2:]))
            return ROWS.fast(parts, Pair(h, laid), shape, scale, ctx)
        t = sparse.fit_grid(pair.t, shape)
        return _pair_block(parts, h, t, self, shape, scale, ctx, ctx.after_matmul, None)

    def compare(self, h, t, kind, scale):
        return SF.field_compare(h, t, kind, scale)

    def conv(self, conv, t, hw):
        return sparse.conv_field(conv, t, hw)

    def conv_fast(self, conv, t, hw):  # the field's im2col, kept for the weight gradient
        patches, grid = sparse.field_patches(conv, t, hw)
        return patches, sparse.patches_conv(conv, patches, grid)

    def conv_fast_backward(self, conv, da_t, kept, input_grad):
        # the field's im2col (m, cells, C_in k k) against dL/da per cell
        c_out = da_t.shape[1]
        dw_t = (da_t.flatten(2).transpose(0, 1).reshape(c_out, -1)
                @ kept.reshape(-1, kept.shape[2])).view_as(conv.weight)
        return None, dw_t

    def flatten(self, mod, h, t):
        if h.dim() == 4:
            t = SF.lay_out(t, tuple(h.shape[2:]))  # the field laid out over the map
        return mod(h), mod(t)


OUTPUT, ROWS, WINDOW, FIELD = Output(), Rows(), Window(), Field()


def _pair_block(parts: BlockParts, h: Tensor, t: Tensor, travel: Window | Field,
                shape: tuple[int, ...], scale: float, ctx: StepContext,
                after_matmul: Callable[[], None] | None,
                t_backward: TargetsBackward | None) -> Written:
    """A conv block on inputs and window or field targets, written out; L_pred against
    the fields."""
    out = fastpath.new_maps(h, (h.shape[0], *shape), parts.op.weight)
    ps = sparse.pair_forward(parts, h, t, travel, out=out, after_matmul=after_matmul,
                             drop_targets=ctx.drop_targets)
    do_x = torch.empty_like(ps.x.o)
    loss, logits, do_t = sparse.field_pred_grads(ctx.kind, scale, ps.x.o, ps.o_t, ctx.y, do_x)
    return Written(Pair(ps.x.o, ps.o_t), FIELD, loss, logits, None,
                   sparse.PairBackward(parts, ps, do_x, do_t, t_backward))


def forward_pair(block: nn.Module, h: Tensor, t: Tensor, travel: Travel,
                 drop_targets: bool = True) -> tuple[Pair, Travel]:
    """The block on the inputs ``h`` (as its own forward would run them) and on the
    targets ``t`` travelling apart (WINDOW or FIELD; sparse.py says how each module
    takes them); sigprop's Dropout passes the targets undropped unless ``drop_targets``.
    Returns the outputs and the targets' travel after the block."""
    if not isinstance(block, nn.Sequential):
        raise ConfigError(f"sparse targets through convolutions need blocks that are "
                          f"nn.Sequential, got a {type(block).__name__}; use dense targets")
    for mod in block:
        if isinstance(mod, nn.Conv2d):
            t = travel.conv(mod, t, tuple(h.shape[2:]))
            h = mod(h)
            travel = FIELD
        elif isinstance(mod, _BatchNorm):
            t = sparse.bn_target(mod, h, t)
            h = mod(h)
        elif isinstance(mod, Dropout) and not drop_targets:
            # target_dropout off: the targets pass undropped (their mask is drawn and
            # discarded, so the inputs' masks are the same either way)
            h, _ = mod(h), mod(t)
        elif isinstance(mod, _ELEMENTWISE):
            h, t = mod(h), mod(t)
        elif isinstance(mod, _POOLS):
            h = mod(h)  # a field is unchanged by pooling
        elif isinstance(mod, nn.Flatten):
            h, t = travel.flatten(mod, h, t)
            travel = ROWS
        elif isinstance(mod, nn.Linear):
            h, t = travel.linear(mod, h, t)
        else:
            raise _unknown(mod)
    return Pair(h, t), travel


def _unknown(mod: nn.Module) -> ConfigError:
    return ConfigError(
        f"sparse targets cannot pass a {type(mod).__name__} (known: Conv2d, BatchNorm, "
        "LeakyReLU and other elementwise modules, Dropout, MaxPool2d, AvgPool2d, Flatten, "
        "Linear after a Flatten); use dense targets")
