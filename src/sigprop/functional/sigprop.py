"""The paper's equations as pure functions (no state, one return type each).

Shapes: ``h`` is ``(n, d)`` (n samples), ``t`` is ``(m, d)`` (one target per class
for Eq. 1, or any set of m targets). Comparisons return *similarity logits*
``(n, m)``: larger means "h belongs to t". Eq. 9 writes CE(y*, -O(h, t)); the sign
there makes sense for a distance, so we fold it into the comparison: dot gives
``+h·t`` and L2 gives ``-||h - t||²``. ``scale`` multiplies the logits (a softmax
temperature); see ``default_scale`` for why the raw dot product needs one.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dot_compare",
    "l2_compare",
    "compare",
    "compare_paired",
    "cell_sums",
    "cell_counts",
    "lay_out",
    "field_compare",
    "field_scale",
    "default_scale",
    "pred_loss",
    "class_targets",
    "class_counts",
    "pred_loss_grad",
    "label_projection",
    "label_input_modulation",
    "loop_back_prediction",
    "loop_back_error",
]


def dot_compare(h: Tensor, t: Tensor, scale: float = 1.0) -> Tensor:
    """Eq. 6, O_dot(h, t) = h · tᵀ, times ``scale``. (n, d), (m, d) -> (n, m)."""
    return (h.flatten(1) @ t.flatten(1).T) * scale


def l2_compare(h: Tensor, t: Tensor, scale: float = 1.0) -> Tensor:
    """Eq. 7 as a similarity: -Σ_k (t_jk - h_ik)², times ``scale``. -> (n, m).

    Expanded as 2h·t - |h|² - |t|² so no (n, m, d) tensor is built.
    """
    h, t = h.flatten(1), t.flatten(1)
    sq = 2 * (h @ t.T) - (h * h).sum(1, keepdim=True) - (t * t).sum(1)
    return sq * scale


def compare(h: Tensor, t: Tensor, kind: str = "dot", scale: float = 1.0) -> Tensor:
    """Dispatch to :func:`dot_compare` or :func:`l2_compare` by name."""
    if kind == "dot":
        return dot_compare(h, t, scale)
    if kind == "l2":
        return l2_compare(h, t, scale)
    raise ValueError(f"unknown comparison {kind!r}; use 'dot' or 'l2'")


def default_scale(kind: str, dim: int, per_sample: bool = False, conv: bool = False) -> float:
    """Logit scale used unless the user sets one: c/sqrt(d), c chosen by measurement.

    With BatchNorm + LeakyReLU units of order 1, an aligned pair gives h·t ~ d and a
    random one ~ sqrt(d); for d = 1000 raw logits reach 60-120, the softmax saturates
    and deeper layers stop learning. Scaling by c/sqrt(d) keeps every layer learning.
    Sweeps on Fashion-MNIST (20k images, 4 epochs, fc-2x800; docs/RESULTS.md):
    * one target per class (Eq. 1), dot: c = 0.9, 1.8, 3.6, 7.2, 14.3 gave 0.851, 0.857,
      0.862, 0.858, 0.844 test accuracy (fc-3x1000: c = 2, 4, 8 gave 0.854, 0.859,
      0.859) -> c = 4;
    * one target per sample (Eq. 10-12): c = 4 hurt (Eq. 10: 0.806 -> 0.601; Eq. 11:
      layer-2 early exit 0.844 -> 0.456) -> c = 1;
    * conv block outputs (``conv``: d = C H W, 16k on CONV's first block, 131k on
      VGG8b's): on CONV (3k Fashion-MNIST images, 2 epochs) c = 1 on the conv blocks
      gave 0.766 / 0.750 at the last exit (seeds 0 / 1) against 0.746 / 0.743 with c = 4,
      and c = 16 0.713 -> c = 1.
    The L2 similarity is 2h·t - |t|² (|h|² cancels in the softmax): the same
    temperature is half the scale (sweep for Eq. 1: best near c = 2.3).
    """
    c = 1.0 if per_sample or conv else 4.0
    return (c if kind == "dot" else c / 2) / math.sqrt(dim)


def pred_loss(
    h: Tensor, t: Tensor, y: Tensor, kind: str = "dot", scale: float = 1.0
) -> Tensor:
    """Eq. 9, L_pred = CE(y, O(h, t)) with one target per class.

    h: (n, d) outputs; t: (m, d) targets, row c the target of class c; y: (n,) class
    indices in [0, m). Rows of ``t`` that are NaN-free but absent from the batch are
    fine; use :func:`class_targets` to build ``t`` from per-sample targets.
    """
    return F.cross_entropy(compare(h, t, kind, scale), y)


def class_targets(t: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-sample targets (n, d) -> per-class means (m, d) and a presence mask (m,).

    Eq. 10 and the loop-back generators make one target per sample; L_pred compares
    each output against one target per class, so targets of a class are averaged.
    A class absent from the batch gets a zero row and ``present[c] = False``.
    """
    flat = t.flatten(1)
    sums = flat.new_zeros(num_classes, flat.shape[1]).index_add_(0, y, flat)
    counts = class_counts(y, num_classes).to(flat.dtype)
    means = sums / counts.clamp_min(1).unsqueeze(1)
    return means.view(num_classes, *t.shape[1:]), counts > 0


def class_counts(y: Tensor, num_classes: int) -> Tensor:
    """How many labels of ``y`` fall in each class: (num_classes,) float32 on y's device,
    exact to 2^24. Not ``bincount``, which reads max(y) on the host (a GPU sync)."""
    ones = torch.ones(y.shape[0], dtype=torch.float32, device=y.device)
    return torch.zeros(num_classes, dtype=torch.float32, device=y.device).index_add_(0, y, ones)


def pred_loss_grad(logits: Tensor, y: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """CE(logits, y) of logits that are ``scale`` times a comparison, and the gradient
    of that loss by the comparison: scale (softmax(logits) - onehot(y)) / n, (n, m).
    The written-out steps' L_pred backward; ``logits`` is left as it was."""
    n = logits.shape[0]
    logp = torch.log_softmax(logits, 1)
    loss = F.nll_loss(logp, y)
    g = logp.exp_()  # softmax
    g.index_put_((torch.arange(n, device=g.device), y), g.new_full((), -1.0), accumulate=True)
    return loss, g.mul_(scale / n)

# --- target generators (Sec. III-D), as functions of their weights ---------------

def label_projection(c: Tensor, S: Tensor, d: Tensor, f=F.leaky_relu) -> Tensor:
    """Eq. 1, t1 = f(S1 c + d1). c: (m, classes) one-hot rows -> (m, out)."""
    return f(F.linear(c, S, d))


def label_input_modulation(
    h1: Tensor, c: Tensor, S1: Tensor, d1: Tensor, S2: Tensor, d2: Tensor,
    f_scale=torch.sigmoid, f_shift=F.leaky_relu,
) -> Tensor:
    """Eq. 10, t1 = h1 ⊙ f(S1 c + d1) + f(S2 c + d2): one target per sample.

    h1: (..., d) first-layer outputs, flattened; c: (..., classes) one-hot labels; the
    leading axes broadcast, e.g. h1 (n, 1, d) with c (m, classes) gives every sample's
    target under every class, (n, m, d). The scale goes through ``f_scale`` (default a
    sigmoid: a gain in (0, 1)), the shift through ``f_shift``.
    """
    return h1 * f_scale(F.linear(c, S1, d1)) + f_shift(F.linear(c, S2, d2))


def loop_back_prediction(
    y_out: Tensor, c: Tensor, S: Tensor, d: Tensor, f=F.leaky_relu
) -> Tensor:
    """Eq. 11, t1 = f(S1 y3 + S1 y* + d1): the output prediction plus the label.

    y_out: (n, classes) output probabilities; c: (n, classes) one-hot labels.
    """
    return f(F.linear(y_out + c, S, d))


def loop_back_error(
    h_out: Tensor, grad_out: Tensor, S: Tensor, d: Tensor, eta: float, f=F.leaky_relu
) -> Tensor:
    """Eq. 12, t1 = f(S1 (h3 - η dL/dh3) + d1): the output moved against its error."""
    return f(F.linear(h_out - eta * grad_out, S, d))


def compare_paired(h: Tensor, t: Tensor, kind: str = "dot", scale: float = 1.0) -> Tensor:
    """Compare each sample with its own candidate targets: (n, d), (n, m, d) -> (n, m).

    Used at inference for per-sample generators, where sample j has one candidate
    target per class.
    """
    h, t = h.flatten(1).unsqueeze(1), t.flatten(2)
    if kind == "dot":
        return (h * t).sum(-1) * scale
    if kind == "l2":
        return -((h - t) ** 2).sum(-1) * scale
    raise ValueError(f"unknown comparison {kind!r}; use 'dot' or 'l2'")


def cell_matrix(size: int, cells: int, like: Tensor) -> Tensor:
    """(cells, size): row c is 1 at the positions of cell c along one axis of a map,
    ``cell(p) = floor(p cells / size)`` (nearest-neighbour layout: cells of equal size
    up to one position). Made once per shape, device and dtype."""
    return _cell_matrix(size, cells, like.device, like.dtype)


@functools.lru_cache(maxsize=256)
def _cell_matrix(size: int, cells: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    cell = torch.arange(size, device=device) * cells // size
    return (cell == torch.arange(cells, device=device)[:, None]).to(dtype)


def cell_sums(h: Tensor, grid: tuple[int, int]) -> Tensor:
    """Sum of a map ``h (n, C, H, W)`` over each cell of a ``grid`` (gh, gw) of nearly
    equal cells: (n, C, gh, gw); a 1x1 grid is the sum over the map."""
    if tuple(grid) == (1, 1):
        return h.sum((2, 3), keepdim=True)
    ph = cell_matrix(h.shape[2], grid[0], h)
    pw = cell_matrix(h.shape[3], grid[1], h)
    return ph @ h @ pw.T


def lay_out(t: Tensor, hw: tuple[int, int]) -> Tensor:
    """A field ``t (m, C, gh, gw)`` laid out over a map of ``hw`` positions: every
    position takes its cell's value (the transpose of :func:`cell_sums`)."""
    if t.shape[2:] == (1, 1):
        return t.expand(-1, -1, *hw)
    ph = cell_matrix(hw[0], t.shape[2], t)
    pw = cell_matrix(hw[1], t.shape[3], t)
    return ph.T @ t @ pw


def cell_counts(hw: tuple[int, int], grid: tuple[int, int], like: Tensor) -> Tensor:
    """Positions in each cell, (gh, gw)."""
    return torch.outer(cell_matrix(hw[0], grid[0], like).sum(1),
                       cell_matrix(hw[1], grid[1], like).sum(1))


def field_compare(h: Tensor, t: Tensor, kind: str = "dot", scale: float = 1.0) -> Tensor:
    """Compare maps with fields (sparse targets, Sec. III-E; rules.sigprop.sparse): h (n, C, H,
    W) against t (m, C, gh, gw), each t standing for the map whose every position has
    its cell's value (:func:`lay_out`; a 1x1 field is one value per channel over the
    whole map). The same logits as :func:`compare` of h with the laid-out t, without
    building it: dot ``cell_sums(h) · t``; L2 ``2 cell_sums(h) · t - sum_cells count
    |t|² - |h|²``. -> (n, m)."""
    grid = tuple(t.shape[2:])
    s = cell_sums(h, grid).flatten(1)  # (n, C gh gw)
    tf = t.flatten(1)
    logits = s @ tf.T
    if kind == "l2":
        counts = cell_counts(tuple(h.shape[2:]), grid, h).flatten().repeat(t.shape[1])
        logits = 2 * logits - (tf * tf * counts).sum(1) - (h * h).flatten(1).sum(1, keepdim=True)
    elif kind != "dot":
        raise ValueError(f"unknown comparison {kind!r}; use 'dot' or 'l2'")
    return logits * scale


def field_scale(kind: str, channels: int, positions: int, cells: int = 1) -> float:
    """Default logit scale of :func:`field_compare`: that of comparing the map's *cell
    means* with the field as a ``channels x cells``-long vector, c/sqrt(C cells) /
    (positions per cell). A field is coherent over a cell, so a cell's sum grows like
    its size, not its square root: with the dense scale c/sqrt(C H W), the first conv
    block of CONV started at L_pred ~18 (logits ~80 apart) on Fashion-MNIST."""
    return default_scale(kind, channels * cells) * cells / positions
