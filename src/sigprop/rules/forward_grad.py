"""Forward gradients (``forward-grad``): Baydin et al. 2022, "Gradients without
Backpropagation", and the local-loss variant of Ren et al. 2023, "Scaling Forward Gradient
With Local Losses" (google-research/local_forward_gradient).

No backward pass: one forward pass in forward-mode AD (``torch.func.jvp``) gives the loss
and its directional derivative ``d = ∇L·v`` along a random direction ``v ~ N(0, I)``; the
gradient estimate is ``g = d v``, unbiased since E[v vᵀ] = I. ``fg_directions`` = K
directions per step (one jvp each) are averaged.

``fg_perturb``:

* ``weight`` (Baydin et al.): ``v`` over the parameters, ``g_θ = (∇_θ L·v) v``.
* ``activity`` (Ren et al.): ``v`` over each block's pre-activation ``a`` (after its
  BatchNorm, before its nonlinearity), one direction per sample; the per-sample
  derivative ``d_n`` makes ``d_n v_n`` the estimate of ``∂L/∂a_n``, and the block's
  parameters follow from it by the block's own formulas (BatchNorm's closed-form
  backward, then ``ĝ_zᵀ x`` for a Linear or the weight correlation of a Conv2d), as Ren
  et al. take theirs through LayerNorm. With the global loss, later blocks' BatchNorm
  couples the samples and the per-sample estimate leaves those cross-sample terms out
  (Ren et al.'s networks normalise per sample); a local loss has no BatchNorm after the
  perturbation, and its estimate is unbiased.

``fg_loss``:

* ``global``: the network's cross-entropy. With weight perturbation every parameter, the
  head's included, is perturbed (Baydin et al.); with activity perturbation the head (one
  Linear on the last block's output) learns from its exact gradient in closed form, as
  Ren et al.'s classifier layers do.
* ``local`` (Ren et al.): every block has its own readout (global average pooling for
  conv blocks, then a Linear to the classes) and cross-entropy; each block's forward
  gradient is of its own loss, its input a plain tensor (nothing flows between blocks).
  Readouts and the head learn from their exact gradients in closed form (one Linear
  each). Exits: each block's readout, then the head.

BatchNorm under jvp normalises with the batch's statistics (written out, so that the
activity formulas can read them); its running statistics are updated once per step from
the first direction's primal statistics, as ``nn.BatchNorm`` updates them from one pass.
Dropout draws its masks as the network's Dropout does, the same masks for every
direction (the random stream is rewound), applied inline (the Dropout's autograd Function
has no forward-mode rule).

Optimizer: SGD with momentum 0.9 (``fg_optimizer = sgd``, the default; Ren et al.'s) at
learning rate 3e-5 (the rule's default: the best of 3e-5, 1e-4, 3e-4 and 1e-3 for weight
perturbation on fc-2x800, docs/studies/forward-gradients.md; one direction over ~10^6
weights is mostly noise, and larger steps diverge), or Adam (``fg_optimizer = adam``),
which suits the exactly trained readouts of the local and activity variants
(``--fg-optimizer adam --lr 5e-4``). Baydin et al. use plain SGD with a per-iteration
exponential decay, which the engine's per-epoch schedules do not express.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError
from ..networks import Dropout, Network
from ..networks.base import laid_out_as
from ..options import Option
from ..registry import register_rule
from .base import LearningRule, RuleConfig, make_grouped_adam
from .local_learning import core_shapes
from .pepita import rng_state, set_rng_state

_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.GELU)
_PLAIN = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout, *_ACTIVATIONS)
_MAPS = (nn.Linear, nn.Conv2d)


# --------------------------------------------------------------------------- the math


def directional_derivative(f: Callable[[dict[str, Tensor]], tuple[Tensor, Any]],
                           params: dict[str, Tensor], tangents: dict[str, Tensor]
                           ) -> tuple[Tensor, Tensor, Any]:
    """(f's value, ``∇f·v``, f's aux) for ``f(params)`` returning ``(value, aux)`` and
    the direction ``v`` = ``tangents``: one forward pass in forward mode. The forward
    gradient is ``d * v`` per entry."""
    return jvp(f, (params,), (tangents,), has_aux=True)


def bn_backward(g: Tensor, xhat: Tensor, inv_std: Tensor, weight: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's backward in closed form (training mode): from ``g`` = dL/d(output)
    and the normalised input ``xhat``, (dL/d input, dL/d weight, dL/d bias). Statistics
    over every axis but axis 1 (the channels); ``inv_std`` broadcasts like ``xhat``."""
    dims = [0, *range(2, g.dim())]
    view = (1, -1) + (1,) * (g.dim() - 2)
    count = g.numel() // g.shape[1]
    g_beta = g.sum(dims)
    g_gamma = (g * xhat).sum(dims)
    scale = inv_std if weight is None else inv_std * weight.view(view)
    g_in = scale * (g - g_beta.view(view) / count - xhat * (g_gamma.view(view) / count))
    return g_in, g_gamma, g_beta


