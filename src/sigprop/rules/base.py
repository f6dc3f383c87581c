"""The one interface every learning rule implements.

A rule owns a network (and any extra modules, such as a target generator), its
optimizers, and knows how to take one training step. The engine only calls:

    losses, correct = rule.train_step(x, y)   # (k,) tensors on the device
    correct = rule.eval_step(x, y)            # (k,) correct counts per exit
    logits = rule.predict(x)                  # the final exit's scores

``rule.exit_names`` names the k reported outputs (early exits then the final one);
the last is the network's prediction. Nothing here syncs with the host.

The public methods are templates: they check the batch (``rules/checks.py``:
:func:`check_x`, :func:`check_y`, :func:`check_batch_statistics`), raising :class:`InputError` before
anything changes (no BatchNorm statistics, optimizer state or queued update), then
call the protected ``_train_step``, ``_exit_scores`` (and, if a rule needs to,
``_eval_step``, ``_predict``) that each rule implements. The checks are Python
attribute tests plus, on a CPU, one ``aminmax`` over the labels; on other devices
the label range is not checked per step (that would sync with the host every step):
:class:`sigprop.data.DeviceLoader` checks every label once where the data enters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..networks import Network
from ..registry import RULES, SIGNALS, SPARSE_SIGNALS
from .checks import check_batch_statistics, check_head_outputs, check_num_classes, check_x, check_y


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
    # dropout on the target rows that travel with the inputs: off (only the inputs are
    # dropped; targets pass as in eval mode) | on (each target row gets its own mask,
    # as the official code). off measured better: docs/RESULTS.md section 6
    target_dropout: str = "off"
    eta: float = 1.0  # Eq. 12 error step
    # dense: the generator makes block 1's output target (Eq. 1) | sparse (Sec. III-E):
    # a small target for block 1's input (K values zero-filled for an fc block, one
    # kernel window for a conv block; sigprop.sparse), label signal only
    targets: str = "dense"
    sparse_size: int | None = None  # K of a sparse target for an fc first block (None: default)
    sparse_grid: int = 1  # conv first block: a G x G grid of kernel windows (1: the paper's)
    # local learning (ll-bp, ll-fa): the similarity share beta of the predsim loss (None:
    # the rule's, 0.99 and 0.01) and the most values an auxiliary classifier reads
    ll_beta: float | None = None
    ll_features: int = 2048
    # equilibrium propagation (ep-loopback, ep-symmetric; sigprop.continuous)
    # None: the rule's own default (sigprop.continuous.rules.DEFAULTS, measured)
    loopback: str = "learned"  # ep-loopback's loop-back weights: learned | fixed
    ep_free_steps: int | None = None  # Euler steps of the free phase
    ep_nudge_steps: int | None = None  # ... of the nudged phase
    ep_dt: float = 0.5  # the Euler step, epsilon (Scellier & Bengio: 0.5)
    ep_beta: float | None = None  # the nudge
    ep_beta_sign: str = "auto"  # auto (random for ep-symmetric, positive for ep-loopback)
    ep_lrs: str = ""  # SGD learning rates per matrix, input's first ("0.1,0.05"); "": default
    ep_tol: float = 0.0  # free phase ends once every residual ||ds/dt|| is below it (0: never)
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
    # spiking networks (Sec. VI): the IF neurons' threshold (None: the rule's, 0.5 for the
    # sigprop models, 1.0 for BP and Shallow)
    spike_threshold: float | None = None
    # 16-bit mixed precision: autocast to bf16 on a CPU, fp16 with a GradScaler on CUDA.
    # auto: on for spiking networks (the paper's setting, Sec. VI-A) | on | off
    amp: str = "auto"

    def validate(self) -> None:
        """Raise ConfigError naming the key if any option has the wrong type or value.

        Every number must be finite: a NaN or infinite learning rate, weight decay,
        logit scale or eta passes a comparison like ``lr > 0`` or ``wd >= 0`` (or fails
        it silently) and only shows up later as a NaN loss.
        """
        _number("lr", self.lr, "the Adam learning rate", positive=True)
        _number("weight_decay", self.weight_decay, "Adam's weight decay", positive=False)
        if self.logit_scale is not None:
            _number("logit_scale", self.logit_scale, "the logit scale of L_pred", positive=True,
                    fix="or leave it unset (None) for the default c/sqrt(d)")
        _number("eta", self.eta,
                "the error step of the loop-error signal, Eq. 12: t1 = f(S (h_L - eta "
                "dL/dh_L) + d); 0 drops the label from the target, a negative eta steps "
                "away from it", positive=True)
        if not isinstance(self.signal_learned, bool):
            raise ConfigError(
                f"signal_learned must be True or False, got {self.signal_learned!r}; "
                "pass a bool")
        _choice("head", self.head, ("target", "classifier"))
        _choice("loss", self.loss, ("dot", "l2"))
        _choice("bn_stats", self.bn_stats, ("inputs", "all"))
        _choice("target_dropout", self.target_dropout, ("on", "off"))
        _choice("exit_targets", self.exit_targets, ("prototypes", "candidates"))
        _choice("fast_path", self.fast_path, ("auto", "on", "off"))
        _choice("pipeline", self.pipeline, ("auto", "on", "off"))
        _choice("amp", self.amp, ("auto", "on", "off"))
        if self.spike_threshold is not None:
            _number("spike_threshold", self.spike_threshold,
                    "the voltage at which an IF neuron fires", positive=True,
                    fix="or leave it unset for the rule's (0.5 sigprop, 1.0 BP/Shallow)")
        if self.pipeline == "on" and self.fast_path == "off":
            raise ConfigError("pipeline='on' needs the fast path; drop fast_path='off'")
        _choice("signal", self.signal, tuple(SIGNALS.names()), what="signal")
        _choice("targets", self.targets, ("dense", "sparse"))
        from .local_learning import check_ll_options

        check_ll_options(self.ll_beta, self.ll_features)
        _choice("loopback", self.loopback, ("learned", "fixed"))
        _choice("ep_beta_sign", self.ep_beta_sign, ("auto", "positive", "random"))
        for key in ("ep_free_steps", "ep_nudge_steps"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{key} must be a positive integer, got {v!r}")
        _number("ep_dt", self.ep_dt, "the Euler step of the dynamics", positive=True)
        if self.ep_beta is not None:
            _number("ep_beta", self.ep_beta, "the nudge of the output toward its target",
                    positive=True)
        _number("ep_tol", self.ep_tol, "the free phase's residual tolerance", positive=False)
        if not isinstance(self.ep_lrs, str):
            raise ConfigError(f"ep_lrs must be a string like '0.1,0.05', got {self.ep_lrs!r}")
        if self.sparse_size is not None:
            if isinstance(self.sparse_size, bool) or not isinstance(self.sparse_size, int) \
                    or self.sparse_size < 1:
                raise ConfigError(f"sparse_size (K values of a sparse target) must be a "
                                  f"positive integer, got {self.sparse_size!r}")
            if self.targets != "sparse":
                raise ConfigError("sparse_size sets the size of sparse targets; add "
                                  "targets='sparse' (--targets sparse) or drop it")
        if isinstance(self.sparse_grid, bool) or not isinstance(self.sparse_grid, int) \
                or self.sparse_grid < 1:
            raise ConfigError(f"sparse_grid (G x G kernel windows of a sparse conv target) must "
                              f"be a positive integer, got {self.sparse_grid!r}")
        if self.sparse_grid != 1 and self.targets != "sparse":
            raise ConfigError("sparse_grid shapes sparse targets; add targets='sparse' "
                              "(--targets sparse) or drop it")
        if self.targets == "sparse":
            if self.signal not in SPARSE_SIGNALS:
                raise ConfigError(
                    f"sparse targets (Sec. III-E) exist for the signals "
                    f"{', '.join(SPARSE_SIGNALS.names())}, not {self.signal!r}; use "
                    "targets='dense' with this signal")
            if self.bn_stats != "inputs":
                raise ConfigError("sparse targets take BatchNorm statistics from the inputs "
                                  "only (a target is one position, not a map); drop "
                                  "bn_stats='all'")


def _number(key: str, value: object, meaning: str, *, positive: bool, fix: str = "") -> None:
    """``value`` must be a real number (not a bool), finite, and > 0 (``positive``) or
    >= 0; the message names ``key`` and what it means."""
    need = "a finite number > 0" if positive else "a finite number >= 0"
    why = f"{key} ({meaning}) must be {need}"
    fix = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{why}, got {value!r} ({type(value).__name__}); pass a number{fix}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ConfigError(f"{why}, got {value!r}; choose another value{fix}")


def _choice(key: str, value: object, choices: tuple[str, ...], what: str = "") -> None:
    """``value`` must be one of the strings ``choices``; ``what`` set: an unknown name
    of a registry (``unknown signal 'x'``)."""
    options = ", ".join(choices)
    if not isinstance(value, str):
        raise ConfigError(
            f"{key} must be a string, got {value!r} ({type(value).__name__}); choose one "
            f"of: {options}")
    if value not in choices:
        wrong = f"unknown {what} {value!r}" if what else f"{key} must be a known option, " \
            f"got {value!r}"
        raise ConfigError(f"{wrong}; choose one of: {options}")


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
    """A learning rule: its network, optimizers and training step (module docstring).

    Subclasses implement ``_train_step`` and ``_exit_scores`` (and may override
    ``_eval_step``, ``_predict``); the public methods check the batch first.
    """

    name: str = ""
    exit_names: list[str]
    # measurement (sigprop bench): called with "block<i>", "head" or "step" when the rule
    # starts that part of a training step; None (the default) costs one attribute test
    marker: Callable[[str], None] | None = None
    # spiking networks (networks/spiking.py): whether the rule trains them, and the IF
    # threshold it sets unless the config names one (Sec. VI-A: 1.0 for BP and Shallow)
    trains_spiking: ClassVar[bool] = False
    only_spiking: ClassVar[bool] = False  # a spiking model (bp-surrogate, sp-*): nothing else
    spike_threshold: ClassVar[float] = 1.0
    # whether the rule runs its forward passes under 16-bit autocast when cfg.amp asks
    supports_amp: ClassVar[bool] = False

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        cfg.validate()
        if not isinstance(network, Network):
            raise ConfigError(
                f"network must be a sigprop.Network, got {type(network).__name__}; wrap "
                "the blocks with sigprop.Network(blocks, head, input_shape)")
        self.num_classes = check_num_classes(num_classes)
        check_head_outputs(network, self.num_classes)
        spiking = network.time_major
        if self.only_spiking and not spiking:
            raise ConfigError(f"rule {self.name!r} trains spiking networks (Sec. VI); use "
                              "--network snn-conv")
        if spiking and not self.trains_spiking:
            raise ConfigError(
                f"rule {self.name!r} does not train spiking networks; for "
                f"{type(network).__name__} use bp-surrogate, sp-surrogate, sp-voltage or "
                "shallow (Sec. VI)")
        if spiking:
            network.set_threshold(cfg.spike_threshold or self.spike_threshold)
        elif cfg.spike_threshold is not None:
            raise ConfigError("spike_threshold sets the IF neurons' threshold of a spiking "
                              "network (snn-conv); drop it for this network")
        self.amp = cfg.amp == "on" or (cfg.amp == "auto" and spiking)
        if self.amp and not self.supports_amp:
            raise ConfigError(f"rule {self.name!r} has no 16-bit mixed-precision mode; drop "
                              "amp='on' (--amp on)")
        self.scaler: torch.amp.GradScaler | None = None
        self.network = network
        self.cfg = cfg
        self.optimizers: list[torch.optim.Optimizer] = []
        self.modules = nn.ModuleDict({"network": network})

    # --- the interface: checks, then the rule's own step ------------------------
    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One training step on ``x`` (B, *input_shape), float like the parameters, on
        their device, and ``y`` (B,) int64 class indices; returns (losses (k,), correct
        (k,)) on the device. A malformed batch raises InputError before anything
        changes; on a CPU that includes labels outside [0, num_classes) (elsewhere the
        loader checks them once)."""
        self._check_batch(x, y)
        return self._train_step(x, y)

    def autocast(self, x: Tensor):
        """The 16-bit autocast context for forward passes on ``x``'s device when the
        rule's amp is on (bf16 on a CPU, fp16 elsewhere, with a GradScaler that
        :meth:`_backward` and :meth:`_step` use), else a no-op. Backward passes run
        outside it."""
        if not self.amp:
            return contextlib.nullcontext()
        kind = x.device.type
        if kind == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(kind)
        return torch.autocast(kind, dtype=torch.float16)

    def eval_step(self, x: Tensor, y: Tensor) -> Tensor:
        """(k,) correct counts of every exit on the batch (checked as in train_step)."""
        self._check_batch(x, y)
        self.sync()
        with torch.no_grad(), self.autocast(x):
            return self._eval_step(x, y)

    def exit_scores(self, x: Tensor) -> list[Tensor]:
        """Scores (n, classes) of each exit, in ``exit_names`` order (no grad)."""
        self._check_inputs(x)
        self.sync()
        with torch.no_grad(), self.autocast(x):
            return [_full(s) for s in self._exit_scores(x)]

    def predict(self, x: Tensor) -> Tensor:
        """(n, classes) scores of the final exit (no grad)."""
        self._check_inputs(x)
        self.sync()
        with torch.no_grad(), self.autocast(x):
            return _full(self._predict(x))

    def sync(self) -> None:
        """Wait until every update of the steps taken so far is applied. Rules whose
        updates run in the background (sigprop's ``pipeline``) override it; their own
        methods call it before reading parameters, and so should a hand-written loop."""

    # --- what each rule implements (inputs already checked) ----------------------
    def _train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _train_step")

    def _exit_scores(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _exit_scores")

    def _eval_step(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([(s.argmax(1) == y).sum() for s in self._exit_scores(x)])

    def _predict(self, x: Tensor) -> Tensor:
        return self._exit_scores(x)[-1]

    # --- input checks --------------------------------------------------------------
    def _check_inputs(self, x: Tensor) -> int:
        """Check ``x`` against the network; its batch size."""
        n = check_x(x, self.network)
        if n < 2:
            check_batch_statistics(self.network, n)
        return n

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        check_y(y, self._check_inputs(x), self.num_classes, x.device)

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
        state = {
            "modules": self.modules.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state from :meth:`state_dict`; a mismatch raises CheckpointError."""
        self.sync()
        hint = "the checkpoint was made with another network, rule or signal"
        try:
            self.modules.load_state_dict(state["modules"])
        except (RuntimeError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            if _dropped_biases(self.modules, state.get("modules", {})):
                hint += (" (it holds the Linear bias in front of BatchNorm that fc blocks "
                         "no longer have: BatchNorm cancels it; retrain with this version)")
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
        if "scaler" in state and self.amp:
            # a CUDA fp16 run's loss scale; a CPU (bf16) run needs none
            if self.scaler is None and torch.cuda.is_available():
                self.scaler = torch.amp.GradScaler("cuda")
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])

    def epoch_metrics(self) -> dict:
        """Numbers the rule measured over the epoch, for the metrics log (the trainer
        asks once at each epoch's end; the rule starts counting afresh)."""
        return {}

    def _mark(self, part: str) -> None:
        """Tell a measuring caller (``marker``) that ``part`` of the step starts."""
        if self.marker is not None:
            self.marker(part)

    def _step(self, opt: torch.optim.Optimizer | None, loss: Tensor) -> None:
        if opt is None:
            return
        self._zero_grad(opt)
        self._backward(loss)
        self._optimizer_step(opt)

    @staticmethod
    def _zero_grad(opt: torch.optim.Optimizer) -> None:
        # zero_grad(set_to_none=True) by hand: the method's profiling wrapper and
        # foreach bookkeeping cost ~0.1 ms a call
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None

    def _backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled when an fp16 GradScaler is in use."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()


def build_rule(name: str, network: Network, num_classes: int, cfg: RuleConfig | None = None, **kw) -> LearningRule:
    """Look up a registered rule by name and build it; ``kw`` override ``cfg`` fields."""
    if not isinstance(name, str):
        raise ConfigError(f"rule name must be a string, got {name!r}; choose one of: "
                          f"{', '.join(RULES.names())}")
    if cfg is not None and not isinstance(cfg, RuleConfig):
        raise ConfigError(f"cfg must be a RuleConfig, got {type(cfg).__name__}; build one "
                          "with sigprop.RuleConfig(...) or pass options as keywords")
    known = [f.name for f in dataclasses.fields(cfg or RuleConfig)]
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise ConfigError(f"unknown rule option {unknown[0]!r}; choose from: {', '.join(known)}")
    try:
        cfg = dataclasses.replace(cfg or RuleConfig(), **kw)
    except TypeError as err:
        raise ConfigError(f"bad rule option: {err}") from None
    return RULES.get(name)(network, num_classes, cfg)


def _full(t: Tensor) -> Tensor:
    """A 16-bit result (from autocast) as float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _dropped_biases(modules: nn.Module, saved: dict) -> bool:
    """Whether ``saved`` holds a bias for a Linear that has none here (checkpoints from
    before fc blocks dropped the Linear bias in front of BatchNorm)."""
    own = dict(modules.named_modules())
    for key in saved:
        path, _, leaf = key.rpartition(".")
        m = own.get(path)
        if leaf == "bias" and isinstance(m, nn.Linear) and m.bias is None:
            return True
    return False
