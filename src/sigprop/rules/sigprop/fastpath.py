"""Written-out local updates for standard fully connected blocks: no autograd.

A sigprop block learns from its own loss on its own outputs, with its input
detached, so its whole update is a short, fixed formula: nothing crosses a block
boundary and no graph is needed. For the blocks this library builds (``Linear ->
BatchNorm -> LeakyReLU [-> Dropout]``, :func:`sigprop.networks.fc_block`) and every
built-in target generator, :func:`block_forward`, :func:`pred_grads` and
:func:`block_backward` run the forward pass and write every parameter's gradient
directly (:func:`block_step` chains them for one target per class):

    a = x Wᵀ (+ b);  u = BN_{qγ,qβ}(a) (statistics from rows [:n_stats]);
    o = LeakyReLU(u) * keep        (q = 1/(1-p): f(q v) = q f(v), so dropout's scale
                                    rides on BatchNorm's affine map)
    logits = compare(o[:n], t) * s;  L = CE(logits, y)
    dlogits = s (softmax(logits) - onehot(y)) / n
    do = [dlogits t ; dlogitsᵀ o[:n]]      (dot; L2 adds its |t|² term)
    du = do * keep * (1 if o > 0 else slope);  da = BN backward with the
                                               input-statistics correction
    dW = daᵀ x;  db = Σ da;  dγ = q Σ du * û;  dβ = q Σ du

The autograd path (``fast_path="off"``) computes the same numbers, op for op up to
rounding; tests/test_fastpath.py checks one against the other. What this saves is
not arithmetic but autograd's overhead (docs/studies/fast-path.md).

Generators write out their own targets and gradients
(:meth:`sigprop.signals.TargetGenerator.fast_targets`); per-sample targets are compared
through their class means (:func:`pred_grads`).

Memory: the tensors kept from the forward pass for the update are the block input
x, the pre-normalisation a, the output o (the next block's input anyway) and a 1-byte
dropout mask; all but x are released after BatchNorm's backward (:func:`bn_backward`),
x after the weight gradient (:func:`op_backward`): one block's worth. :func:`track_saved`
lets a benchmark count them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from ... import functional as SF
from ...networks import Dropout
from ...networks.base import channels_last
from ...networks.batchnorm import InputStatsBatchNorm, input_stats_backward, input_stats_forward

_PACK: ContextVar[Callable[[Tensor], object] | None] = ContextVar("sigprop_fast_pack", default=None)


@contextmanager
def track_saved(pack: Callable[[Tensor], object]) -> Iterator[None]:
    """Call ``pack(t)`` for every tensor a fast-path block keeps for its update.

    The returned handles are dropped when the block's update is done, like the
    objects of ``torch.autograd.graph.saved_tensors_hooks``.
    """
    token = _PACK.set(pack)
    try:
        yield
    finally:
        _PACK.reset(token)


@dataclass(frozen=True)
class BlockParts:
    """The modules of one standard block: fully connected (``[Flatten,] Linear,
    BatchNorm, LeakyReLU[, Dropout]``) or convolutional (``Conv2d, BatchNorm,
    LeakyReLU[, Dropout][, MaxPool2d]``)."""

    op: nn.Linear | nn.Conv2d
    bn: InputStatsBatchNorm
    slope: float
    dropout: Dropout | None
    pool: nn.MaxPool2d | None
    flatten: bool
    modules: tuple[nn.Module, ...]  # every module of the block, for the hook check

    @property
    def conv(self) -> bool:
        return isinstance(self.op, nn.Conv2d)


def match_block(block: nn.Module) -> BlockParts | str:
    """The block's parts if the fast path computes it exactly, else why not."""
    if type(block) is not nn.Sequential:
        return f"block is a {type(block).__name__}, not an nn.Sequential"
    mods = list(block)
    flatten = bool(mods) and type(mods[0]) is nn.Flatten
    if flatten and (mods[0].start_dim, mods[0].end_dim) != (1, -1):
        return "block flattens other than from dim 1"
    body = mods[1:] if flatten else mods
    kinds = [type(m).__name__ for m in body]
    pool = body[-1] if body and type(body[-1]) is nn.MaxPool2d else None
    core = body[:-1] if pool is not None else body
    if not (
        len(core) in (3, 4)
        and type(core[0]) in (nn.Linear, nn.Conv2d)
        and type(core[1]) is InputStatsBatchNorm
        and type(core[2]) is nn.LeakyReLU
        and (len(core) == 3 or type(core[3]) is Dropout)
    ):
        return (f"block is {kinds}, not [Linear, BatchNorm, LeakyReLU(, sigprop Dropout)] or "
                "[Conv2d, BatchNorm, LeakyReLU(, sigprop Dropout)(, MaxPool2d)]")
    op, bn = core[0], core[1]
    if isinstance(op, nn.Conv2d):
        if op.groups != 1 or tuple(op.dilation) != (1, 1) or op.padding_mode != "zeros" \
                or isinstance(op.padding, str) or flatten:
            return "Conv2d with groups, dilation, a padding mode or string padding"
        width = op.out_channels
    else:
        if pool is not None:
            return "a MaxPool2d after a Linear"
        width = op.out_features
    if pool is not None and (pool.return_indices or _pair(pool.dilation) != (1, 1)):
        return "MaxPool2d with return_indices or dilation"
    if bn.num_features != width:
        return f"BatchNorm width differs from the {type(op).__name__}'s"
    return BlockParts(
        op=op, bn=bn, slope=float(core[2].negative_slope),
        dropout=core[3] if len(core) == 4 else None, pool=pool, flatten=flatten,
        modules=(block, *mods),
    )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def hooked(modules: tuple[nn.Module, ...]) -> bool:
    """True if any module (or the global registry) has forward or backward hooks,
    which only a real module call honours."""
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks",
                    "_global_backward_hooks", "_global_backward_pre_hooks")
    if any(getattr(_module, name, None) for name in global_hooks):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def _flat_rows(x: Tensor, nhwc: bool, write: bool = False) -> Tensor:
    """``x`` as (rows, values), its values in (C, H, W) order or, ``nhwc``, in (H, W, C)
    order; ``write``: a view, so writes land in ``x`` (RuntimeError if it cannot be one)."""
    if nhwc and x.dim() == 4:
        x = x.permute(0, 2, 3, 1)
    return x.view(x.shape[0], -1) if write else x.reshape(x.shape[0], -1)


