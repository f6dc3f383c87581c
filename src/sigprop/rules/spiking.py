"""The spiking models of Table V (Sec. VI) on spiking networks (``snn-conv``).

* ``bp-surrogate``: backprop through time and through every spike, whose gradient is the
  arctan surrogate (Eq. 17); threshold 1.0. (``backprop`` on a spiking network is the
  same rule; ``shallow`` trains only the classification layer, threshold 1.0.)
* ``sp-surrogate`` and ``sp-voltage``: signal propagation, threshold 0.5, classification
  layer version (Fig. 2b). The targets travel forward with the inputs through the same
  spiking dynamics; each block's local loss compares the inputs' and the targets'
  state *before the spike*, a_t, a function of the charged voltage
  ``u_t = v_{t-1} + h_t`` (Eq. 15; ``h_t`` the block's current: synapse, BatchNorm)
  chosen by ``snn_loss``:

      sp-surrogate (the arctan surrogate g of Eq. 16-17 in every choice):
        surrogate        a_t = g(u_t - theta)                (default, as in the literal reading)
        surrogate-leaky  a_t = g(leaky_relu(u_t - theta))
        surrogate-above  a_t = g(relu(u_t - theta))
      sp-voltage (no surrogate anywhere):
        voltage-leaky    a_t = leaky_relu(u_t - theta)       (default)
        voltage          a_t = u_t                           (the literal reading)
        voltage-above    a_t = relu(u_t - theta)

  (leaky slope ``snn_leaky_slope``, the model's own by default: how fast the neurons below
  threshold move against those above). The voltage carried
  from one step to the next is a constant for autograd, so a block's gradient reaches
  its own current only: nothing passes through a spike, a reset, a time step, or into
  the block below (the block's input spikes are detached). L_pred (Eq. 9) is taken at
  every time step against one target per class and averaged over the T steps; the early
  exit of a block scores a sample by its similarities averaged over the steps.

Targets (``snn_targets``; the paper does not say how they enter an SNN): the label
projection of Eq. 1 makes one target per class, either as block 1's *currents*, beside
the inputs' (``current``, the default), or shaped like the network input (an image,
``t0 = f(S c + d)``, ``input``, the literal reading), which enters the first block beside
the inputs. The projection learns with block 1 from block 1's loss; it starts with
weights of std 1, so that the targets have the scale of what they stand beside (see
``__init__``). BatchNorm statistics come from the inputs only (Sec. III-D).
Logit scale ``c/sqrt(d)``, d the values of one step of a block, c per comparison
(``scale_c``, ``scale_c_by_compare``; ``snn_logit_c`` overrides it).
The defaults were chosen by measurement, the literal readings kept selectable
(docs/studies/spiking-local-loss.md, "Choosing the defaults").
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as SF
from ..functional.spiking import step_similarity, surrogate_activity
from ..networks import Network
from ..errors import ConfigError
from ..networks.spiking import SP_THRESHOLD, SpikingNetwork
from ..options import Option
from ..registry import register_rule
from ..signals.label import LabelProjection
from .backprop import Backprop
from .base import LearningRule, RuleConfig, _full, make_grouped_adam
from .config import SPIKE_THRESHOLD
from .sigprop import LOGIT_SCALE, LOSS


@register_rule("bp-surrogate")
class BPSurrogate(Backprop):
    """Backprop through time and through the spikes' surrogate gradient (Table V, BP)."""

    only_spiking = True


SNN_LOSS = Option(
    "snn_loss", str, None,
    "sp-surrogate / sp-voltage: what a block's local loss compares, per step: surrogate "
    "(g(u - theta), Eq. 16) | surrogate-above (g(relu(u - theta)): only neurons at or above "
    "threshold move) | surrogate-leaky (g(leaky_relu(u - theta)): those below move at "
    "snn_leaky_slope) | voltage (u) | voltage-above (relu(u - theta)) | voltage-leaky "
    "(leaky_relu(u - theta)); sp-surrogate takes the surrogate ones (default surrogate, the "
    "paper's literal reading), sp-voltage the voltage ones (default "
    "voltage-leaky; voltage is the literal reading)",
    choices=("surrogate", "surrogate-above", "surrogate-leaky", "voltage", "voltage-above",
             "voltage-leaky"), optional=True)
