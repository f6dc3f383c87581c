"""Written-out local updates for standard fully connected blocks: no autograd.

A sigprop block learns from its own loss on its own outputs, with its input
detached, so its whole update is a short, fixed formula: nothing crosses a block
boundary and no graph is needed. For the blocks this library builds (``Linear ->
BatchNorm -> LeakyReLU [-> Dropout]``, :func:`sigprop.networks.fc_block`) with the
per-class label generator (Eq. 1), :func:`block_step` runs the forward pass and
writes every parameter's gradient directly:

    a = x Wᵀ (+ b);  u = BN(a) (statistics from rows [:n_stats]);  o = u * c,
    c = keep/(1-p) * (1 if u > 0 else slope)   (LeakyReLU and dropout as one factor)
    logits = compare(o[:n], t) * s;  L = CE(logits, y)
    dlogits = s (softmax(logits) - onehot(y)) / n
    do = [dlogits t ; dlogitsᵀ o[:n]]      (dot; L2 adds its |t|² term)
    du = do * c;  da = BN backward with the input-statistics correction
    dW = daᵀ x;  db = Σ da;  dγ = Σ du * û;  dβ = Σ du

The autograd path (``fast_path="off"``) computes the same numbers, op for op up to
rounding; tests/test_fastpath.py checks one against the other. What this saves is
not arithmetic but overhead, measured on this CPU (docs/RESULTS.md): a sigprop step
of a 3-block net evaluated 50 autograd nodes in 3 backward calls, and its fixed cost
was twice backprop's.

Memory: the tensors kept from the forward pass for the update are the block input
x, the pre-normalisation a, the factor c and the output o, released when the block's
update is done: one block's worth, as in the autograd path. :func:`track_saved`
lets a benchmark count them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import InputStatsBatchNorm, input_stats_backward, input_stats_forward
from .networks import Dropout

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
class FCParts:
    """The modules of one standard fully connected block."""

    linear: nn.Linear
    bn: InputStatsBatchNorm
    slope: float
    dropout: Dropout | None
    flatten: bool
    modules: tuple[nn.Module, ...]  # every module of the block, for the hook check


def match_fc_block(block: nn.Module) -> FCParts | str:
    """The block's parts if the fast path computes it exactly, else why not."""
    if type(block) is not nn.Sequential:
        return f"block is a {type(block).__name__}, not an nn.Sequential"
    mods = list(block)
    flatten = bool(mods) and type(mods[0]) is nn.Flatten
    if flatten and (mods[0].start_dim, mods[0].end_dim) != (1, -1):
        return "block flattens other than from dim 1"
    body = mods[1:] if flatten else mods
    kinds = [type(m).__name__ for m in body]
    if not (
        len(body) in (3, 4)
        and type(body[0]) is nn.Linear
        and type(body[1]) is InputStatsBatchNorm
        and type(body[2]) is nn.LeakyReLU
        and (len(body) == 3 or type(body[3]) is Dropout)
    ):
        return f"block is {kinds}, not [Linear, BatchNorm, LeakyReLU(, sigprop Dropout)]"
    bn = body[1]
    if bn.num_features != body[0].out_features:
        return "BatchNorm width differs from the Linear's"
    return FCParts(
        linear=body[0], bn=bn, slope=float(body[2].negative_slope),
        dropout=body[3] if len(body) == 4 else None, flatten=flatten, modules=(block, *mods),
    )


