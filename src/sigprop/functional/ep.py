"""Continuous Hopfield dynamics and their Hebbian updates (Sec. V, Eq. 13-14; Scellier
& Bengio 2017), as pure functions on batches: states ``s`` are (n, units) per layer,
one matmul per layer per step, no Python per sample.

* ``rho(s) = clip(s, 0, 1)`` (the hard sigmoid of Scellier & Bengio), so within [0, 1]
  its derivative is 1; every Euler step ends with the state clipped to [0, 1] (as their
  code does), so rho(s) = s and rho'(s) = 1 on every state the dynamics visit.
* One Euler step of Eq. 13 with r_j = 1: ``s <- clip(s + dt (drive(s) - s - beta (s -
  d)[output only]), 0, 1)`` where ``drive`` is the weighted input of each layer plus its
  bias. Which layers feed which is the architecture's: ``loopback_drives`` (sigprop,
  Fig. 2c: feedforward, plus the output fed back to the first hidden layer) or
  ``symmetric_drives`` (EP: each layer gets its neighbours both ways through the same
  matrix).
* Eq. 14, sigprop's update: ``dW = a(pre^0)^T (rho(post^beta) - rho(post^0)) / (beta n)``
  (pre-synaptic free activity times the post-synaptic change); Scellier & Bengio's
  contrastive update for symmetric weights: ``(a(pre^b)^T rho(post^b) - a(pre^0)^T
  rho(post^0)) / (beta n)``. Both averaged over the batch. ``a`` is the activity the
  drives use: ``rho(s)`` of a layer, the input ``x`` as it is (one input, one energy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rho(s: Tensor) -> Tensor:
    return s.clamp(0.0, 1.0)


def loopback_drives(states: list[Tensor], x: Tensor, weights: list[Tensor],
                    biases: list[Tensor], loop: Tensor) -> list[Tensor]:
    """Each layer's input under sigprop's loop (Fig. 2c): layer 1 from the input and,
    through ``loop`` (units of the output, units of layer 1), from the output layer; layer
    l > 1 from layer l - 1 only. ``weights[l]`` maps layer l's source to it, (in, out)."""
    drives = []
    for i, (W, b) in enumerate(zip(weights, biases)):
        src = x if i == 0 else rho(states[i - 1])
        d = torch.addmm(b, src, W)
        if i == 0:
            d.addmm_(rho(states[-1]), loop)
        drives.append(d)
    return drives


def symmetric_drives(states: list[Tensor], x: Tensor, weights: list[Tensor],
                     biases: list[Tensor]) -> list[Tensor]:
    """Each layer's input under EP with symmetric feedback: from the layer below through
    W and from the layer above through Wᵀ (the same matrix), plus its bias."""
    drives = []
    last = len(weights) - 1
    for i, (W, b) in enumerate(zip(weights, biases)):
        src = x if i == 0 else rho(states[i - 1])
        d = torch.addmm(b, src, W)
        if i < last:
            d.addmm_(rho(states[i + 1]), weights[i + 1].T)
        drives.append(d)
    return drives


def euler_step(states: list[Tensor], drives: list[Tensor], dt: float, beta: float = 0.0,
               target: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """One explicit Euler step of Eq. 13 (r = 1), the output nudged toward ``target`` by
    ``beta``; returns the new states and the residual ||ds/dt|| per sample (n,), over all
    units, of the step taken (after the clip)."""
    new, sq = [], None
    last = len(states) - 1
    for i, (s, d) in enumerate(zip(states, drives)):
        ds = d - s
        if beta and i == last:
            ds = ds - beta * (s - target)
        s2 = (s + dt * ds).clamp_(0.0, 1.0)
        step = (s2 - s).square().sum(1)
        sq = step if sq is None else sq + step
        new.append(s2)
    return new, sq.sqrt() / dt


def activity(states: list[Tensor], x: Tensor, i: int) -> Tensor:
    """The pre-synaptic activity of layer ``i``'s forward weights, as the drives use it:
    the input ``x`` itself for the first layer, ``rho`` of the layer below otherwise."""
    return x if i == 0 else rho(states[i - 1])


def hebbian_update(pre0: Tensor, post0: Tensor, postb: Tensor, beta: float
                   ) -> tuple[Tensor, Tensor]:
    """Eq. 14: (dW (in, out), db (out,)) = (pre0ᵀ (rho(post^b) - rho(post^0)), sum of the
    change) / (beta n); ``pre0`` is the free phase's pre-synaptic activity, as the drive
    took it (:func:`activity`)."""
    change = rho(postb) - rho(post0)
    scale = 1.0 / (beta * pre0.shape[0])
    return pre0.T @ change * scale, change.sum(0) * scale


def contrastive_update(pre0: Tensor, post0: Tensor, preb: Tensor, postb: Tensor,
                       beta: float) -> tuple[Tensor, Tensor]:
    """Scellier & Bengio's update: (preᵇᵀ rho(post^b) - pre⁰ᵀ rho(post^0)) / (beta n), and
    the bias's (rho(post^b) - rho(post^0)) summed / (beta n); ``pre`` as the drives take
    it (:func:`activity`). Minus the difference of the energy's weight gradients between
    the nudged and the free state, over beta."""
    scale = 1.0 / (beta * pre0.shape[0])
    dW = (preb.T @ rho(postb) - pre0.T @ rho(post0)) * scale
    return dW, (rho(postb) - rho(post0)).sum(0) * scale


def energy(states: list[Tensor], x: Tensor, weights: list[Tensor], biases: list[Tensor],
           beta: float = 0.0, target: Tensor | None = None) -> Tensor:
    """Per sample (n,): the Hopfield energy of the layered net with symmetric weights,
    ``1/2 sum |s|^2 - sum a(pre) W rho(post) - sum b rho(s)``, plus ``beta/2 |s_out - d|^2``
    when nudged; its gradient with respect to the states is minus the dynamics of
    :func:`symmetric_drives` and :func:`euler_step` (within [0, 1])."""
    e = sum(0.5 * s.square().sum(1) for s in states)
    for i, (W, b) in enumerate(zip(weights, biases)):
        post = rho(states[i])
        e = e - ((activity(states, x, i) @ W) * post).sum(1) - (post * b).sum(1)
    if beta:
        e = e + 0.5 * beta * (states[-1] - target).square().sum(1)
    return e


def matrix_angle(a: Tensor, b: Tensor) -> float:
    """Degrees between two matrices of one shape: arccos(<a, b> / (|a| |b|))."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    c = float((a * b).sum() / (na * nb))
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def row_angles(a: Tensor, b: Tensor) -> Tensor:
    """Degrees between corresponding rows of a and b (n,); rows of zero length are NaN."""
    num = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    c = (num / den).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(c)).masked_fill(den == 0, float("nan"))
