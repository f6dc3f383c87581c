"""The local losses of Nøkland & Eidnes 2019 (anokland/local-loss, ``predsim``), as pure
functions: a prediction loss of an auxiliary classifier and a similarity-matching loss,
combined as ``(1 - beta) pred + beta sim``.

What each takes from that code (read for the facts, written anew):
* the similarity matrix: for a feature map of more than 3 channels and more than one
  row, each channel is summarised by its spatial standard deviation (unbiased); then
  each sample's vector is centred, scaled to unit length (+1e-8), and ``R = X Xᵀ``,
  clamped to [-1, 1];
* sim: the mean squared difference between the features' matrix and the labels'
  (their one-hot codes; LL-FA: a fixed random projection of them), the labels' matrix
  a constant;
* pred: cross-entropy of the auxiliary classifier (LL-FA: binary cross-entropy against
  the sign bits of the labels' random projection);
* the pooling before the auxiliary classifier: the map is average-pooled with a kernel
  doubled along height, then width, alternately, until at most ``limit`` features remain,
  padded so that the pooled size is ceil(size / kernel).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def similarity_matrix(x: Tensor) -> Tensor:
    """(n, n) adjusted cosine similarities of the samples of ``x`` (module docstring)."""
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        v = x.flatten(2).std(dim=2)  # (n, C): each channel's spatial spread
    else:
        v = x.flatten(1)
    vc = v - v.mean(dim=1, keepdim=True)
    vn = vc / (1e-8 + vc.norm(dim=1, keepdim=True))
    return (vn @ vn.T).clamp(-1, 1)


def predsim_loss(logits: Tensor, h_sim: Tensor, y: Tensor, label_code: Tensor, beta: float,
                 binary: bool = False) -> Tensor:
    """``(1 - beta) * pred + beta * sim``.

    ``logits``: the auxiliary classifier's output (n, classes) or, ``binary``, (n, k);
    ``h_sim``: the features whose similarity matrix is matched (n, ...); ``y`` (n,)
    class indices; ``label_code`` (n, k): the labels as vectors, one-hot (LL-BP) or their
    fixed random projection (LL-FA), whose similarity matrix is the target (and whose
    sign bits are the binary prediction target)."""
    if binary:
        pred = F.binary_cross_entropy_with_logits(logits, (label_code > 0).to(logits.dtype))
    else:
        pred = F.cross_entropy(logits, y)
    sim = F.mse_loss(similarity_matrix(h_sim), similarity_matrix(label_code).detach())
    return (1 - beta) * pred + beta * sim


def pool_kernel(channels: int, height: int, width: int, limit: int
                ) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(kernel, padding) of the average pooling that brings a (channels, height, width)
    map to at most ``limit`` features, or None when it already has no more."""
    kh = kw = 1
    h, w = height, width
    while channels * h * w > limit and kh < height:
        kh *= 2
        h = math.ceil(height / kh)
        if channels * h * w > limit:
            kw *= 2
            w = math.ceil(width / kw)
    if kh == 1 and kw == 1:
        return None
    ph = (kh * (h - height // kh)) // 2
    pw = (kw * (w - width // kw)) // 2
    return (kh, kw), (ph, pw)


def binary_scores(logits: Tensor, codes: Tensor) -> Tensor:
    """How well binary logits (n, k) match each class's bit code (m, k): the log
    likelihood of the code under the logits' Bernoulli distributions, (n, m)."""
    bits = (codes > 0).to(logits.dtype)
    logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    return logp @ bits.T + log1mp @ (1 - bits).T


__all__ = ["binary_scores", "pool_kernel", "predsim_loss", "similarity_matrix"]