# the slope below threshold of the leaky comparisons before it was an option (the
# 3-epoch study's variant: docs/studies/spiking-local-loss.md); a record without
# snn_leaky_slope ran it
LEAKY_SLOPE = 0.01
SNN_LEAKY_SLOPE = Option(
    "snn_leaky_slope", float, None,
    "sp-surrogate / sp-voltage: the slope below threshold of the leaky comparisons "
    "(surrogate-leaky, voltage-leaky): how fast the neurons below threshold move against "
    "those above; 0 is the above-threshold comparison, 1 the plain one (default: the "
    "model's own: sp-voltage 0.1, sp-surrogate 0.01; docs/studies/spiking-local-loss.md); "
    "the other comparisons ignore it",
    low=0.0, high=1.0, optional=True)
SNN_TARGETS = Option(
    "snn_targets", str, None,
    "sp-surrogate / sp-voltage: where the class targets enter: current (block 1's currents, "
    "beside the inputs', the default) | input (images at the network's input, through block 1's "
    "synapse: the literal reading)", choices=("input", "current"), optional=True)
SNN_LOGIT_C = Option(
    "snn_logit_c", float, None,
    "sp-surrogate / sp-voltage: c of each block's logit scale c/sqrt(d), d one step's "
    "values of the block (default: the setting's own, docs/studies/spiking-local-loss.md); "
    "--logit-scale instead sets one scale for every block", low=0.0, low_open=True,
    optional=True)


