"""How sparse targets (Sec. III-E) travel through convolutional blocks.

The paper makes a conv layer's sparse target the size of one kernel window of the
layer's input (its example: input 32x28x28, conv 32->16 3x3, dense target 32x28x28,
sparse target 10x32x3x3, so "there is no weight sharing when convolving with a sparse
target"), and leaves open how such a target goes on through later convolutions and
pooling. Our choice, exact at every module:

* Block 1 takes each class's window target ``(C_in, k, k)`` with its own conv weights
  once, without padding: ``conv(window, W)`` is ``(C_1, 1, 1)``, one output position.
  With a grid of G x G windows (``--sparse-grid G``, ours: 1 is the paper's one window)
  the target is ``(C_in, G k, G k)``, each k x k window taken once (stride k):
  ``(C_1, G, G)``.
* From there a target is a *field*: one value per channel and cell of a G x G grid of
  nearly equal cells of the map (G = 1: one cell, a constant map), standing for the map
  whose every position has its cell's value (``functional.lay_out``), stored as
  ``(m, C, G, G)``. Through the block's modules it stays one:
    - Conv2d: in each output cell, the mean over the cell of the conv of the laid-out
      map, exact with the conv's padding, stride and the map's borders
      (:func:`conv_field`: per axis, the share of a cell's positions whose tap reads
      each input cell, :func:`field_patches`, an im2col of G² positions). Away from
      borders this is the summed kernel ``sum_{a,b} W[:, :, a, b] @ t``; on a 3x3 map
      with padding 1 a corner tap counts 4/9 (docs/studies/sparse-targets.md);
    - BatchNorm: the inputs' batch statistics (running statistics in eval mode), as
      for dense targets (Sec. III-D);
    - LeakyReLU and other elementwise modules, Dropout (one draw per value of the
      field: a channel's cell): applied as they are;
    - MaxPool2d / AvgPool2d: the field is unchanged (its cells shrink with the map);
      before a block whose output map has fewer than G positions a side, the grid is
      averaged down to the output map's size (:func:`fit_grid`);
    - Flatten (into a fully connected block): the field is laid out over the input
      map's positions, ``(m, C, H, W)`` flattened; from then on targets are ordinary
      dense rows, stacked with the inputs in one call.
* L_pred compares an output map ``h (n, C, H, W)`` with a field ``t (m, C, G, G)`` as
  with the laid-out map (:func:`sigprop.functional.field_compare`): dot
  ``cell_sums(h) . t``; the logit scale is :func:`sigprop.functional.field_scale`'s.

What a field costs: m x C x G² values per block instead of m x C x H x W, and a conv
on it is an (m G² x C_in k²) by (C_in k² x C_out) product instead of a convolution over
H x W. Where a field differs from the dense target of its laid-out map: after the conv,
BatchNorm, the nonlinearity and pooling act on the cell means, not position by
position.

The travel objects (:mod:`.travel`: ``WINDOW``, ``FIELD``) take blocks through these
functions; :func:`pair_forward` and :func:`pair_backward` are a standard conv block's
written-out step on inputs and such targets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ... import functional as SF
from ...errors import ConfigError
from ...networks.batchnorm import input_stats_backward_pair
from .fastpath import BlockParts, BlockState, activation_backward, block_forward, op_backward


def conv_window(conv: nn.Conv2d, window: Tensor) -> Tensor:
    """One application of the conv to each k x k window (no padding, stride k): (m,
    C_in, G k, G k) -> (m, C_out, G, G)."""
    return F.conv2d(window, conv.weight, conv.bias, conv.kernel_size, 0, conv.dilation,
                    conv.groups)


def window_grid(window_shape: tuple[int, ...], conv: nn.Conv2d) -> tuple[int, int]:
    """The grid (G, G) of a window target ``(C_in, G k, G k)`` for ``conv``."""
    return (window_shape[-2] // conv.kernel_size[0], window_shape[-1] // conv.kernel_size[1])


def fit_grid(t: Tensor, block_shape: tuple[int, ...]) -> Tensor:
    """A field ``(m, C, gh, gw)`` entering a conv block whose output map is smaller than
    the grid: its cells averaged down to the output map's size (a no-op otherwise, and
    for targets that are rows)."""
    if t.dim() != 4 or len(block_shape) != 3:
        return t
    gh, gw = min(t.shape[2], block_shape[1]), min(t.shape[3], block_shape[2])
    if (gh, gw) == tuple(t.shape[2:]):
        return t
    return F.adaptive_avg_pool2d(t, (gh, gw))


def _axis_taps(size_in: int, size_out: int, g_in: int, g_out: int, k: int, stride: int,
               pad: int, dil: int) -> Tensor:
    """(g_out, g_in, k): along one axis, the share of the positions of each output cell
    whose tap ``a`` reads a position of input cell c' (inside the map: zero padding reads
    nothing)."""
    p = torch.arange(size_out)
    q = p[:, None] * stride - pad + torch.arange(k)[None, :] * dil  # (size_out, k)
    inside = (q >= 0) & (q < size_in)
    c_out = (p * g_out // size_out)[:, None].expand(-1, k)
    c_in = q.clamp(0, size_in - 1) * g_in // size_in
    taps = torch.arange(k)[None, :].expand(size_out, -1)
    a = torch.zeros(g_out, g_in, k, dtype=torch.float64)
    a.index_put_((c_out[inside], c_in[inside], taps[inside]),
                 torch.ones((), dtype=torch.float64), accumulate=True)
    counts = torch.bincount(p * g_out // size_out, minlength=g_out).to(torch.float64)
    return a / counts[:, None, None]


@functools.lru_cache(maxsize=256)
def _axis_taps_on(size_in: int, size_out: int, g_in: int, g_out: int, k: int, stride: int,
                  pad: int, dil: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`_axis_taps` kept on the device: no host-to-device copy in the step."""
    return _axis_taps(size_in, size_out, g_in, g_out, k, stride, pad, dil).to(device, dtype)


