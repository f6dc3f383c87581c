"""Equilibrium propagation on layered continuous Hopfield networks (Sec. V).

One training step on a batch (x, y), every sample at once (functional/ep.py):

    free phase:    states from zero, ``ep_free_steps`` Euler steps of Eq. 13 (beta = 0),
                   stopping early once every sample's residual ||ds/dt|| < ``ep_tol``
                   (checked every 10 steps: one host sync each);
    nudged phase:  from the free fixed point, ``ep_nudge_steps`` steps with the output
                   pulled toward the one-hot label by beta (its sign random per batch for
                   ep-symmetric, as Scellier & Bengio; positive for ep-loopback, Eq. 14);
    update:        per weight and bias, Hebbian, no autograd, plain SGD with a learning
                   rate per layer (``ep_lrs``).

``ep-loopback`` (sigprop, Fig. 2c): entirely feedforward except one loop-back matrix
from the output units to the first hidden layer (``--loopback learned|fixed``), updated
by Eq. 14: ``dW = rho(pre^0)ᵀ (rho(post^beta) - rho(post^0)) / beta``. ``ep-symmetric``
(Scellier & Bengio 2017): each layer also receives the layer above through the same
matrix transposed, updated by ``(rho(pre^b)ᵀ rho(post^b) - rho(pre^0)ᵀ rho(post^0)) /
beta``. The prediction is the output units at the free fixed point.

Alignment (Fig. 4, ep-loopback): the matrices around the loop, hidden to hidden, the last
hidden layer to the output, the output back to the first hidden layer, are named W1 ..
Wk in that order ((in, out) matrices, row vectors: ``rho(s) W``). For each Wi the product
of the others, taken around the loop from the one after it, has the shape of Wiᵀ (with
two hidden layers: W3 W1 ~ W2ᵀ, the paper's example); the key ``"W2~W3W1"`` holds
their angle. Two measures, logged every epoch: ``alignment_deg`` (per sample, as the
paper: the angle between what Wi and what Pᵀ make of the sample's free-phase activity
at Wi's input layer, ``rho(s) Wi`` against ``rho(s) Pᵀ``: the two matrices compared
along the data; mean over the epoch's samples, and ``alignment_std_deg``) and
``alignment_frobenius_deg`` (arccos(<Wi, Pᵀ>/(|Wi||P|)) at the epoch's end). 90 degrees
is no alignment (random matrices), 0 is Wi = c Pᵀ.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..functional import ep as EP
from ..networks import Network
from ..networks.hopfield import HopfieldNetwork
from ..options import MAX_MAGNITUDE, Option
from ..registry import register_rule
from .base import LearningRule, RuleConfig

CHECK_EVERY = 10  # free-phase steps between residual checks (each one host sync)

# Each rule's defaults where the config leaves them unset (None / ""). ep-symmetric:
# Scellier & Bengio's recipe for the net's depth (3 hidden layers: theirs, not measured
# here), but 60 free steps at one hidden layer (we start every free phase from zero, not
# from the sample's last fixed point), and their rates, which are for 500-unit layers,
# scaled by 500 / width above 500 units. ep-loopback: tuned here. Measured:
# docs/studies/equilibrium-propagation.md.
DEFAULTS = {
    "ep-symmetric": {"free": 60, "nudge": 4, "beta": 1.0, "width": 500,
                     "lrs": {1: [0.1, 0.05], 2: [0.4, 0.1, 0.01],
                             3: [0.128, 0.032, 0.008, 0.002]},
                     "depth": {2: {"free": 150, "nudge": 6, "beta": 1.0},
                               3: {"free": 500, "nudge": 8, "beta": 1.0}}},
    "ep-loopback": {"free": 20, "nudge": 8, "beta": 2.0, "first": 0.2, "rest": 0.1},
}


EP_FREE_STEPS = Option(
    "ep_free_steps", int, None, "EP: Euler steps of the free phase (default: ep-loopback 20; "
    "ep-symmetric 60, 150 or 500 for 1, 2 or 3 hidden layers)", low=1, high=1_000_000,
    optional=True)
EP_NUDGE_STEPS = Option(
    "ep_nudge_steps", int, None, "EP: Euler steps of the nudged phase (default: ep-loopback "
    "8; ep-symmetric 4, 6 or 8 by depth)", low=1, high=1_000_000, optional=True)
EP_DT = Option("ep_dt", float, 0.5, "EP: the Euler step", low=0.0, low_open=True, high=100.0)
EP_BETA = Option("ep_beta", float, None, "EP: the nudge (default: ep-loopback 2; ep-symmetric "
                 "1)", low=0.0, low_open=True, high=1e6,
                 optional=True)
EP_BETA_SIGN = Option("ep_beta_sign", str, "auto", "EP: the nudge's sign: auto (centered "
                      "for ep-symmetric, positive for ep-loopback) | positive | random "
                      "| centered (a nudge of each sign, their difference over 2 beta: "
                      "Laborieux et al. 2021's symmetric estimate)",
                      choices=("auto", "positive", "random", "centered"))
EP_LRS = Option("ep_lrs", str, "", "EP: learning rates per matrix, input's first, e.g. "
                "0.1,0.05 (empty: the rule's)")
EP_TOL = Option("ep_tol", float, 0.0, "EP: end the free phase once every residual is below "
                "this (0: never)", low=0.0)
EP_STEP = Option("ep_step", str, "plain", "EP: how a layer's update becomes a step: plain "
                 "(SGD, lr x update) | normalized (lr x update / (1 + the batch's mean "
                 "squared pre-synaptic activity): the same step at any width) | adam",
                 choices=("plain", "normalized", "adam"))
EP_PERSISTENT = Option(
    "ep_persistent", str, "off", "EP: persistent particles: on (each training sample's free "
    "phase starts from its last fixed point, which with --ep-tol saves steps from the second "
    "epoch on; held in memory, not in checkpoints) | off (from zero)", choices=("on", "off"))
EP_OPTIONS = (EP_FREE_STEPS, EP_NUDGE_STEPS, EP_DT, EP_BETA, EP_BETA_SIGN, EP_LRS, EP_TOL,
              EP_STEP, EP_PERSISTENT)
LOOPBACK = Option("loopback", str, "learned", "ep-loopback: learned | fixed loop-back weights",
                  choices=("learned", "fixed"))


class EquilibriumPropagation(LearningRule):
    """What both EP rules share: relaxation, phases, SGD per layer, no autograd."""

    options = EP_OPTIONS
    # the continuous model's settings (Scellier & Bengio; Sec. V): mini-batches of 20 and
    # constant rates; standardised pixels, the same in the dynamics and the update (Fashion-
    # MNIST's pixels in [0, 1] share a large mean that killed the output layer of two-hidden-
    # layer nets: docs/studies/equilibrium-propagation.md)
    engine_defaults = {"data.batch_size": 20, "train.schedule": "none",
                       "data.inputs": "standard"}

    exit_names: ClassVar[list[str]] = ["output"]
    auto_sign: ClassVar[str] = "positive"  # the nudge's sign under ep_beta_sign="auto"

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        if not isinstance(network, HopfieldNetwork):
            raise ConfigError(f"rule {self.name!r} trains continuous Hopfield networks; use "
                              "--network hopfield-<layers>x<units> (e.g. hopfield-2x1500)")
        super().__init__(network, num_classes, cfg)
        self.linears = network.linears()
        for lin in self.linears:
            lin.requires_grad_(False)  # updated by the Hebbian rule, never by autograd
        self.extra = self._extra_parameters(cfg)
        self.modules["loop"] = self.extra
        layers = self._update_layers()
        own = DEFAULTS[self.name]
        own = {**own, **own.get("depth", {}).get(len(self.linears) - 1, {})}
        self.free_steps = self.opts.ep_free_steps or own["free"]
        self.nudge_steps = self.opts.ep_nudge_steps or own["nudge"]
        self.beta = self.opts.ep_beta or own["beta"]
        lrs = (_parse_lrs(self.opts.ep_lrs, len(layers)) if self.opts.ep_lrs
               else self._default_lrs(len(layers)))
        groups = [{"params": ps, "lr": lr, "base_lr": lr, "name": name}
                  for (name, ps), lr in zip(layers, lrs)]
        self.optimizer = (torch.optim.Adam(groups, lr=cfg.lr) if self.opts.ep_step == "adam"
                          else torch.optim.SGD(groups, lr=cfg.lr))
        self.optimizers = [self.optimizer]
        self.sign = {"auto": self.auto_sign}.get(self.opts.ep_beta_sign,
                                                  self.opts.ep_beta_sign)
        self.uses_sample_index = self.opts.ep_persistent == "on"
        self.particles: list[Tensor] = []  # per layer, (training samples, units)
        self._steps, self._batches = 0, 0  # free-phase steps taken, this epoch
        self.residual = float("nan")  # mean free-phase residual of the last batch
        # dead outputs this epoch: a count on the batches' device (no sync per batch)
        self._dead: Tensor | None = None
        self._seen = 0

    # --- what the two rules set differently -------------------------------------------
    def _default_lrs(self, count: int) -> list[float]:
        raise NotImplementedError

    def _extra_parameters(self, cfg: RuleConfig) -> nn.Module:
        return nn.Module()

    def _update_layers(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [(f"W{i}", [lin.weight, lin.bias]) for i, lin in enumerate(self.linears)]

    def _drives(self, states: list[Tensor], x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _gradients(self, x: Tensor, free: list[Tensor], nudged: list[Tensor],
                   beta: float) -> None:
        raise NotImplementedError

    # --- the dynamics --------------------------------------------------------------------
    def _weights(self) -> tuple[list[Tensor], list[Tensor]]:
        return [lin.weight.T for lin in self.linears], [lin.bias for lin in self.linears]

    def relax(self, x: Tensor, steps: int, states: list[Tensor] | None = None,
              beta: float = 0.0, target: Tensor | None = None, tol: float = 0.0
              ) -> tuple[list[Tensor], Tensor]:
        """At most ``steps`` Euler steps from ``states`` (zeros if None), fewer when every
        residual falls below ``tol``; the states and the last step's residual per sample
        (``self.last_steps``: the steps taken)."""
        x = x.flatten(1)
        if states is None:
            states = [x.new_zeros(x.shape[0], lin.out_features) for lin in self.linears]
        residual = x.new_full((x.shape[0],), float("inf"))
        self.last_steps = steps
        for k in range(steps):
            states, residual = EP.euler_step(states, self._drives(states, x), self.opts.ep_dt,
                                             beta, target)
            if tol > 0 and (k + 1) % CHECK_EVERY == 0 and float(residual.max()) < tol:
                self.last_steps = k + 1
                break
        return states, residual

    def _start(self, x: Tensor) -> list[Tensor] | None:
        """The free phase's starting states: the samples' particles (persistent), else
        None (zeros)."""
        index = self.sample_index
        if not self.uses_sample_index or index is None:
            return None
        need = int(index.max()) + 1
        if not self.particles or self.particles[0].shape[0] < need:
            grown = [x.new_zeros(max(need, 2 * len(p) if self.particles else need),
                                 lin.out_features) for p, lin in
                     zip(self.particles or [None] * len(self.linears), self.linears)]
            for old, new in zip(self.particles, grown):
                new[: len(old)] = old
            self.particles = grown
        return [p[index] for p in self.particles]

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        target = F.one_hot(y, self.num_classes).to(x.dtype)
        with torch.no_grad():
            free, residual = self.relax(x, self.free_steps, self._start(x), tol=self.opts.ep_tol)
            self.last_free_steps = self.last_steps
            self._steps += self.last_steps
            self._batches += 1
            if self.uses_sample_index and self.sample_index is not None:
                for p, s in zip(self.particles, free):
                    p[self.sample_index] = s
            beta = self.beta
            if self.sign == "random" and bool(torch.randint(0, 2, ()).item()):
                beta = -beta
            nudged, _ = self.relax(x, self.nudge_steps, list(free), beta, target)
            if self.sign == "centered":  # the other side's state stands in for the free one
                free_side, _ = self.relax(x, self.nudge_steps, list(free), -beta, target)
                self._gradients(x.flatten(1), free_side, nudged, 2 * beta)
            else:
                self._gradients(x.flatten(1), free, nudged, beta)
            self.optimizer.step()
            out = free[-1]
            cost = (out - target).square().sum(1).mean()
            self.residual = residual.mean()
            # samples whose output units are all at zero: rho has no slope there, so
            # nothing they see moves the weights (a dying output layer, docs/studies)
            dead = (out <= 0).all(1).sum()
            self._dead = dead if self._dead is None else self._dead + dead
            self._seen += out.shape[0]
        return cost.view(1), (out.argmax(1) == y).sum().view(1)

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        states, _ = self.relax(x, self.free_steps, tol=self.opts.ep_tol)
        return [states[-1]]

    def _set(self, lin: nn.Linear, dW: Tensor, db: Tensor | None, pre: Tensor) -> None:
        """The optimizer descends: the Hebbian change (in, out) is an ascent direction of
        the weight (out, in). ``normalized``: divided by 1 + the batch's mean squared
        pre-synaptic activity ``pre`` (the bias's input is 1)."""
        if self.opts.ep_step == "normalized":
            k = 1.0 / (1.0 + pre.square().sum(1).mean())
            dW = dW * k
            db = db * k if db is not None else None
        lin.weight.grad = -dW.T
        if db is not None:
            lin.bias.grad = -db

    def epoch_metrics(self) -> dict[str, Any]:
        """The last batch's mean free-phase residual, the share of the epoch's training
        samples whose outputs were all zero (``dead_outputs``) and the free-phase steps a
        batch took, on average (``free_steps``: fewer than --ep-free-steps with --ep-tol)."""
        dead = float(self._dead) / self._seen if self._seen and self._dead is not None else 0.0
        steps = self._steps / self._batches if self._batches else 0.0
        self._dead, self._seen = None, 0
        self._steps, self._batches = 0, 0
        return {"free_residual": float(self.residual), "dead_outputs": dead,
                "free_steps": steps}

    def warnings(self, record: dict) -> list[str]:
        dead = record.get("dead_outputs") or 0.0
        if dead <= 0.5:
            return []
        return [f"{100 * dead:.0f}% of the training samples ended the free phase with every "
                "output unit at zero, where the updates vanish: the output layer is dying; "
                "lower the rates (--ep-lrs) or --ep-beta"]


def _parse_lrs(text: str, count: int) -> list[float]:
    """Learning rates per updated matrix from ``"0.1,0.05"``."""
    try:
        lrs = [float(v) for v in text.split(",")]
    except ValueError:
        lrs = []
    if len(lrs) != count or not all(0 < v <= MAX_MAGNITUDE for v in lrs):
        raise ConfigError(f"ep_lrs must list {count} positive learning rates of at most "
                          f"{MAX_MAGNITUDE:g} separated by commas (one per weight matrix, the "
                          f"input's first, the loop-back's last), got {text!r}")
    return lrs


@register_rule("ep-symmetric")
class EPSymmetric(EquilibriumPropagation):
    """Scellier & Bengio 2017: symmetric feedback, contrastive Hebbian update."""

    name = "ep-symmetric"
    # a nudge of each sign: the one-sided (random-sign) estimate let the output layer die
    # on some seeds (docs/studies/equilibrium-propagation.md)
    auto_sign = "centered"

    def _default_lrs(self, count: int) -> list[float]:
        own = DEFAULTS[self.name]
        known = own["lrs"].get(count - 1)
        # deeper: Scellier & Bengio's pattern, each layer 4x slower than the one below
        lrs = known or [0.128 / 4**i for i in range(count)]
        scale = min(1.0, own["width"] / self.linears[0].out_features)
        return [lr * scale for lr in lrs]

    def _drives(self, states: list[Tensor], x: Tensor) -> list[Tensor]:
        weights, biases = self._weights()
        return EP.symmetric_drives(states, x, weights, biases)

    def _gradients(self, x, free, nudged, beta) -> None:
        for i, lin in enumerate(self.linears):
            pre = EP.activity(free, x, i)
            self._set(lin, *EP.contrastive_update(pre, free[i], EP.activity(nudged, x, i),
                                                  nudged[i], beta), pre)


class _Loop(nn.Module):
    def __init__(self, num_classes: int, units: int, learned: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(num_classes, units)
        bound = math.sqrt(6.0 / (num_classes + units))  # Glorot, as the other layers
        nn.init.uniform_(self.linear.weight, -bound, bound)
        nn.init.zeros_(self.linear.bias)
        self.linear.requires_grad_(False)
        self.learned = learned


@register_rule("ep-loopback")
class EPLoopback(EquilibriumPropagation):
    """Sigprop's continuous model (Fig. 2c): feedforward plus a loop-back, Eq. 14."""

    name = "ep-loopback"
    options = EP_OPTIONS + (LOOPBACK,)

    def _default_lrs(self, count: int) -> list[float]:
        own = DEFAULTS[self.name]
        # wider layers sum more changed weights into each unit's drive: above 500 units the
        # rates shrink as ep-symmetric's (constant rates at 1500 units diverged after one
        # epoch of full Fashion-MNIST: docs/studies/equilibrium-propagation.md)
        scale = min(1.0, DEFAULTS["ep-symmetric"]["width"] / self.linears[0].out_features)
        return [lr * scale for lr in [own["first"]] + [own["rest"]] * (count - 1)]

    def _extra_parameters(self, cfg: RuleConfig) -> nn.Module:
        return _Loop(self.num_classes, self.linears[0].out_features,
                     self.opts.loopback == "learned")

    def _update_layers(self) -> list[tuple[str, list[nn.Parameter]]]:
        layers = super()._update_layers()
        if self.extra.learned:  # the loop-back has its own weight; its bias is unused
            layers.append(("loop", [self.extra.linear.weight]))
        return layers

    def _drives(self, states: list[Tensor], x: Tensor) -> list[Tensor]:
        weights, biases = self._weights()
        return EP.loopback_drives(states, x, weights, biases, self.extra.linear.weight.T)

    def _gradients(self, x, free, nudged, beta) -> None:
        for i, lin in enumerate(self.linears):
            pre = EP.activity(free, x, i)
            self._set(lin, *EP.hebbian_update(pre, free[i], nudged[i], beta), pre)
        if self.extra.learned:  # the loop-back's pre-synaptic activity: the output's
            pre = EP.rho(free[-1])
            dW, _ = EP.hebbian_update(pre, free[0], nudged[0], beta)
            self._set(self.extra.linear, dW, None, pre)
        self._record_alignment(free, nudged)

    # --- Fig. 4 ------------------------------------------------------------------------
    def loop_matrices(self) -> list[Tensor]:
        """W1 .. Wk around the loop as (in, out) matrices: hidden to hidden, the last hidden
        layer to the output, the output back to the first hidden layer."""
        return [lin.weight.T for lin in self.linears[1:]] + [self.extra.linear.weight.T]

    def alignment_names(self) -> list[str]:
        k = len(self.linears)  # matrices in the loop
        names = []
        for i in range(k):
            others = [(i + j) % k for j in range(1, k)]
            names.append(f"W{i + 1}~" + "".join(f"W{o + 1}" for o in others))
        return names

    def loop_products(self) -> list[Tensor]:
        """For each Wi, the product of the others around the loop from the one after it:
        the shape of Wiᵀ (its feedback through the loop)."""
        mats = self.loop_matrices()
        k = len(mats)
        products = []
        for i in range(k):
            prod = mats[(i + 1) % k]
            for j in range(2, k):
                prod = prod @ mats[(i + j) % k]
            products.append(prod)
        return products

    def frobenius_alignment(self) -> dict[str, float]:
        mats = self.loop_matrices()
        return {name: EP.matrix_angle(m, prod.T) for name, m, prod
                in zip(self.alignment_names(), mats, self.loop_products())}

    def _record_alignment(self, free: list[Tensor], nudged: list[Tensor]) -> None:
        """Per sample, for each Wi: the angle between what Wi makes of the sample's
        free-phase activity at its input layer and what the loop product (transposed)
        makes of it, ``rho(s) Wi`` against ``rho(s) Pᵀ``. Summed on the device (sum,
        sum of squares, count of finite angles, float64): no host sync in the step."""
        mats = self.loop_matrices()
        acc = self.__dict__.setdefault("_align", {})
        # W_i's input is loop layer i: state i (hidden 1 .. output)
        for i, (name, prod) in enumerate(zip(self.alignment_names(), self.loop_products())):
            a = EP.rho(free[i])
            angles = EP.row_angles(a @ mats[i], a @ prod.T).double()
            finite = torch.isfinite(angles)
            angles = torch.where(finite, angles, 0.0)
            sums = torch.stack([angles.sum(), angles.square().sum(), finite.sum().double()])
            if name in acc:
                acc[name].add_(sums)
            else:
                acc[name] = sums

    def epoch_metrics(self) -> dict[str, Any]:
        out = super().epoch_metrics()
        acc = self.__dict__.pop("_align", {})
        mean, std = {}, {}
        for name, sums in acc.items():
            s, sq, n = sums.tolist()  # one host sync per epoch
            if n:
                mean[name] = s / n
                std[name] = math.sqrt(max(sq / n - (s / n) ** 2, 0.0))
        if mean:
            out["alignment_deg"] = mean
            out["alignment_std_deg"] = std
        out["alignment_frobenius_deg"] = self.frobenius_alignment()
        return out