def hooked(modules: tuple[nn.Module, ...]) -> bool:
    """True if any module (or the global registry) has forward or backward hooks,
    which only a real module call honours."""
    from torch.nn.modules import module as _m

    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks",
                    "_global_backward_hooks", "_global_backward_pre_hooks")
    if any(getattr(_m, name, None) for name in global_hooks):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def _logit_grads(kind: str, scale: float, h: Tensor, t: Tensor, y: Tensor, dh: Tensor,
                 dt: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """L_pred = CE(compare(h, t) * scale, y): loss and logits; dL/dh is written into
    ``dh`` and dL/dt into ``dt`` (a new tensor when None), which is returned too."""
    n = h.shape[0]
    logits = torch.mm(h, t.T)
    if kind == "l2":  # 2h·t - |h|² - |t|², as functional.l2_compare
        logits.mul_(2).sub_((h * h).sum(1, keepdim=True)).sub_((t * t).sum(1))
    logits.mul_(scale)
    logp = torch.log_softmax(logits, 1)
    loss = F.nll_loss(logp, y)
    g = logp.exp_()  # softmax; then - onehot(y), times scale / n
    g.index_put_((torch.arange(n, device=g.device), y), g.new_full((), -1.0), accumulate=True)
    g.mul_(scale / n)
    torch.mm(g, t, out=dh)
    dt = torch.mm(g.T, h) if dt is None else torch.mm(g.T, h, out=dt)
    if kind == "l2":
        dh.mul_(2).sub_(h * (2 * g.sum(1, keepdim=True)))
        dt.mul_(2).sub_(t * (2 * g.sum(0).unsqueeze(1)))
    return loss, logits, dt


def block_step(
    parts: FCParts, x: Tensor, n: int, n_stats: int, y: Tensor, kind: str, scale: float,
    targets: Tensor | None = None, out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One block's forward pass and local gradients, written into ``.grad``.

    ``x``: the block input (detached); its first ``n`` rows are inputs, the rest
    targets. The block's own loss compares output rows [:n] with output rows [n:],
    or, when ``targets`` is given (block 1, whose targets come from the generator),
    all output rows with ``targets``. The output goes into ``out`` if given. Returns
    (output, loss, logits, dL/dtargets or None). Call under ``torch.no_grad()``.
    """
    if parts.flatten:
        x = x.flatten(1)
    lin = parts.linear
    # The Linear's bias shifts every row alike and BatchNorm subtracts the mean right
    # after: it changes nothing but the running mean, so a = x Wᵀ skips adding it.
    a = x @ lin.weight.T
    bn = parts.bn
    u, mean, var = input_stats_forward(a, bn.weight, bn.bias, n_stats, bn.eps,
                                       bn.count_batch(), shift=lin.bias)
    drop = parts.dropout
    if out is None:
        out = torch.empty_like(u)
    if drop is not None and drop.active:
        # c = keep/(1-p) * LeakyReLU'(u): one factor for both, reused by the update
        c = torch.mul(drop.keep_mask(u).view(torch.uint8), drop.scale)  # uint8 -> float
        c = torch.ops.aten.leaky_relu_backward.grad_input(c, u, parts.slope, False, grad_input=c)
        o = torch.mul(u, c, out=out)
    else:
        c = None
        o = torch.ops.aten.leaky_relu.out(u, parts.slope, out=out)
    pack = _PACK.get()
    held = [pack(v) for v in (x, a, u if c is None else c, o)] if pack is not None else None

    do = torch.empty_like(o)
    if targets is None:
        loss, logits, _ = _logit_grads(kind, scale, o[:n], o[n:], y, do[:n], do[n:])
        dt = None
    else:
        loss, logits, dt = _logit_grads(kind, scale, o, targets, y, do)
    du = do.mul_(c) if c is not None else torch.ops.aten.leaky_relu_backward(
        do, u, parts.slope, False)
    da, dw, db = input_stats_backward(du, a, bn.weight, mean, var, n_stats, bn.eps)
    if bn.weight is not None:
        bn.weight.grad, bn.bias.grad = dw, db
    lin.weight.grad = da.T @ x
    if lin.bias is not None:
        lin.bias.grad = da.sum(0)
    del held
    return o, loss, logits, dt


def label_targets(proj: nn.Linear, slope: float) -> tuple[Tensor, Tensor]:
    """Eq. 1 for every class at once: t1 = LeakyReLU(Sᵀ + d); returns (t1, S c + d)."""
    g = proj.weight.T + proj.bias if proj.bias is not None else proj.weight.T.clone()
    return F.leaky_relu(g, slope), g


def label_backward(proj: nn.Linear, slope: float, g: Tensor, dt: Tensor) -> None:
    """Gradients of the label projection from dL/dt1."""
    dg = torch.ops.aten.leaky_relu_backward(dt, g, slope, False)
    if proj.weight.requires_grad:
        proj.weight.grad = dg.T.contiguous()
    if proj.bias is not None and proj.bias.requires_grad:
        proj.bias.grad = dg.sum(0)