def field_patches(conv: nn.Conv2d, field: Tensor, in_hw: tuple[int, int]
                  ) -> tuple[Tensor, tuple[int, int]]:
    """What ``conv`` reads from a field laid out over a map of ``in_hw`` positions, per
    output cell and averaged over the cell: an im2col of the field, (m, G'_h G'_w, C_in
    k_h k_w), and the output grid (G'_h, G'_w) (the field's, or the conv's output map
    where smaller)."""
    if conv.groups != 1 or not isinstance(conv.padding, tuple):
        raise ConfigError("sparse targets pass Conv2d layers with groups=1 and numeric "
                          "padding; use dense targets (--targets dense)")
    taps = []
    for n, g, k, s, p, d in zip(in_hw, field.shape[2:], conv.kernel_size, conv.stride,
                                conv.padding, conv.dilation):
        out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        taps.append(_axis_taps_on(n, out, g, min(g, out), k, s, p, d, field.device,
                                  field.dtype))
    u = torch.einsum("hxa,wyb,mixy->mhwiab", taps[0], taps[1], field)
    grid = (u.shape[1], u.shape[2])
    return u.reshape(field.shape[0], grid[0] * grid[1], -1), grid


def patches_conv(conv: nn.Conv2d, u: Tensor, grid: tuple[int, int]) -> Tensor:
    """The conv's weights applied to a field's im2col: (m, C_out, G'_h, G'_w), no bias."""
    a = (u @ conv.weight.reshape(conv.out_channels, -1).T).transpose(1, 2)
    return a.reshape(u.shape[0], conv.out_channels, *grid)


def conv_field(conv: nn.Conv2d, field: Tensor, in_hw: tuple[int, int]) -> Tensor:
    """A field through the conv: in each output cell, the mean over the cell of the conv
    of the laid-out map (exact, zero padding included), (m, C_in, G, G) -> (m, C_out, G',
    G')."""
    a = patches_conv(conv, *field_patches(conv, field, in_hw))
    return a if conv.bias is None else a + conv.bias.view(1, -1, 1, 1)


