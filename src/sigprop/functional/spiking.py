"""Integrate-and-fire neurons and the arctan surrogate (Sec. VI, Eq. 15-17) as pure functions.

Conventions follow SpikingJelly's multi-step nodes (without depending on it):

* Eq. 15, no leak: the neuron charges ``v_t = v_{t-1} + h_t``;
* it fires when the charged voltage *reaches* the threshold, ``s_t = [v_t >= theta]``
  (SpikingJelly's ``heaviside(v - v_threshold)`` is ``x >= 0``; snnTorch fires on ``>``);
* hard reset to ``v_reset`` (0) after a spike: ``v_t <- v_t (1 - s_t) + v_reset s_t``;
* time-major tensors ``[T, N, ...]``; every sample starts at ``v = v_reset``.

The surrogate (Eq. 16) ``g(x) = atan(pi x)/pi + 1/2`` is a smooth step; its derivative
(Eq. 17) ``g'(x) = 1/(1 + (pi x)^2)`` is what ``SpikeATan`` uses as the gradient of the
spike's Heaviside step (SpikingJelly's ``surrogate.ATan(alpha=2)``: its
``alpha/2 / (1 + (pi/2 alpha x)^2)`` is Eq. 17 at alpha = 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def atan_surrogate(x: Tensor) -> Tensor:
    """Eq. 16: g(x) = atan(pi x)/pi + 1/2, a smooth step from 0 to 1 (0.5 at x = 0)."""
    return torch.atan(x * math.pi) / math.pi + 0.5


def atan_surrogate_grad(x: Tensor) -> Tensor:
    """Eq. 17: g'(x) = 1/(1 + (pi x)^2)."""
    return 1.0 / (1.0 + (math.pi * x).square())