def new_maps(like: Tensor, shape: tuple[int, ...], weight: Tensor | None = None) -> Tensor:
    """An empty buffer of ``shape`` with ``like``'s dtype and device, channels-last when
    ``weight`` (a conv block's) or else ``like`` is, so that writing a block's maps into it
    keeps the layout its convolution computes in."""
    ref = weight if weight is not None else like
    fmt = torch.channels_last if len(shape) == 4 and channels_last(ref) else \
        torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def pred_grads(
    kind: str, scale: float, h: Tensor, t: Tensor, y: Tensor, dh: Tensor,
    dt: Tensor | None = None, num_classes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """L_pred = CE(compare(h, t) * scale, y) and its gradients, without autograd.

    ``t`` holds one target per class, or, with ``num_classes``, one per sample: then
    L_pred compares with the class means of the targets and absent classes get no
    logit (as in the autograd step). dL/dh is written into ``dh``, dL/dt into
    ``dt`` (a new tensor when None). Returns (loss, logits, dL/dt, (means, present) of
    per-sample targets or None).
    """
    row_shape = t.shape[1:]
    # conv blocks: every (C, H, W) row compared flat, in h's memory order (views, written
    # in place); a dot product or distance does not depend on the order of the values
    nhwc = channels_last(h)
    h, t, dh = _flat_rows(h, nhwc), _flat_rows(t, nhwc), _flat_rows(dh, nhwc, write=True)
    if dt is not None:
        dt = _flat_rows(dt, nhwc, write=True)
    classes = None
    if num_classes is not None:  # per-sample targets -> class means, as the autograd path
        classes = SF.class_targets(t, y, num_classes)
        t = classes[0]
    logits = torch.mm(h, t.T)
    if kind == "l2":  # 2h·t - |h|² - |t|², as functional.l2_compare
        logits.mul_(2).sub_((h * h).sum(1, keepdim=True)).sub_((t * t).sum(1))
    logits.mul_(scale)
    if classes is not None:
        logits.masked_fill_(~classes[1], float("-inf"))
    loss, g = SF.pred_loss_grad(logits, y, scale)
    torch.mm(g, t, out=dh)
    # dL/d(rows of t): the targets themselves, or the class means
    dt_rows = _classes_by_values(g, h, dt if classes is None else None)
    if kind == "l2":
        dh.mul_(2).sub_(h * (2 * g.sum(1, keepdim=True)))
        dt_rows.mul_(2).sub_(t * (2 * g.sum(0).unsqueeze(1)))
    if classes is None:
        return loss, logits, dt_rows, None
    # d mean_c / d t_j = 1/count_c for the samples j of class c
    counts = SF.class_counts(y, num_classes).clamp_min_(1).to(dt_rows.dtype)
    dt_rows.div_(counts.unsqueeze(1))
    dt = torch.index_select(dt_rows, 0, y, out=dt) if dt is not None else dt_rows[y]
    means, present = classes
    return loss, logits, dt, (means.view(-1, *row_shape), present)


# a row of h is cut into chunks of at least this many values for dL/dt (_classes_by_values)
_CHUNK = 2048


def _classes_by_values(g: Tensor, h: Tensor, out: Tensor | None = None) -> Tensor:
    """gᵀ h, (classes, values), into ``out`` if given. On a CPU, rows of a conv block's
    maps (tens of thousands of values) are cut into 4-16 chunks, one batched product:
    MKL's single 10 x n by n x K product read h at a third of the rate
    (docs/studies/fast-path.md); each value still sums the same n products."""
    k = h.shape[1]
    chunks = next((c for c in (16, 8, 4) if k % c == 0 and k // c >= _CHUNK), 1)
    if chunks == 1 or h.stride(1) != 1 or h.device.type != "cpu":
        return torch.mm(g.T, h, out=out)
    parts = torch.bmm(g.T.expand(chunks, -1, -1), h.unflatten(1, (chunks, -1)).transpose(0, 1))
    if out is None:
        out = parts.new_empty(g.shape[1], k)
    out.unflatten(1, (chunks, -1)).copy_(parts.transpose(0, 1))
    return out


@dataclass
class BlockState:
    """What a block's forward keeps for its update (one block's worth)."""

    x: Tensor  # block input (flattened for fc blocks)
    a: Tensor  # x Wᵀ or conv(x, W), before BatchNorm
    mean: Tensor
    var: Tensor
    o: Tensor  # block output (pooled for a pooling block); without pooling its sign is
    #            the LeakyReLU's (o = 0 where dropped)
    keep: Tensor | None  # dropout's keep mask as uint8 (0/1); None: no dropout
    scale: float  # dropout's 1/(1-p), folded into BatchNorm's affine map (1: none)
    weight: Tensor | None  # BatchNorm weight as applied (times scale)
    bias: Tensor | None  # BatchNorm bias as applied (times scale)
    n_stats: int
    pool_code: Tensor | None  # a pooling block: where in its window each output came from
    held: tuple[list, list] | None  # track_saved handles: (x's, the others')
    spare_from: int | None = None  # rows from here on were not dropped (target_dropout off)


def op_forward(op: nn.Linear | nn.Conv2d, x: Tensor) -> Tensor:
    """x Wᵀ or conv(x, W), without the bias: BatchNorm subtracts the mean right after,
    so a bias changes nothing but the running mean (it enters there)."""
    if isinstance(op, nn.Conv2d):
        return torch.conv2d(x, op.weight, None, op.stride, op.padding, op.dilation, op.groups)
    return x @ op.weight.T


def block_forward(parts: BlockParts, x: Tensor, n_stats: int, out: Tensor | None = None,
                  after_matmul: Callable[[], None] | None = None,
                  spare_from: int | None = None) -> BlockState:
    """The block's training-mode forward; the output goes into ``out`` if given.
    BatchNorm takes its statistics from rows [:n_stats]. ``after_matmul`` is called
    between the Linear (or conv) and BatchNorm (the pipeline waits there). Dropout
    spares rows [spare_from:] (kept and unscaled, as ``Dropout`` under
    ``dropout_spares_rows_from``); None: it drops every row. Call under no_grad.

    A pooling block keeps a, not its pre-pooling output: :func:`bn_backward` recomputes
    that (and the pooling's choice) from a, the statistics and the mask, so the block
    keeps x, a, the 1-byte mask and its (pooled) output, as a block without pooling."""
    if parts.flatten:
        x = x.flatten(1)
    a = op_forward(parts.op, x)
    pack = _PACK.get()
    held_x = [pack(x)] if pack is not None else None
    held_a = [pack(a)] if pack is not None else None
    if after_matmul is not None:
        after_matmul()
    bn, drop = parts.bn, parts.dropout
    weight, bias, scale, keep = bn.weight, bn.bias, 1.0, None
    if drop is not None and drop.active:
        # Dropout's 1/(1-p) commutes with the LeakyReLU (s f(u) = f(s u), s > 0), so it
        # scales BatchNorm's affine map instead of the output: o = f(BN_{sγ,sβ}(a)),
        # zeroed where dropped. The update keeps the 1-byte mask, not a float factor
        # (uint8: a float x bool product costs several times a float x uint8 one).
        scale = drop.scale
        weight = weight * scale if weight is not None else a.new_full((a.shape[1],), scale)
        bias = bias * scale if bias is not None else None
        keep = drop.keep_mask(a).view(torch.uint8)
        if spare_from is not None and spare_from < a.shape[0]:
            keep[spare_from:] = 1  # spared rows: kept, their scale undone below
        else:
            spare_from = None
    else:
        spare_from = None
    u, mean, var = input_stats_forward(a, weight, bias, n_stats, bn.eps, bn.count_batch(),
                                       shift=parts.op.bias)
    if parts.pool is None:
        if out is None:
            out = torch.empty_like(u)
        o = torch.ops.aten.leaky_relu.out(u, parts.slope, out=out)
        if keep is not None:
            o.mul_(keep)
        if spare_from is not None:
            o[spare_from:].mul_(1.0 / scale)
    pool_code = None
    if parts.pool is not None:
        pre = torch.ops.aten.leaky_relu_(u, parts.slope)
        if keep is not None:
            pre.mul_(keep)
        if spare_from is not None:  # before the max: a positive factor commutes with it
            pre[spare_from:].mul_(1.0 / scale)
        o, pool_code = _pool(parts.pool, pre, out)
        del pre
    held = None
    if pack is not None:  # x is kept until the weight gradient, the rest until BN's
        held = (held_x, held_a + [pack(o)] + ([pack(keep)] if keep is not None else [])
                + ([pack(pool_code)] if pool_code is not None else []))
    return BlockState(x, a, mean, var, o, keep, scale, weight, bias, n_stats,
                      pool_code=pool_code, held=held, spare_from=spare_from)


def _pool_geometry(pool: nn.MaxPool2d) -> tuple:
    return (_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size),
            _pair(pool.padding), _pair(pool.dilation), pool.ceil_mode)


def _window_corner(pool: nn.MaxPool2d, pooled: Tensor, width: int) -> Tensor:
    """(H_out, W_out) flat index, in an input plane ``width`` wide, of each pooled
    position's window corner (negative where the window starts in the padding)."""
    (_, _), (sh, sw), (ph, pw), _, _ = _pool_geometry(pool)
    rows = torch.arange(pooled.shape[2], device=pooled.device) * sh - ph
    cols = torch.arange(pooled.shape[3], device=pooled.device) * sw - pw
    return rows.view(-1, 1) * width + cols.view(1, -1)


def _rows_down(offset: Tensor, step: int, rows: int) -> Tensor:
    """How many whole ``step``s fit in each ``offset`` (0 <= offset < rows * step), by
    comparisons: integer division has no vector instruction on a CPU."""
    down = (offset >= step).to(offset.dtype)
    for k in range(2, rows):
        down += offset >= k * step
    return down


def _pool(pool: nn.MaxPool2d, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """The max-pooled map (into ``out`` if given) and, per output, where in its window the
    maximum was, as one byte (row x kernel width + column): an eighth of the int64 index
    the pooling returns, which the update rebuilds from it (:func:`_window_index`)."""
    geometry = _pool_geometry(pool)
    if _halving(geometry, x) and not channels_last(x):  # ATen's kernel is fast on those
        return _pool_2x2(x, out)
    (kh, kw) = geometry[0]
    if kh * kw > 256 or geometry[3] != (1, 1) or kw > x.shape[3]:
        raise ValueError("the fast path pools with windows of at most 256 values, no "
                         "dilation, no wider than the map")
    if out is None:
        p, idx = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
    else:
        # laid out as out (channels-last maps: channels-last codes, which the unpooling
        # reads contiguously; NCHW ones made it 3x slower)
        idx = torch.empty_like(out, dtype=torch.int64)
        p, idx = torch.ops.aten.max_pool2d_with_indices.out(x, *geometry, out=out, indices=idx)
    width = x.shape[3]
    if _halving(geometry, x) and width & (width - 1) == 0 and width <= 128:
        return p, _halving_code(idx, width)
    offset = idx.sub_(_window_corner(pool, p, width))  # row * width + column in the window
    code = offset.sub_(_rows_down(offset, width, kh).mul_(width - kw))
    return p, code.to(torch.uint8)


def _halving_code(idx: Tensor, width: int) -> Tensor:
    """The window codes (2 row + column) of a 2 x 2, stride 2 pooling of maps ``width``
    wide, a power of two up to 128, from ATen's int64 indices, on one byte from the first
    pass: an index is (2i + r) width + 2j + s, so modulo 2 width (which divides 256, where
    the cast to uint8 wraps) it is r width + 2j + s with 2j + s < width: r is its
    ``width`` bit, s its lowest. A fifth of the general path's passes over int64 indices
    (docs/studies/fast-path.md)."""
    b = idx.to(torch.uint8)  # idx mod 256
    row = torch.bitwise_right_shift(b, width.bit_length() - 2).bitwise_and_(2)  # 2 r
    return row.bitwise_or_(b.bitwise_and_(1))


# (kernel, stride, padding, dilation, ceil_mode) of VGG8b's poolings: 2 x 2, stride 2
_HALVING = ((2, 2), (2, 2), (0, 0), (1, 1), False)


def _halving(geometry: tuple, x: Tensor) -> bool:
    """Whether a pooling is the 2 x 2, stride 2 halving of an even map (VGG8b's), which
    :func:`_pool_2x2` computes."""
    return geometry == _HALVING \
        and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0


def _pool_2x2(x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`_pool` of a 2 x 2, stride 2 window of NCHW maps by elementwise maxima of the
    window's columns, then of its rows, where ATen's NCHW kernel visits one window at a
    time: half the time over VGG8b's four poolings (docs/studies/fast-path.md; the
    backward stays ATen's, which beat the same idea there). Ties go to the first value in
    row-major order, as ATen's pooling picks: the left column, then the top row."""
    left, right = x[..., 0::2], x[..., 1::2]
    right_won = right > left
    cols = torch.maximum(left, right)
    top, bottom = cols[:, :, 0::2], cols[:, :, 1::2]
    bottom_won = bottom > top
    p = torch.maximum(top, bottom) if out is None else torch.maximum(top, bottom, out=out)
    col = torch.where(bottom_won, right_won[:, :, 1::2], right_won[:, :, 0::2])
    return p, bottom_won.to(torch.uint8).mul_(2).add_(col)


def _unpool_2x2(dq: Tensor, code: Tensor, like: Tensor, keep: Tensor | None = None
                ) -> Tensor:
    """The gradient of a 2 x 2, stride 2 pooling of channels-last maps shaped ``like``:
    ``dq`` written into the window position its code names, zero at the other three (and
    where the uint8 dropout mask ``keep``, laid out as ``like``, is 0), in one broadcast
    product over the map seen as (N, H/2, 2, W/2, 2, C): ATen's backward with the indices
    rebuilt took 1.15-1.18x as long on such maps (benchmarks/pooling.py)."""
    n, c, h, w = like.shape
    six = (n, h // 2, 2, w // 2, 2, c)
    du = torch.empty((n, h, w, c), dtype=dq.dtype, device=dq.device)
    q = dq.permute(0, 2, 3, 1)[:, :, None, :, None]  # (N, H/2, 1, W/2, 1, C)
    k = code.permute(0, 2, 3, 1)[:, :, None, :, None]
    # each window position's code, (row, column) -> 2 row + column, made on the device
    where = torch.arange(4, dtype=code.dtype, device=code.device).view(1, 1, 2, 1, 2, 1)
    chosen = k == where
    if keep is not None:  # the mask on bytes here, not on the floats after
        chosen = torch.mul(chosen, keep.permute(0, 2, 3, 1).view(six))
    torch.mul(q, chosen, out=du.view(six))
    return du.permute(0, 3, 1, 2)


def _window_index(pool: nn.MaxPool2d, code: Tensor, width: int) -> Tensor:
    """The pooling's int64 indices (into each H x W plane) from :func:`_pool`'s codes."""
    kh, kw = _pool_geometry(pool)[0]
    c = code.to(torch.int64)
    return c.add_(_rows_down(c, kw, kh).mul_(width - kw)).add_(_window_corner(pool, code, width))


def _pool_leaky_backward(parts: BlockParts, st: BlockState, do: Tensor) -> Tensor:
    """dL/du (u: BatchNorm's output) of a pooling block from dL/d(pooled output): through
    the LeakyReLU at each window's maximum (whose sign is the pooled output's; a dropped
    maximum is 0 and its gradient is masked), then back to the maximum's place, then the
    dropout mask. The same numbers as autograd through pooling, mask and LeakyReLU."""
    dq = torch.ops.aten.leaky_relu_backward(do, st.o, parts.slope, False)
    if channels_last(st.a) and _halving(_pool_geometry(parts.pool), st.a):
        du = _unpool_2x2(dq, st.pool_code, st.a, st.keep)
        if st.spare_from is not None:
            du[st.spare_from:].mul_(1.0 / st.scale)
        return du
    idx = _window_index(parts.pool, st.pool_code, st.a.shape[3])
    du = torch.ops.aten.max_pool2d_with_indices_backward(dq, st.a, *_pool_geometry(parts.pool),
                                                         idx)
    _mask_backward(st, du)
    return du


def _mask_backward(st: BlockState, du: Tensor) -> None:
    """dL/du in place through the dropout mask (and the spared rows' undone scale)."""
    if st.keep is not None:
        du.mul_(st.keep)
    if st.spare_from is not None:
        du[st.spare_from:].mul_(1.0 / st.scale)


def activation_backward(parts: BlockParts, st: BlockState, do: Tensor) -> Tensor:
    """dL/du (u: BatchNorm's output) from dL/d(block output): back through the pooling,
    the dropout mask and the LeakyReLU (``do`` is overwritten where it can be)."""
    if parts.pool is not None:
        return _pool_leaky_backward(parts, st, do)
    # through the LeakyReLU (o > 0 exactly where BN's output is) and the dropout mask
    du = torch.ops.aten.leaky_relu_backward.grad_input(do, st.o, parts.slope, False,
                                                       grad_input=do)
    _mask_backward(st, du)
    return du


def bn_backward(parts: BlockParts, st: BlockState, do: Tensor) -> Tensor:
    """The block's gradients up to the Linear's (or conv's) output: dL/da from dL/do
    (overwritten where it can be), BatchNorm's parameter gradients into ``.grad``.
    Releases what the forward kept except the input x; returns dL/da for
    :func:`op_backward`."""
    bn = parts.bn
    du = activation_backward(parts, st, do)
    da, dw, db = input_stats_backward(du, st.a, st.weight, st.mean, st.var, st.n_stats, bn.eps)
    if bn.weight is not None:
        if st.scale != 1.0:  # d/dγ of f(BN_{sγ,sβ}) is s times that of the scaled map
            dw, db = dw.mul_(st.scale), db.mul_(st.scale)
        bn.weight.grad, bn.bias.grad = dw, db
    st.a = st.o = st.keep = st.weight = st.bias = st.pool_code = None  # type: ignore[assignment]
    if st.held is not None:
        st.held = (st.held[0], [])
    return da


def op_backward(op: nn.Linear | nn.Conv2d, x: Tensor, da: Tensor) -> None:
    """The Linear's (or conv's) gradients from its input ``x`` and dL/da, into
    ``.grad``; no gradient for the input (a sigprop block's input is detached)."""
    if isinstance(op, nn.Conv2d):
        _, dw, db = torch.ops.aten.convolution_backward(
            da, x, op.weight, [op.out_channels] if op.bias is not None else None, op.stride,
            op.padding, op.dilation, False, [0, 0], op.groups,
            [False, True, op.bias is not None])
        op.weight.grad = dw
        if op.bias is not None:
            op.bias.grad = db
        return
    op.weight.grad = da.T @ x
    if op.bias is not None:
        op.bias.grad = da.sum(0)


class BlockBackward:
    """A block's written-out backward from dL/do (overwritten), in two stages:
    :meth:`first`, BatchNorm's (what the next block's BatchNorm forward waits for when
    pipelined), then :meth:`second`, the Linear's (or conv's) gradients and
    ``input_grad(dL/da)`` if given (sparse fc targets: the generator's). Releases what
    the forward kept as it goes."""

    def __init__(self, parts: BlockParts, st: BlockState, do: Tensor,
                 input_grad: Callable[[Tensor], None] | None = None) -> None:
        self.parts, self.st, self.do, self.input_grad = parts, st, do, input_grad
        self.da: Tensor | None = None

    def first(self) -> None:
        self.da = bn_backward(self.parts, self.st, self.do)  # releases a, o and the mask
        self.do = None

    def second(self) -> None:
        st, da = self.st, self.da
        op_backward(self.parts.op, st.x, da)
        if self.input_grad is not None:
            self.input_grad(da)
        st.held = None  # x released (and uncounted) once the gradient exists
        self.st = self.da = None


def block_backward(parts: BlockParts, st: BlockState, do: Tensor) -> None:
    """Gradients of the block's parameters from dL/do (overwritten), into ``.grad``;
    releases what the forward kept."""
    backward = BlockBackward(parts, st, do)
    backward.first()
    backward.second()


def block_step(
    parts: BlockParts, x: Tensor, n: int, n_stats: int, y: Tensor, kind: str, scale: float,
    targets: Tensor | None = None, out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One block's forward pass and local gradients (one target per class), written
    into ``.grad``.

    ``x``: the block input (detached); its first ``n`` rows are inputs, the rest
    targets. The block's own loss compares output rows [:n] with output rows [n:],
    or, when ``targets`` is given (block 1, whose targets come from the generator),
    all output rows with ``targets``. The output goes into ``out`` if given. Returns
    (output, loss, logits, dL/dtargets or None). Call under ``torch.no_grad()``.
    """
    st = block_forward(parts, x, n_stats, out)
    o = st.o
    do = torch.empty_like(o)
    if targets is None:
        loss, logits, _, _ = pred_grads(kind, scale, o[:n], o[n:], y, do[:n], do[n:])
        dt = None
    else:
        loss, logits, dt, _ = pred_grads(kind, scale, o, targets, y, do)
    block_backward(parts, st, do)
    return o, loss, logits, dt