def map_weight_grad(m: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """dL/dW of a Linear or Conv2d ``m`` from its input ``x`` and output gradient ``g``."""
    if isinstance(m, nn.Linear):
        return g.T @ x
    return torch.nn.grad.conv2d_weight(x, m.weight.shape, g, m.stride, m.padding,
                                       m.dilation, m.groups)


def linear_ce_grads(feat: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Exact (dW, db) of a Linear's mean cross-entropy on ``feat``, in closed form."""
    e = (logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)
    return e.T @ feat, e.sum(0)


# --------------------------------------------------------------------------- the options

FG_PERTURB = Option("fg_perturb", str, "weight", "forward-grad: what the random direction "
                    "perturbs: weight (Baydin et al.) | activity (each block's pre-activation, "
                    "per sample: Ren et al.)", choices=("weight", "activity"))
FG_LOSS = Option("fg_loss", str, "global", "forward-grad: global (the network's loss) | local "
                 "(a readout and loss per block: Ren et al.)", choices=("global", "local"))
FG_DIRECTIONS = Option("fg_directions", int, 1, "forward-grad: random directions per step, "
                       "their estimates averaged (one jvp each)", low=1, high=10_000)
FG_OPTIMIZER = Option("fg_optimizer", str, "sgd", "forward-grad: sgd (momentum 0.9, Ren et "
                      "al.'s; the rule's lr 3e-5 is for it) | adam (for the local and activity "
                      "variants, e.g. with --lr 5e-4)", choices=("sgd", "adam"))


# --------------------------------------------------------------------------- the blocks


class _Plan:
    """A block as forward-mode AD runs it: its modules, the index of its Linear/Conv2d,
    of the BatchNorm after it (or None), and of the module after which an activity
    perturbation enters (the BatchNorm, else the map: before the nonlinearity)."""

    def __init__(self, block: nn.Module) -> None:
        mods = list(block) if isinstance(block, nn.Sequential) else []
        maps = [j for j, m in enumerate(mods) if isinstance(m, _MAPS)]
        if len(maps) != 1 or not all(isinstance(m, (*_PLAIN, *_MAPS, _BatchNorm, Dropout))
                                     for m in mods):
            raise ConfigError(
                "rule 'forward-grad' trains blocks that are an nn.Sequential of one Linear "
                "or Conv2d with BatchNorm, activation, dropout and pooling (as fc-*, conv and "
                f"vgg8b build them); got {type(block).__name__}")
        self.mods = mods
        self.map = maps[0]
        after = self.map + 1
        self.bn = after if after < len(mods) and isinstance(mods[after], _BatchNorm) else None
        self.site = self.map if self.bn is None else self.bn


class _Readout(nn.Module):
    """Ren et al.'s local readout: global average pooling (conv blocks), a Linear."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, classes)

    @staticmethod
    def features(h: Tensor) -> Tensor:
        return h.mean((2, 3)) if h.dim() == 4 else h.flatten(1)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.features(h))


class _Runner(nn.Module):
    """The blocks, head and readouts as forward-mode AD runs them: ``functional_call``
    swaps the parameters it is given inside it. Holds no state of its own."""

    def __init__(self, network: Network, plans: list[_Plan], readouts: nn.ModuleList | None
                 ) -> None:
        super().__init__()
        self.network = network
        self.readouts = readouts
        self.plans = plans

    def block(self, i: int, h: Tensor, noise: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        """Block i on ``h``, ``noise`` added at its site; (output, record: BatchNorm's
        ``mean`` and ``var`` (biased) and, with noise, the map's input ``x``, ``inv_std``
        and ``xhat``, which the activity formulas read)."""
        plan, rec = self.plans[i], {"keep": noise is not None}
        for j, m in enumerate(plan.mods):
            if j == plan.map:
                if noise is not None:
                    rec["x"] = h
                h = m(h)
            elif j == plan.bn and m.training:
                h = _batch_norm(m, h, rec)
            elif isinstance(m, Dropout):
                if m.active:  # inline: the Dropout's autograd Function has no jvp rule
                    h = h * m.keep_mask(h).to(h.dtype) * m.scale
            else:
                h = m(h)
            if j == plan.site and noise is not None:
                h = h + noise
        del rec["keep"]
        return h, rec

    def forward(self, x: Tensor, y: Tensor, first: int, last: int,
                noises: dict[str, Tensor] | None = None, per_sample: bool = False
                ) -> tuple[Tensor, tuple[list[dict[str, Any]], Tensor, Tensor]]:
        """Blocks ``first`` .. ``last - 1`` on ``x``, then block ``last - 1``'s readout
        (with readouts) or the head; the cross-entropy, its mean (or each sample's / n)
        and (the blocks' records, the last block's output, the logits)."""
        recs, h = [], x
        for i in range(first, last):
            h, rec = self.block(i, h, None if noises is None else noises[str(i)])
            recs.append(rec)
        head = self.network.head if self.readouts is None else self.readouts[last - 1]
        logits = head(h)
        loss = F.cross_entropy(logits, y, reduction="none" if per_sample else "mean")
        return (loss / len(y) if per_sample else loss), (recs, h, logits)


def _batch_norm(m: _BatchNorm, h: Tensor, rec: dict[str, Any]) -> Tensor:
    """Training-mode BatchNorm written out (its statistics go to ``rec``)."""
    dims = [0, *range(2, h.dim())]
    view = (1, -1) + (1,) * (h.dim() - 2)
    var, mean = torch.var_mean(h, dims, correction=0)
    inv_std = torch.rsqrt(var + m.eps).view(view)
    xhat = (h - mean.view(view)) * inv_std
    rec.update(mean=mean, var=var)
    if rec.get("keep"):  # what the activity formulas read
        rec.update(inv_std=inv_std, xhat=xhat)
    if m.weight is None:
        return xhat
    return xhat * m.weight.view(view) + m.bias.view(view)


# --------------------------------------------------------------------------- the rule


@register_rule("forward-grad")
class ForwardGradient(LearningRule):
    """Forward gradients (module docstring): a jvp per direction, no backward pass."""
    # its step on channels-last maps / on NCHW: VGG8b 0.93, CONV 0.84
    # (docs/studies/fast-path.md)
    channels_last_pays = True

    options = (FG_PERTURB, FG_LOSS, FG_DIRECTIONS, FG_OPTIMIZER)
    # weight perturbation with SGD (module docstring)
    engine_defaults: ClassVar[dict[str, Any]] = {"rule.lr": 3e-5}
    exit_names: list[str]

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(network, num_classes, cfg)  # refuses spiking networks first
        plans = [_Plan(b) for b in network.blocks]
        if type(network.head) is not nn.Linear:
            raise ConfigError("rule 'forward-grad' needs a Linear head (as fc-*, conv and "
                              f"vgg8b have), got {type(network.head).__name__}")
        self.plans = plans
        self.local = self.opts.fg_loss == "local"
        self.activity = self.opts.fg_perturb == "activity"
        self.aux: nn.ModuleList | None = None
        self.exit_names = ["output"]
        if self.local:
            ref = next(network.parameters())
            self.aux = nn.ModuleList(_Readout(s[0], num_classes) for s in network.block_shapes)
            self.aux.to(device=ref.device, dtype=ref.dtype)
            self.modules["aux"] = self.aux
            self.exit_names = [f"layer{i + 1}" for i in range(len(plans))] + ["head"]
        self.runner = _Runner(network, plans, self.aux)
        self.site_shapes = self._site_shapes()
        self.dropouts = [m for m in network.modules() if isinstance(m, (Dropout, nn.Dropout))]
        groups = {f"block{i + 1}": [*b.parameters(), *(self.aux[i].parameters() if self.local
                                                       else ())]
                  for i, b in enumerate(network.blocks)}
        groups["head"] = list(network.head.parameters())
        if self.opts.fg_optimizer == "sgd":
            params = [p for ps in groups.values() for p in ps if p.requires_grad]
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = make_grouped_adam(groups, cfg)
        self.optimizers = [self.optimizer] if self.optimizer is not None else []
        # parameters by the runner's names (= the rule's: "network.blocks.0.1.weight")
        named = {n: p for n, p in self.runner.named_parameters() if p.requires_grad}
        self.block_params = [{n: p for n, p in named.items()
                              if n.startswith(f"network.blocks.{i}.")} for i in range(len(plans))]
        self.head_params = {n: p for n, p in named.items() if n.startswith("network.head.")}
        self._named = dict(self.modules.named_parameters())

    @torch.no_grad()
    def _site_shapes(self) -> list[tuple[int, ...]]:
        """Each block's per-sample shape where an activity perturbation enters."""
        return core_shapes(self.network, [(nn.Sequential(*p.mods[:p.site + 1]),
                                           nn.Sequential(*p.mods[p.site + 1:]))
                                          for p in self.plans])

    # --- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        grads: dict[str, Tensor] = {}
        if self.local:
            losses, scores, h = [], [], x
            for i in range(len(self.plans)):
                self._mark(f"block{i + 1}")
                loss, _, h, logits = self._estimate(h, y, i, i + 1, grads)
                gw, gb = linear_ce_grads(_Readout.features(h), logits, y)
                grads[f"aux.{i}.linear.weight"], grads[f"aux.{i}.linear.bias"] = gw, gb
                losses.append(loss)
                scores.append(logits)
            self._mark("head")
            logits = self.network.head(h)
            losses.append(F.cross_entropy(logits, y))
            scores.append(logits)
            self._head_exact(h, logits, y, grads)
            loss = torch.stack(losses)
            correct = (torch.stack(scores).argmax(2) == y).sum(1)
        else:
            loss, _, h, logits = self._estimate(x, y, 0, len(self.plans), grads)
            if self.activity:  # the head is not perturbed: its exact gradient
                self._head_exact(h, logits, y, grads)
            loss, correct = loss.view(1), (logits.argmax(1) == y).sum().view(1)
        self._mark("step")
        for p in self._named.values():
            p.grad = None
        for name, g in grads.items():
            self._named[name].grad = g
        if self.optimizer is not None:
            self.optimizer.step()
        return loss, correct

    def _head_exact(self, h: Tensor, logits: Tensor, y: Tensor, grads: dict[str, Tensor]
                    ) -> None:
        if self.head_params:
            gw, gb = linear_ce_grads(h.flatten(1), logits, y)
            grads["network.head.weight"], grads["network.head.bias"] = gw, gb

    def _estimate(self, x: Tensor, y: Tensor, first: int, last: int,
                  grads: dict[str, Tensor]) -> tuple[Tensor, list, Tensor, Tensor]:
        """The forward-gradient estimate for blocks ``first`` .. ``last - 1`` (and the
        head, global weight perturbation), averaged over the directions, into ``grads``;
        the first direction's (mean loss, records, last block's output, logits). Running
        statistics are updated from the first direction's pass."""
        K = self.opts.fg_directions
        masks_at = after = None
        first_pass = None
        for k in range(K):
            tangents = self._draw(x, first, last)
            if self.dropouts:  # every direction sees the first direction's dropout masks
                if k == 0:
                    masks_at = rng_state(x.device)
                else:
                    after = rng_state(x.device)
                    set_rng_state(masks_at, x.device)
            if self.activity:
                out = self._activity(x, y, first, last, tangents, grads, 1.0 / K)
            else:
                out = self._weight(x, y, first, last, tangents, grads, 1.0 / K)
            if after is not None:
                set_rng_state(after, x.device)
            if first_pass is None:
                first_pass = out
        loss, (recs, h, logits) = first_pass
        self._update_running_stats(recs, first, x.shape[0])
        return loss, recs, h, logits

    def _draw(self, x: Tensor, first: int, last: int) -> dict[str, Tensor]:
        """One direction ~ N(0, I): over the parameters (weight) or each block's sites,
        one per sample (activity)."""
        if self.activity:
            return {str(i): torch.randn(x.shape[0], *self.site_shapes[i], device=x.device,
                                        dtype=x.dtype) for i in range(first, last)}
        params = {n: p for ps in self.block_params[first:last] for n, p in ps.items()}
        if not self.local:
            params.update(self.head_params)
        # drawn in (C, H, W) order: the same directions on either layout
        return {n: laid_out_as(torch.randn(p.shape, dtype=p.dtype, device=p.device), p)
                for n, p in params.items()}

    def _weight(self, x, y, first, last, tangents, grads, share):
        """Weight perturbation: one jvp over the parameters, ``d v`` into ``grads``."""
        params = {n: self._named[n].detach() for n in tangents}
        loss, d, aux = directional_derivative(
            lambda ps: functional_call(self.runner, ps, (x, y, first, last)), params, tangents)
        for n, v in tangents.items():
            _accumulate(grads, n, v * (d * share))
        return loss, aux

    def _activity(self, x, y, first, last, tangents, grads, share):
        """Activity perturbation: one jvp over the sites' noise (zero), then each block's
        parameters by its own formulas from ``d_n v_n``."""
        zeros = {k: torch.zeros_like(v) for k, v in tangents.items()}
        losses, d, aux = jvp(lambda nz: self.runner(x, y, first, last, nz, per_sample=True),
                             (zeros,), (tangents,), has_aux=True)
        recs = aux[0]
        for j, i in enumerate(range(first, last)):
            rec, plan, v = recs[j], self.plans[i], tangents[str(i)]
            g = (d * share).view((-1,) + (1,) * (v.dim() - 1)) * v  # est. dL/da, per sample
            prefix = f"network.blocks.{i}."
            if plan.bn is not None:
                bn = plan.mods[plan.bn]
                g, g_gamma, g_beta = bn_backward(g, rec["xhat"], rec["inv_std"], bn.weight)
                if bn.weight is not None and bn.weight.requires_grad:
                    _accumulate(grads, prefix + f"{plan.bn}.weight", g_gamma)
                    _accumulate(grads, prefix + f"{plan.bn}.bias", g_beta)
            m = plan.mods[plan.map]
            if m.weight.requires_grad:
                _accumulate(grads, prefix + f"{plan.map}.weight", map_weight_grad(m, rec["x"], g))
            if m.bias is not None and m.bias.requires_grad:
                _accumulate(grads, prefix + f"{plan.map}.bias",
                            g.sum([0, *range(2, g.dim())]))
        return losses.sum(), aux

    def _update_running_stats(self, recs: list[dict[str, Any]], first: int, n: int) -> None:
        """Each BatchNorm's running statistics from the pass's primal batch statistics,
        as nn.BatchNorm updates them (the unbiased variance, its momentum)."""
        for j, rec in enumerate(recs):
            plan = self.plans[first + j]
            if plan.bn is None or "mean" not in rec:
                continue
            bn = plan.mods[plan.bn]
            if not bn.track_running_stats or bn.running_mean is None:
                continue
            bn.num_batches_tracked.add_(1)
            # momentum None: a cumulative average (one host read of the count)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            count = n * math.prod(self.site_shapes[first + j][1:])  # values per channel
            bn.running_mean.mul_(1 - m).add_(rec["mean"], alpha=m)
            bn.running_var.mul_(1 - m).add_(rec["var"], alpha=m * count / max(count - 1, 1))

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        if not self.local:
            return [self.network(x)]
        scores, h = [], x
        for block, readout in zip(self.network.blocks, self.aux):
            h = block(h)
            scores.append(readout(h))
        scores.append(self.network.head(h))
        return scores


def _accumulate(grads: dict[str, Tensor], name: str, g: Tensor) -> None:
    if name in grads:
        grads[name].add_(g)
    else:
        grads[name] = g

