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
not arithmetic but overhead, measured on this CPU (docs/RESULTS.md): a sigprop step
of a 3-block net evaluated 50 autograd nodes in 3 backward calls, and its fixed cost
was twice backprop's.

Generators write out their own targets and gradients
(:meth:`sigprop.signals.TargetGenerator.fast_targets`); per-sample targets are compared
through their class means (:func:`pred_grads`).

Memory: the tensors kept from the forward pass for the update are the block input
x, the pre-normalisation a, the output o (the next block's input anyway) and a 1-byte
dropout mask; all but x are released after BatchNorm's backward (:func:`bn_backward`),
x after the weight gradient (:func:`linear_backward`): one block's worth. :func:`track_saved`
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

from . import functional as SF
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


def pred_grads(
    kind: str, scale: float, h: Tensor, t: Tensor, y: Tensor, dh: Tensor,
    dt: Tensor | None = None, num_classes: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """L_pred = CE(compare(h, t) * scale, y) and its gradients, without autograd.

    ``t`` holds one target per class, or, with ``num_classes``, one per sample: then
    L_pred compares with the class means of the targets and absent classes get no
    logit (as ``Sigprop._layer_logits``). dL/dh is written into ``dh``, dL/dt into
    ``dt`` (a new tensor when None). Returns (loss, logits, dL/dt, (means, present) of
    per-sample targets or None).
    """
    n = h.shape[0]
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
    logp = torch.log_softmax(logits, 1)
    loss = F.nll_loss(logp, y)
    g = logp.exp_()  # softmax; then - onehot(y), times scale / n
    g.index_put_((torch.arange(n, device=g.device), y), g.new_full((), -1.0), accumulate=True)
    g.mul_(scale / n)
    torch.mm(g, t, out=dh)
    # dL/d(rows of t): the targets themselves, or the class means
    dt_rows = torch.mm(g.T, h, out=dt) if dt is not None and classes is None else g.T @ h
    if kind == "l2":
        dh.mul_(2).sub_(h * (2 * g.sum(1, keepdim=True)))
        dt_rows.mul_(2).sub_(t * (2 * g.sum(0).unsqueeze(1)))
    if classes is None:
        return loss, logits, dt_rows, None
    # d mean_c / d t_j = 1/count_c for the samples j of class c
    counts = torch.bincount(y, minlength=num_classes).clamp_min_(1).to(dt_rows.dtype)
    dt_rows.div_(counts.unsqueeze(1))
    dt = torch.index_select(dt_rows, 0, y, out=dt) if dt is not None else dt_rows[y]
    return loss, logits, dt, classes


@dataclass
class BlockState:
    """What a block's forward keeps for its update (one block's worth)."""

    x: Tensor  # block input (flattened)
    a: Tensor  # x Wᵀ, before BatchNorm
    mean: Tensor
    var: Tensor
    o: Tensor  # block output; its sign is the LeakyReLU's (o = 0 where dropped)
    keep: Tensor | None  # dropout's keep mask as uint8 (0/1); None: no dropout
    scale: float  # dropout's 1/(1-p), folded into BatchNorm's affine map (1: none)
    weight: Tensor | None  # BatchNorm weight as applied (times scale)
    n_stats: int
    held: tuple[list, list] | None  # track_saved handles: (x's, the others')


def block_forward(parts: FCParts, x: Tensor, n_stats: int, out: Tensor | None = None,
                  after_matmul: Callable[[], None] | None = None) -> BlockState:
    """The block's training-mode forward; the output goes into ``out`` if given.
    BatchNorm takes its statistics from rows [:n_stats]. ``after_matmul`` is called
    between the Linear and BatchNorm (the pipeline waits there). Call under no_grad."""
    if parts.flatten:
        x = x.flatten(1)
    lin = parts.linear
    # The Linear's bias shifts every row alike and BatchNorm subtracts the mean right
    # after: it changes nothing but the running mean, so a = x Wᵀ skips adding it.
    a = x @ lin.weight.T
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
    u, mean, var = input_stats_forward(a, weight, bias, n_stats, bn.eps, bn.count_batch(),
                                       shift=lin.bias)
    if out is None:
        out = torch.empty_like(u)
    o = torch.ops.aten.leaky_relu.out(u, parts.slope, out=out)
    if keep is not None:
        o.mul_(keep)
    held = None
    if pack is not None:  # x is kept until the weight gradient, the rest until BN's
        held = (held_x, held_a + [pack(o)] + ([pack(keep)] if keep is not None else []))
    return BlockState(x, a, mean, var, o, keep, scale, weight, n_stats, held)


def bn_backward(parts: FCParts, st: BlockState, do: Tensor) -> Tensor:
    """The block's gradients up to the Linear's output: dL/da from dL/do
    (overwritten), BatchNorm's parameter gradients into ``.grad``. Releases what the
    forward kept except the input x; returns dL/da for :func:`linear_backward`."""
    bn = parts.bn
    # through the LeakyReLU (o > 0 exactly where BN's output is) and the dropout mask
    du = torch.ops.aten.leaky_relu_backward.grad_input(do, st.o, parts.slope, False,
                                                       grad_input=do)
    if st.keep is not None:
        du.mul_(st.keep)
    da, dw, db = input_stats_backward(du, st.a, st.weight, st.mean, st.var, st.n_stats, bn.eps)
    if bn.weight is not None:
        if st.scale != 1.0:  # d/dγ of f(BN_{sγ,sβ}) is s times that of the scaled map
            dw, db = dw.mul_(st.scale), db.mul_(st.scale)
        bn.weight.grad, bn.bias.grad = dw, db
    st.a = st.o = st.keep = st.weight = None  # type: ignore[assignment]
    if st.held is not None:
        st.held = (st.held[0], [])
    return da


def linear_backward(lin: nn.Linear, x: Tensor, da: Tensor) -> None:
    """The Linear's gradients from its input ``x`` and dL/da, into ``.grad``."""
    lin.weight.grad = da.T @ x
    if lin.bias is not None:
        lin.bias.grad = da.sum(0)


def block_backward(parts: FCParts, st: BlockState, do: Tensor) -> None:
    """Gradients of the block's parameters from dL/do (overwritten), into ``.grad``;
    releases what the forward kept."""
    linear_backward(parts.linear, st.x, bn_backward(parts, st, do))
    st.held = None


def block_step(
    parts: FCParts, x: Tensor, n: int, n_stats: int, y: Tensor, kind: str, scale: float,
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