class SpikeATan(torch.autograd.Function):
    """Forward the Heaviside step ``[x >= 0]``; backward Eq. 17 (the surrogate's slope)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * atan_surrogate_grad(x)


def heaviside(x: Tensor, surrogate: bool = True) -> Tensor:
    """``[x >= 0]``; with ``surrogate`` its gradient is Eq. 17, else it has none."""
    if surrogate and x.requires_grad:
        return SpikeATan.apply(x)
    return (x >= 0).to(x.dtype)


def if_step(h: Tensor, v: Tensor, threshold: float, v_reset: float = 0.0,
            surrogate: bool = True) -> tuple[Tensor, Tensor]:
    """One step of an integrate-and-fire neuron: ``(spike, v_after_reset)``.

    Charge ``u = v + h`` (Eq. 15), fire ``s = [u >= threshold]`` (gradient Eq. 17 when
    ``surrogate`` and the inputs need one), hard reset ``v' = u (1 - s) + v_reset s``.
    """
    u = v + h
    s = heaviside(u - threshold, surrogate)
    return s, u * (1.0 - s) + v_reset * s


def if_sequence(h: Tensor, threshold: float | Tensor, v_reset: float = 0.0,
                surrogate: bool = True, detach_carry: bool = False,
                static: int | bool = False) -> tuple[Tensor, Tensor]:
    """Run ``T`` steps of :func:`if_step` from ``v = v_reset``: ``(spikes, charged)``.

    The reference: one autograd node per operation. :func:`if_run` computes the same
    values and gradients with one node for the whole sequence (tests compare them).

    ``h``: ``[T, N, ...]`` inputs per step, or one ``[N, ...]`` input repeated for ``T``
    steps when ``static`` is an int T (the first layer of a net fed a still image: its
    convolution runs once). ``spikes`` and ``charged`` are ``[T, N, ...]``; ``charged``
    holds each step's voltage after charging and before firing and reset, the state the
    sigprop models compare (``u_t = v_{t-1} + h_t``).

    ``detach_carry``: the voltage carried from one step to the next is a constant for
    autograd, so a gradient of step t reaches ``h_t`` only: no gradient through time or
    through the spike and reset (sigprop's SNN models). Else the gradient flows through
    time and, with ``surrogate``, through every spike (backprop through time).
    """
    if static is not False and (isinstance(static, bool) or static < 1):
        raise ValueError(f"static must be False or a number of steps >= 1, got {static!r}")
    steps = static if static else h.shape[0]
    v = None
    spikes, charged = [], []
    for t in range(steps):
        ht = h if static else h[t]
        u = ht + v_reset if v is None else v + ht
        s = heaviside(u - threshold, surrogate and not detach_carry)
        spikes.append(s)
        charged.append(u)
        v = u * (1.0 - s) + v_reset * s
        if detach_carry:
            v = v.detach()
    return torch.stack(spikes), torch.stack(charged)


class _IFRun(torch.autograd.Function):
    """IF neurons over T steps (v_reset = 0) as one autograd node (see :func:`if_run`).

    Forward, per step: ``u = v + h_t`` into a preallocated ``charged[t]``, ``s = [u >=
    theta]``, ``v = u`` with the spiking neurons set to 0. Only ``charged`` is saved (the
    spikes are recomputed from it). Backward through time (``bptt``), with
    ``sg_t = g'(u_t - theta)`` (Eq. 17) and ``v_t = u_t (1 - s_t)``::

        du_t = ds_t sg_t + dv_t ((1 - s_t) - u_t sg_t) + dcharged_t,
        dh_t = du_t,  dv_{t-1} = du_t

    (the reset's gradient flows through the spike's surrogate, as SpikingJelly's
    ``detach_reset=False``). Local (``bptt`` False): the spikes carry no gradient and
    ``dh_t = dcharged_t``. A static input's gradient is the sum over the steps.
    """

    @staticmethod
    def forward(ctx, h: Tensor, threshold: Tensor, steps: int, static: bool, bptt: bool):
        shape = (steps, *h.shape) if static else h.shape
        charged = torch.empty(shape, dtype=h.dtype, device=h.device)
        # spikes that carry no gradient stay bool (1 byte: cheaper to write and to pool)
        spikes = torch.empty(shape, dtype=h.dtype if bptt else torch.bool, device=h.device)
        fired = torch.empty(shape[1:], dtype=torch.bool, device=h.device) if bptt else None
        v = None
        for t in range(steps):
            ht = h if static else h[t]
            u = charged[t]
            if v is None:
                u.copy_(ht)
            else:
                torch.add(v, ht, out=u)
            if bptt:
                torch.ge(u, threshold, out=fired)
                spikes[t].copy_(fired)
                v = u.masked_fill(fired, 0.0)
            else:
                torch.ge(u, threshold, out=spikes[t])
                v = u.masked_fill(spikes[t], 0.0)
        ctx.save_for_backward(charged, threshold)
        ctx.static, ctx.bptt = static, bptt
        if not bptt:
            ctx.mark_non_differentiable(spikes)
        return spikes, charged

    @staticmethod
    def backward(ctx, d_spikes: Tensor | None, d_charged: Tensor | None):
        charged, threshold = ctx.saved_tensors
        steps = charged.shape[0]
        if not ctx.bptt:
            if d_charged is None:
                return None, None, None, None, None
            return (d_charged.sum(0) if ctx.static else d_charged), None, None, None, None
        dh = torch.empty_like(charged)
        dv = None
        for t in reversed(range(steps)):
            u = charged[t]
            x = u - threshold
            fired = x >= 0
            sg = x.square_().mul_(math.pi ** 2).add_(1.0).reciprocal_()  # Eq. 17
            du = dh[t]
            if d_spikes is not None:
                torch.mul(d_spikes[t], sg, out=du)
            else:
                du.zero_()
            if dv is not None:
                # dv * ((1 - s) - u sg) = dv * (1 - s) - dv * u * sg
                du.add_(dv.masked_fill(fired, 0.0)).sub_(dv * u * sg)
            if d_charged is not None:
                du.add_(d_charged[t])
            dv = du
        return (dh.sum(0) if ctx.static else dh), None, None, None, None


def if_run(h: Tensor, threshold: float | Tensor, steps: int | None = None,
           bptt: bool = True) -> tuple[Tensor, Tensor]:
    """IF neurons (v_reset = 0) over time, one autograd node: ``(spikes, charged)``.

    As :func:`if_sequence` with ``surrogate=True``: ``h`` ``[T, N, ...]``, or ``[N, ...]``
    with ``steps`` = T (a static input); ``bptt`` False is ``detach_carry=True`` (the
    gradient reaches ``h_t`` only through ``charged_t``; the spikes carry none). Spikes
    that carry no gradient (``bptt`` False, or no gradient wanted) are returned as bool.
    """
    thr = threshold if isinstance(threshold, Tensor) else torch.tensor(float(threshold))
    thr = thr.to(device=h.device, dtype=h.dtype)
    bptt = bptt and torch.is_grad_enabled() and h.requires_grad
    static = steps is not None
    return _IFRun.apply(h, thr, steps if static else h.shape[0], static, bptt)


class _SurrogateActivity(torch.autograd.Function):
    """g(u - theta) (Eq. 16) with gradient g'(u - theta) (Eq. 17); saves only u.

    Three passes over u each way: x = pi u - pi theta, atan, 1/2 + x/pi (forward);
    x, 1 + x x, g / (1 + x x) (backward)."""

    @staticmethod
    def forward(ctx, u: Tensor, threshold: Tensor) -> Tensor:
        ctx.save_for_backward(u, threshold)
        x = torch.add(threshold * -math.pi, u, alpha=math.pi).atan_()
        return torch.add(torch.full((), 0.5, dtype=u.dtype, device=u.device), x,
                         alpha=1 / math.pi, out=x)

    @staticmethod
    def backward(ctx, g: Tensor):
        u, threshold = ctx.saved_tensors
        x = torch.add(threshold * -math.pi, u, alpha=math.pi)
        one = torch.ones((), dtype=u.dtype, device=u.device)
        return g / torch.addcmul(one, x, x, out=x), None


def surrogate_activity(u: Tensor, threshold: float | Tensor) -> Tensor:
    """``atan_surrogate(u - threshold)`` as one autograd node that saves only ``u``."""
    thr = threshold if isinstance(threshold, Tensor) else torch.tensor(float(threshold))
    return _SurrogateActivity.apply(u, thr.to(device=u.device, dtype=u.dtype))


class _StepSimilarity(torch.autograd.Function):
    """``[T, n, m]`` similarities of rows ``[:, :n]`` (inputs) of ``a`` ``[T, B, d]`` to
    rows ``[:, n:]`` (one target per class), per time step; see :func:`step_similarity`.

    The backward writes both parts of the gradient into one ``[T, B, d]`` tensor with two
    batched products (slicing or splitting ``a`` under autograd would fill zeros or
    concatenate a copy of the same size)."""

    @staticmethod
    def forward(ctx, a: Tensor, n: int, kind: str, scale: float) -> Tensor:
        h, t = a[:, :n], a[:, n:]
        sim = torch.bmm(h, t.transpose(1, 2))
        if kind == "l2":  # 2 h.t - |h|^2 - |t|^2 (Eq. 7 as a similarity)
            sim.mul_(2).sub_(h.square().sum(2, keepdim=True)).sub_(t.square().sum(2).unsqueeze(1))
        ctx.save_for_backward(a)
        ctx.n, ctx.kind, ctx.scale = n, kind, scale
        return sim.mul_(scale)

    @staticmethod
    def backward(ctx, g: Tensor):
        (a,) = ctx.saved_tensors
        n = ctx.n
        g = g * ctx.scale
        h, t = a[:, :n], a[:, n:]
        da = torch.empty_like(a)
        if ctx.kind == "l2":
            g = g * 2
        torch.bmm(g, t, out=da[:, :n])
        torch.bmm(g.transpose(1, 2), h, out=da[:, n:])
        if ctx.kind == "l2":  # d(-|h|^2) = -2h sum_m g; here g is already 2g
            da[:, :n].sub_(h * g.sum(2, keepdim=True))
            da[:, n:].sub_(t * g.sum(1).unsqueeze(2))
        return da, None, None, None


def step_similarity(a: Tensor, n: int, kind: str = "dot", scale: float = 1.0) -> Tensor:
    """Per time step, the similarity (Eq. 6 dot, or Eq. 7 L2) of each of the ``n`` input
    rows of ``a`` ``[T, B, ...]`` to each of the ``B - n`` target rows, times ``scale``:
    ``[T, n, B - n]``. Computed in the dtype of ``a`` (float32 for the SNN models)."""
    if kind not in ("dot", "l2"):
        raise ValueError(f"unknown comparison {kind!r}; use 'dot' or 'l2'")
    return _StepSimilarity.apply(a.flatten(2), n, kind, float(scale))