def bn_target(bn: _BatchNorm, h: Tensor, t: Tensor) -> Tensor:
    """Normalise targets with the statistics the module uses for ``h``: the batch's
    (differentiable, as for dense targets: Sec. III-D) in training, the running ones
    in eval mode. Call before ``bn(h)`` (which counts the batch in the running
    statistics)."""
    shape = (1, -1) + (1,) * (t.dim() - 2)
    if bn.training or bn.running_mean is None:
        dims = [0, *range(2, h.dim())]
        var, mean = torch.var_mean(h, dim=dims, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    out = (t - mean.view(shape)) * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out


# --- the written-out step (fastpath.py) for a conv block with window or field targets


class TargetConv(Protocol):
    """How a conv takes targets that travel apart from the inputs, written out
    (travel.WINDOW, travel.FIELD)."""

    def conv_fast(self, conv: nn.Conv2d, t: Tensor, hw: tuple[int, int]
                  ) -> tuple[Tensor, Tensor]:
        """(what the weight gradient reads, the conv of ``t`` without bias (m, C, G, G))."""

    def conv_fast_backward(self, conv: nn.Conv2d, da_t: Tensor, kept: Tensor,
                           input_grad: bool) -> tuple[Tensor | None, Tensor]:
        """(dL/dt if ``input_grad`` else None, dL/dW) from dL/d(conv of t)."""


@dataclass
class PairState:
    """What a conv block's forward on inputs and sparse targets keeps for its update:
    the inputs' :class:`~.fastpath.BlockState` and the targets' own small
    tensors (m rows of 1x1 fields)."""

    x: BlockState  # the inputs' part (its ``o`` is the block's output for the inputs)
    t_in: Tensor  # windows as they entered (m, C_in, G k, G k), or a field's im2col
    a_t: Tensor  # their pre-BatchNorm values (m, C, G, G)
    keep_t: Tensor | None  # their dropout mask
    o_t: Tensor  # their output field (m, C, G, G)
    travel: TargetConv
    t_scale: float = 1.0  # undoes dropout's scale on targets it spares (target_dropout off)


def pair_forward(parts: BlockParts, x: Tensor, t: Tensor, travel: TargetConv,
                 out: Tensor | None = None,
                 after_matmul: Callable[[], None] | None = None,
                 drop_targets: bool = True) -> PairState:
    """A standard conv block (fastpath.BlockParts) on inputs ``x`` (its own training
    forward, statistics from x) and on targets ``t`` (windows or fields, module
    docstring; ``travel`` says which), written out; dropout drops the targets too
    unless ``drop_targets`` is False. Call under no_grad."""
    t, a_t = travel.conv_fast(parts.op, t, tuple(x.shape[2:]))
    st = block_forward(parts, x, x.shape[0], out=out, after_matmul=after_matmul)
    # the same affine map and statistics as the inputs' (BatchNorm, dropout's scale)
    u_t = torch.native_batch_norm(a_t, st.weight, st.bias, st.mean, st.var, False, 0.0,
                                  parts.bn.eps)[0]
    keep_t, t_scale = None, 1.0
    if st.keep is not None:  # drawn either way: the inputs' masks do not depend on it
        keep_t = parts.dropout.keep_mask(u_t).view(torch.uint8)
        if not drop_targets:  # spared: kept, and dropout's scale (in st.weight) undone
            keep_t, t_scale = None, 1.0 / st.scale
    o_t = torch.ops.aten.leaky_relu_(u_t, parts.slope)
    if keep_t is not None:
        o_t.mul_(keep_t)
    if t_scale != 1.0:
        o_t.mul_(t_scale)
    return PairState(st, t, a_t, keep_t, o_t, travel, t_scale)


def pair_backward(parts: BlockParts, ps: PairState, do_x: Tensor, do_t: Tensor,
                  input_grad: bool = False) -> Tensor | None:
    """Gradients of the block's parameters from dL/d(outputs) of inputs and targets;
    returns dL/d(window targets) when ``input_grad`` (block 1: the generator learns
    through it), else None. Releases what the forward kept."""
    st = ps.x
    du = activation_backward(parts, st, do_x)
    du_t = torch.ops.aten.leaky_relu_backward(do_t, ps.o_t, parts.slope, False)
    if ps.keep_t is not None:
        du_t.mul_(ps.keep_t)
    if ps.t_scale != 1.0:
        du_t.mul_(ps.t_scale)
    da, da_t, dw, db = input_stats_backward_pair(du, st.a, du_t, ps.a_t, st.weight, st.mean,
                                                 st.var, parts.bn.eps)
    bn = parts.bn
    if bn.weight is not None:
        if st.scale != 1.0:  # d/dγ of f(BN_{sγ,sβ}) is s times that of the scaled map
            dw, db = dw.mul_(st.scale), db.mul_(st.scale)
        bn.weight.grad, bn.bias.grad = dw, db
    st.a = st.o = st.keep = st.weight = st.bias = st.pool_code = None  # type: ignore[assignment]
    conv = parts.op
    op_backward(conv, st.x, da)  # the inputs' part
    dx_t, dw_t = ps.travel.conv_fast_backward(conv, da_t, ps.t_in, input_grad)
    conv.weight.grad += dw_t
    if conv.bias is not None:  # BatchNorm cancels it: the sum is zero up to rounding
        conv.bias.grad += da_t.sum((0, 2, 3))
    st.held = None
    return dx_t


class PairBackward:
    """A conv block's written-out backward on inputs and sparse targets
    (:func:`pair_backward`), then the generator's from dL/d(window targets) when
    ``t_backward`` is given (block 1); all in :meth:`first` (the stage the next
    block's BatchNorm forward waits for), :meth:`second` does nothing."""

    def __init__(self, parts: BlockParts, ps: PairState, do_x: Tensor, do_t: Tensor,
                 t_backward: Callable[[Tensor, Tensor | None], None] | None = None) -> None:
        self.parts, self.ps, self.do_x, self.do_t = parts, ps, do_x, do_t
        self.t_backward = t_backward

    def first(self) -> None:
        dt_in = pair_backward(self.parts, self.ps, self.do_x, self.do_t,
                              input_grad=self.t_backward is not None)
        self.ps = self.do_x = self.do_t = None  # what the forward kept goes with the update
        if self.t_backward is not None:
            self.t_backward(dt_in, None)

    def second(self) -> None:
        pass

def field_pred_grads(kind: str, scale: float, h: Tensor, t: Tensor, y: Tensor, dh: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """L_pred of maps ``h (n, C, H, W)`` against fields ``t (m, C, G, G)``
    (:func:`sigprop.functional.field_compare`) and its gradients: dL/dh into ``dh``;
    returns (loss, logits, dL/dt)."""
    n = h.shape[0]
    grid, hw = tuple(t.shape[2:]), tuple(h.shape[2:])
    s = SF.cell_sums(h, grid).flatten(1)  # (n, C G G)
    tf = t.reshape(t.shape[0], -1)
    logits = s @ tf.T
    if kind == "l2":
        counts = SF.cell_counts(hw, grid, h).flatten().repeat(t.shape[1])  # (C G G)
        logits.mul_(2).sub_((tf * tf * counts).sum(1)).sub_(
            (h * h).flatten(1).sum(1, keepdim=True))
    logits.mul_(scale)
    loss, g = SF.pred_loss_grad(logits, y, scale)
    ds = g @ tf  # (n, C G G): every position of a cell gets its cell's value
    dt = g.T @ s
    if kind == "l2":
        ds.mul_(2)
        dt.mul_(2).sub_(tf * counts * (2 * g.sum(0).unsqueeze(1)))
        torch.mul(h, (-2 * g.sum(1)).view(n, 1, 1, 1), out=dh)
        dh.add_(SF.lay_out(ds.view(n, -1, *grid), hw))
    else:
        dh.copy_(SF.lay_out(ds.view(n, -1, *grid), hw))
    return loss, logits, dt.view_as(t)
