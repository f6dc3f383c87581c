"""The one interface every learning rule implements.

A rule owns a network (and any extra modules, such as a target generator), its
optimizers, and knows how to take one training step. The engine only calls:

    losses, correct = rule.train_step(x, y)   # (k,) tensors on the device
    correct = rule.eval_step(x, y)            # (k,) correct counts per exit
    logits = rule.predict(x)                  # the final exit's scores

``rule.exit_names`` names the k reported outputs (early exits then the final one);
the last is the network's prediction. Nothing here syncs with the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..networks import Network
from ..registry import RULES, SIGNALS


@dataclass
class RuleConfig:
    """Options of the learning rules; each rule reads the ones it uses."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    # sigprop (Sec. III)
    signal: str = "label"  # label (Eq. 1) | label-input (Eq. 10) | loop-pred (Eq. 11) | loop-error (Eq. 12)
    signal_learned: bool = True
    head: str = "target"  # target (Fig. 2a, output-target prediction) | classifier (Fig. 2b)
    loss: str = "dot"  # comparison inside L_pred: dot (Eq. 6) | l2 (Eq. 7)
    logit_scale: float | None = None  # None: functional.default_scale (c/sqrt(d))
    bn_stats: str = "inputs"  # inputs: BN statistics from inputs only | all: inputs and targets
    eta: float = 1.0  # Eq. 12 error step
    # early exits of per-sample generators (Eq. 10-12): prototypes (running class means of
    # each layer's training targets) | candidates (each sample's target under every class)
    exit_targets: str = "prototypes"
    # sigprop's step for standard fc blocks with a built-in signal: written-out local
    # updates without autograd (sigprop.fastpath). auto: where it applies | on: required
    # (an error says why not) | off: always autograd. Same numbers either way.
    fast_path: str = "auto"
    # sigprop on a CPU with the fast path: each block's BatchNorm backward, weight
    # gradient and Adam step run on a second thread while the forward sweep goes on
    # (sigprop.pipeline); the same updates in the same order. auto: on a CPU with >= 2
    # threads, blocks of >= 250k weights, not the loop-back signals | on | off.
    pipeline: str = "auto"

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.head not in ("target", "classifier"):
            raise ConfigError(f"head must be 'target' or 'classifier', got {self.head!r}")
        if self.loss not in ("dot", "l2"):
            raise ConfigError(f"loss must be 'dot' or 'l2', got {self.loss!r}")
        if self.bn_stats not in ("inputs", "all"):
            raise ConfigError(f"bn_stats must be 'inputs' or 'all', got {self.bn_stats!r}")
        if self.exit_targets not in ("prototypes", "candidates"):
            raise ConfigError(
                f"exit_targets must be 'prototypes' or 'candidates', got {self.exit_targets!r}"
            )
        if self.fast_path not in ("auto", "on", "off"):
            raise ConfigError(f"fast_path must be 'auto', 'on' or 'off', got {self.fast_path!r}")
        if self.pipeline not in ("auto", "on", "off"):
            raise ConfigError(f"pipeline must be 'auto', 'on' or 'off', got {self.pipeline!r}")
        if self.pipeline == "on" and self.fast_path == "off":
            raise ConfigError("pipeline='on' needs the fast path; drop fast_path='off'")
        if self.signal not in SIGNALS:
            raise ConfigError(
                f"unknown signal {self.signal!r}; choose one of: {', '.join(SIGNALS.names())}"
            )
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ConfigError(f"logit scale must be positive, got {self.logit_scale}")


def make_adam(params: Iterable[nn.Parameter], cfg: RuleConfig) -> torch.optim.Optimizer | None:
    """Adam over the trainable ``params``; None when there are none.

    ``fused=True``: one kernel for the whole update, ~10x faster than the default
    per-tensor loop on this CPU for a 3x1000 net (measured, see docs/RESULTS.md).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_grouped_adam(groups: dict[str, Iterable[nn.Parameter]], cfg: RuleConfig
                      ) -> torch.optim.Optimizer | None:
    """One Adam with one parameter group per named part (``group["name"]``).

    Each group has its own hyper-parameters and each parameter its own state, so a
    group's update reads nothing but its own gradients: the same arithmetic as one
    optimizer per part. Parts without trainable parameters get no group; None when
    nothing is trainable. One ``step()`` saves the per-call Python of one optimizer per
    part (profiled on this CPU: 0.55 ms a step for three ``Adam.step`` calls against
    0.34 ms for one); end to end the difference was within this machine's noise
    (benchmarks/overhead_ablation.py, sigprop-adam-per-block).
    """
    param_groups = []
    for name, params in groups.items():
        params = [p for p in params if p.requires_grad]
        if params:
            param_groups.append({"params": params, "name": name})
    if not param_groups:
        return None
    return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class LearningRule:
    name: str = ""
    exit_names: list[str]

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        cfg.validate()
        self.network = network
        self.num_classes = num_classes
        self.cfg = cfg
        self.optimizers: list[torch.optim.Optimizer] = []
        self.modules = nn.ModuleDict({"network": network})

    # --- the interface --------------------------------------------------------
    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def eval_step(self, x: Tensor, y: Tensor) -> Tensor:
        self.sync()
        with torch.no_grad():
            return torch.stack([(s.argmax(1) == y).sum() for s in self.exit_scores(x)])

    def exit_scores(self, x: Tensor) -> list[Tensor]:
        """Scores (n, classes) of each exit, in ``exit_names`` order (no grad)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until every update of the steps taken so far is applied. Rules whose
        updates run in the background (sigprop's ``pipeline``) override it; their own
        methods call it before reading parameters, and so should a hand-written loop."""

    def predict(self, x: Tensor) -> Tensor:
        self.sync()
        with torch.no_grad():
            return self.exit_scores(x)[-1]

    # --- helpers ----------------------------------------------------------------
    def set_training(self, mode: bool) -> None:
        self.sync()
        self.modules.train(mode)

    def to(self, device: torch.device | str) -> LearningRule:
        self.sync()
        self.modules.to(device)
        return self

    def state_dict(self) -> dict:
        self.sync()
        return {
            "modules": self.modules.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a state from :meth:`state_dict`; a mismatch raises CheckpointError."""
        self.sync()
        hint = "the checkpoint was made with another network, rule or signal"
        try:
            self.modules.load_state_dict(state["modules"])
        except (RuntimeError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{hint} ({first})") from None
        if len(state["optimizers"]) != len(self.optimizers):
            raise CheckpointError(
                f"{hint} (it holds {len(state['optimizers'])} optimizer states, this rule "
                f"has {len(self.optimizers)}; sigprop checkpoints from before one grouped "
                "Adam per rule held one per block)"
            )
        try:
            for opt, s in zip(self.optimizers, state["optimizers"]):
                opt.load_state_dict(s)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{hint} ({err})") from None

    @staticmethod
    def _step(opt: torch.optim.Optimizer | None, loss: Tensor) -> None:
        if opt is None:
            return
        # zero_grad(set_to_none=True) by hand: the method's profiling wrapper and
        # foreach bookkeeping cost ~0.1 ms a call
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None
        loss.backward()
        opt.step()


def build_rule(name: str, network: Network, num_classes: int, cfg: RuleConfig | None = None, **kw) -> LearningRule:
    """Look up a registered rule by name and build it; ``kw`` override ``cfg`` fields."""
    try:
        cfg = dataclasses.replace(cfg or RuleConfig(), **kw)
    except TypeError as err:
        raise ConfigError(f"bad rule option: {err}") from None
    return RULES.get(name)(network, num_classes, cfg)