class SpikingSigprop(LearningRule):
    """Signal propagation on a spiking network (module docstring)."""

    # the model's own snn_loss and snn_targets; the surrogate family or the voltage one
    compare_on: ClassVar[str] = "surrogate-leaky"
    targets_at: ClassVar[str] = "input"
    family: ClassVar[tuple[str, ...]] = ("surrogate", "surrogate-above", "surrogate-leaky")
    # c of the logit scale c/sqrt(d) (sp-voltage's in SPVoltage; swept:
    # docs/studies/spiking.md)
    scale_c: ClassVar[float] = 1.0
    scale_c_by_compare: ClassVar[dict[str, float]] = {}
    # the slope of the leaky comparisons below threshold (snn_leaky_slope's default)
    leaky_slope: ClassVar[float] = LEAKY_SLOPE
    trains_spiking = only_spiking = True
    supports_amp = True
    spike_threshold = SP_THRESHOLD

    options = (LOSS, LOGIT_SCALE, SPIKE_THRESHOLD, SNN_LOSS, SNN_TARGETS, SNN_LOGIT_C,
               SNN_LEAKY_SLOPE)
    # what the model ran with snn_loss / snn_targets unset before its measured defaults
    # (2026-12-05): the literal reading
    literal: ClassVar[dict[str, str]] = {"snn_loss": "surrogate", "snn_targets": "input"}

    def __init_subclass__(cls, **kw) -> None:
        super().__init_subclass__(**kw)
        # the model's settings are written into a run's config (and printed at its start),
        # so that a run keeps them whatever later defaults become
        cls.engine_defaults = {"rule.snn_loss": cls.compare_on,
                               "rule.snn_targets": cls.targets_at,
                               "rule.snn_leaky_slope": cls.leaky_slope}

    @classmethod
    def recorded_options(cls, table: dict) -> dict:
        """A record from before the settings were written into the config ran the literal
        reading (and surrogate-leaky then had c = 1); one from before the leaky slope was
        an option ran 0.01."""
        if table.get("snn_loss") == "surrogate-leaky" and "snn_logit_c" not in table:
            table = {**table, "snn_logit_c": 1.0}
        if table.get("snn_leaky_slope") is None:
            table = {**table, "snn_leaky_slope": LEAKY_SLOPE}
        return {**table, **{k: v for k, v in cls.literal.items() if table.get(k) is None}}

    @classmethod
    def check_options(cls, opts) -> None:
        if opts.snn_loss is not None and opts.snn_loss not in cls.family:
            why = ("sp-voltage stays surrogate-free" if "voltage" in cls.family
                   else "sp-surrogate compares through the arctan surrogate (Eq. 16-17)")
            raise ConfigError(f"snn_loss {opts.snn_loss!r} is not one of {cls.name}'s: {why}; "
                              f"choose {' or '.join(cls.family)}")
        if opts.snn_logit_c is not None and opts.logit_scale is not None:
            raise ConfigError("snn_logit_c and logit_scale both set the logit scale; give "
                              "one (snn_logit_c scales each block by its size, logit_scale "
                              "is one value for all)")

    @classmethod
    def option_scope(cls, given) -> tuple:
        """Its own options and the label projection's (one target per class, Eq. 1)."""
        return cls.options + LabelProjection.options

    @classmethod
    def _scope_note(cls, given) -> str:
        return " (it makes one target per class with the label projection, Eq. 1, at the " \
            "network's input)"

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        super().__init__(network, num_classes, cfg)
        self.compare = self.opts.snn_loss or self.compare_on
        self.targets_in = self.opts.snn_targets or self.targets_at
        self.slope = (self.leaky_slope if self.opts.snn_leaky_slope is None
                      else self.opts.snn_leaky_slope)
        charged = self._charged_shapes(network)
        shape = network.input_shape if self.targets_in == "input" else charged[0]
        self.signal = LabelProjection(num_classes, shape, learned=self.opts.signal_learned)
        # Targets start on the scale of what they stand beside (standardised images, or
        # currents after BatchNorm, std ~1): with nn.Linear's init (+-1/sqrt(classes)) every
        # class's target is faint and Adam's 5e-4 steps take hundreds of steps to set them
        # apart (docs/studies/spiking.md)
        with torch.no_grad():
            self.signal.proj.weight.normal_(0.0, 1.0)
            self.signal.proj.bias.zero_()
        self.modules["signal"] = self.signal
        # one step of block i: block_shapes[i] = (T, ...) after pooling; the loss compares
        # the charged voltages before pooling
        self.scales = []
        c = self.opts.snn_logit_c or self.scale_c_by_compare.get(self.compare, self.scale_c)
        for shape in charged:
            d = math.prod(shape)
            self.scales.append(self.opts.logit_scale
                               or c * SF.default_scale(self.opts.loss, d, conv=True))
        self._build_optimizer()
        blocks = network.blocks
        self.exit_names = [f"layer{i + 1}" for i in range(len(blocks))] + ["head"]
        self._rates = torch.zeros(len(blocks))
        self._steps = 0

    def _build_optimizer(self) -> None:
        """One Adam group per block (block 1's holds the targets' projection) and the
        head's."""
        blocks = self.network.blocks
        groups = {"block1": [*blocks[0].parameters(), *self.signal.parameters()]}
        groups.update({f"block{i + 1}": b.parameters() for i, b in enumerate(blocks) if i})
        groups["head"] = self.network.head.parameters()
        self.optimizer = make_grouped_adam(groups, self.cfg)
        self.optimizers = [self.optimizer]

    @staticmethod
    @torch.no_grad()
    def _charged_shapes(network: SpikingNetwork) -> list[tuple[int, ...]]:
        """One step's shape of every block's charged voltage (before pooling)."""
        was = network.training
        network.eval()
        try:
            h = torch.zeros(2, *network.input_shape,
                            dtype=next(network.parameters()).dtype,
                            device=next(network.parameters()).device)
            shapes = []
            for block in network.blocks:
                h, charged = block.run(h)
                shapes.append(tuple(charged.shape[2:]))
        finally:
            network.train(was)
        return shapes

    def _activity(self, charged: Tensor, block) -> Tensor:
        """What the local loss compares (``snn_loss``) of the charged voltage u: g(u - theta),
        g(relu(u - theta)), g(leaky_relu(u - theta)), u, relu(u - theta) or
        leaky_relu(u - theta)."""
        theta = block.node.threshold
        if self.compare == "surrogate":
            return surrogate_activity(charged, theta)
        if self.compare == "surrogate-above":
            return surrogate_activity(F.relu(charged - theta) + theta, theta)
        if self.compare == "surrogate-leaky":
            return surrogate_activity(F.leaky_relu(charged - theta, self.slope) + theta, theta)
        if self.compare == "voltage-above":
            return F.relu(charged - theta)
        if self.compare == "voltage-leaky":
            return F.leaky_relu(charged - theta, self.slope)
        return charged

    def _scores(self, a: Tensor, n: int, i: int) -> Tensor:
        """[T, n, m] similarities of the n inputs to the m class targets at every step
        (Eq. 6 or 7 per step, float32, outside autocast: the voltages are float32 and a
        cast to 16 bits would copy them; functional.spiking.step_similarity)."""
        return step_similarity(a, n, self.opts.loss, self.scales[i])

    def _local_loss(self, scores: Tensor, y: Tensor) -> Tensor:
        """L_pred (Eq. 9) at every time step, averaged over the steps."""
        return F.cross_entropy(scores.flatten(0, 1), y.repeat(scores.shape[0]))

    def _inputs_and_targets(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Block 1's input and the target currents it adds to its own: the targets as
        images beside the inputs (``input``), or the inputs alone and the targets as
        currents (``current``, (m, C, H, W))."""
        if self.targets_in == "current":
            return x, self.signal.targets(x)
        t0 = self.signal.targets(x)  # (m, *input_shape)
        return torch.cat([x, t0.to(x.dtype)]), None

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        if self._rates.device != x.device:
            self._rates = self._rates.to(x.device)
        self._steps += 1
        self._zero_grad(self.optimizer)
        losses, correct = [], []
        with self.autocast(x):
            h, extra = self._inputs_and_targets(x)
        for i, block in enumerate(self.network.blocks):
            self._mark(f"block{i + 1}")
            with self.autocast(x):
                out, charged = block.run(h, n, detach_carry=True,
                                         extra=extra if i == 0 else None)
            scores = self._scores(self._activity(charged, block), n, i)
            loss = self._local_loss(scores, y)
            self._backward(loss)
            losses.append(loss.detach())
            correct.append((scores.detach().mean(0).argmax(1) == y).sum())
            with torch.no_grad():
                self._rates[i] += out[:, :n].mean(dtype=torch.float32)  # no host sync
            h = out.detach()
        self._mark("head")
        with self.autocast(x):
            logits = _full(self.network.head(h[:, :n]))
        loss = F.cross_entropy(logits, y)
        self._backward(loss)
        losses.append(loss.detach())
        correct.append((logits.detach().argmax(1) == y).sum())
        self._optimizer_step(self.optimizer)
        return torch.stack(losses), torch.stack(correct)

    def epoch_metrics(self) -> dict:
        """``spike_rate``: each block's mean firing rate (spikes per neuron and step) on
        the epoch's training inputs (targets excluded); counting starts afresh."""
        if not self._steps:
            return {}
        rates = (self._rates / self._steps).tolist()
        self._rates.zero_()
        self._steps = 0
        return {"spike_rate": {f"layer{i + 1}": r for i, r in enumerate(rates)}}

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        n = x.shape[0]
        h, extra = self._inputs_and_targets(x)
        out = []
        for i, block in enumerate(self.network.blocks):
            h, charged = block.run(h, extra=extra if i == 0 else None)
            with torch.autocast(x.device.type, enabled=False):
                out.append(self._scores(self._activity(charged, block), n, i).mean(0))
        out.append(self.network.head(h[:, :n]))
        return out

    def _predict(self, x: Tensor) -> Tensor:
        return self.network(x)


@register_rule("sp-surrogate")
class SPSurrogate(SpikingSigprop):
    """Table V, SP surrogate: local losses through the arctan surrogate g (Eq. 16)."""

    compare_on = "surrogate"
    targets_at = "current"
    # g(leaky_relu(u - theta)) spans little (0.5 below threshold), so its logits do not
    # separate at c = 1: the softmax stays near uniform and every sample keeps pulling
    # the maps towards the class targets (docs/studies/spiking-local-loss.md)
    scale_c_by_compare = {"surrogate-leaky": 4.0}


@register_rule("sp-voltage")
class SPVoltage(SpikingSigprop):
    """Table V, SP voltage: local losses on the voltage u itself, no surrogate."""

    compare_on = "voltage-leaky"
    targets_at = "current"
    literal = {"snn_loss": "voltage", "snn_targets": "input"}
    family = ("voltage", "voltage-above", "voltage-leaky")
    # The voltages are unbounded (an aligned pair's dot product grows like d, sqrt(d) =
    # 317 on block 1), so the softmax saturates unless c is small (swept over three
    # seeds: docs/studies/spiking.md); voltage-leaky keeps c = 1, as the study measured it
    scale_c = 1 / 32
    scale_c_by_compare = {"voltage-leaky": 1.0}
    # below threshold the neurons move at 1/10: at 1/100 the first steps trail Shallow,
    # at 1 (the plain voltage) later epochs trail (docs/studies/spiking-local-loss.md)
    leaky_slope = 0.1
