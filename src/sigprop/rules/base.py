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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, InputError, TrainingError
from ..networks import Network
from ..options import Option, Options, resolve
from ..registry import RULES
from ..resources import half_precision_pays
from .checks import (
    check_batch_statistics,
    check_finite_x,
    check_head_outputs,
    check_index,
    check_num_classes,
    check_x,
    check_y,
)
from .config import RuleConfig, foreign_option


def make_adam(params: Iterable[nn.Parameter], cfg: RuleConfig) -> torch.optim.Optimizer | None:
    """Adam over the trainable ``params``; None when there are none.

    ``fused=True``: one kernel for the whole update, much faster than the default
    per-tensor loop on a CPU (measured: docs/studies/speed-memory.md).
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
    part (measured: docs/studies/speed-memory.md).
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
    # the rule's own options (sigprop.options), beside the shared lr, weight_decay, amp
    options: ClassVar[tuple[Option, ...]] = ()
    # whether the rule keeps state per training sample and wants train_step's ``index``
    uses_sample_index: ClassVar[bool] = False
    sample_index: Tensor | None = None  # this step's, for the rule's own _train_step
    # engine settings the rule chooses for itself ({"data.batch_size": 20, ...}): a new
    # run starts from them; what a user gives wins (engine.config.compose)
    engine_defaults: ClassVar[dict[str, Any]] = {}
    # measurement (sigprop bench): called with "block<i>", "head" or "step" when the rule
    # starts that part of a training step; None (the default) costs one attribute test
    marker: Callable[[str], None] | None = None
    # whether the rule trains block by block from local losses, so that ``marker`` cuts a
    # step into per-layer parts (sigprop bench times those rules per layer)
    layered: ClassVar[bool] = False
    # spiking networks (networks/spiking.py): whether the rule trains them, and the IF
    # threshold it sets unless the config names one (Sec. VI-A: 1.0 for BP and Shallow)
    trains_spiking: ClassVar[bool] = False
    only_spiking: ClassVar[bool] = False  # a spiking model (bp-surrogate, sp-*): nothing else
    spike_threshold: ClassVar[float] = 1.0
    # whether the rule runs its forward passes under 16-bit autocast when cfg.amp asks
    supports_amp: ClassVar[bool] = False
    # whether its step on conv networks is faster on channels-last maps on a CPU
    # (measured: benchmarks/layout.py); only then does train.layout = auto choose them
    channels_last_pays: ClassVar[bool] = False
    # a NaN or inf in x raises InputError before anything changes, on a CPU (one pass
    # over x); elsewhere that read would sync with the host every step, so it is not
    # checked there (DeviceLoader's data is finite by construction). False skips it.
    check_finite: bool = True

    @classmethod
    def option_scope(cls, given: Mapping[str, Any]) -> tuple[Option, ...]:
        """The options a rule built with ``given`` takes (sigprop adds its generator's)."""
        return cls.options

    @classmethod
    def check_options(cls, opts: Options) -> None:
        """Checks between options (one ConfigError naming them); each value alone is
        checked by its declaration."""

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> Options:
        """``given`` checked against this rule's declarations, defaults filled in; an
        option that is not this rule's is a ConfigError naming who takes it."""
        scope = cls.option_scope(given)
        names = {o.name for o in scope}
        for key in given:
            if key not in names:
                raise foreign_option(key, cls.name, cls._scope_note(given))
        opts = resolve(scope, given, f"rule {cls.name!r}")
        cls.check_options(opts)
        return opts

    @classmethod
    def recorded_options(cls, table: dict[str, Any]) -> dict[str, Any]:
        """A run record's ``[rule]`` table as this version reads it: a rule whose defaults
        changed fills what an older record left unset with what that run used."""
        return table

    @classmethod
    def _scope_note(cls, given: Mapping[str, Any]) -> str:
        """Said after the rule's name when an option is not in its scope."""
        return ""

    def __init__(self, network: Network, num_classes: int, cfg: RuleConfig) -> None:
        if not isinstance(cfg, RuleConfig):
            raise ConfigError(f"cfg must be a RuleConfig, got {type(cfg).__name__}; build one "
                              "with sigprop.RuleConfig(...) or pass options as keywords")
        cfg.validate()
        opts = self.resolve_options(cfg.options)
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
                f"{type(network).__name__} use {_spiking_rules()} (Sec. VI)")
        threshold = opts.get("spike_threshold")
        if not spiking and threshold is not None:
            raise ConfigError("spike_threshold sets the IF neurons' threshold of a spiking "
                              "network (snn-conv); drop it for this network")
        # amp: "on", "off", or "auto": 16-bit for spiking networks (the paper's setting,
        # Sec. VI-A) where the device computes it natively and faster (precision())
        self.amp_wanted = cfg.amp == "on" or (cfg.amp == "auto" and spiking)
        if cfg.amp == "on" and not self.supports_amp:
            raise ConfigError(f"rule {self.name!r} has no 16-bit mixed-precision mode; drop "
                              "amp='on' (--amp on)")
        self.amp_wanted = self.amp_wanted and self.supports_amp
        self._kept: str | None = None  # the precision a resumed run keeps (keep_precision)
        if spiking:
            network.set_threshold(threshold or self.spike_threshold)
        self.scaler: torch.amp.GradScaler | None = None
        self.network = network
        self.cfg = cfg
        self.opts = opts
        self.optimizers: list[torch.optim.Optimizer] = []
        self.modules = nn.ModuleDict({"network": network})

    # --- the interface: checks, then the rule's own step ------------------------
    def train_step(self, x: Tensor, y: Tensor, index: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
        """One training step on ``x`` (B, *input_shape), float like the parameters, on
        their device, and ``y`` (B,) int64 class indices; returns (losses (k,), correct
        (k,)) on the device. A malformed batch raises InputError before anything
        changes; on a CPU that includes labels outside [0, num_classes) (elsewhere the
        loader checks them once). ``index`` (B,): the samples' positions in the training
        set, for a rule that keeps state per sample (``uses_sample_index``); the trainer
        passes it to those."""
        if not self.modules.training:
            raise InputError("the rule is in evaluation mode (set_training(False)), where "
                             "nothing may learn; call rule.set_training(True) before "
                             "train_step")
        self._check_batch(x, y)
        if index is not None:
            check_index(index, x.shape[0], x.device)
        self.sample_index = index
        return self._checked_step(self._train_step(x, y))

    def _checked_step(self, out: object) -> tuple[Tensor, Tensor]:
        """``_train_step``'s result if it is (losses (k,), correct (k,)) tensors, one per
        exit; a plugin's rule that returns something else is named here, not deep in the
        trainer (shapes only: nothing is read from the device)."""
        k = len(self.exit_names)
        ok = isinstance(out, tuple) and len(out) == 2 and all(
            isinstance(t, Tensor) and tuple(t.shape) == (k,) for t in out)
        if not ok:
            got = (tuple(type(t).__name__ if not isinstance(t, Tensor) else tuple(t.shape)
                         for t in out) if isinstance(out, tuple) else type(out).__name__)
            raise TrainingError(f"rule {self.name!r}: _train_step returned {got}, not (losses, "
                                f"correct) tensors of shape ({k},), one per exit; fix the rule")
        return out  # type: ignore[return-value]

    def _checked_scores(self, scores: object, n: int) -> list[Tensor]:
        """``_exit_scores``' result if it is one (n, classes) tensor per exit."""
        k, c = len(self.exit_names), self.num_classes
        ok = isinstance(scores, (list, tuple)) and len(scores) == k and all(
            isinstance(t, Tensor) and tuple(t.shape) == (n, c) for t in scores)
        if not ok:
            got = ([tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    for t in scores] if isinstance(scores, (list, tuple))
                   else type(scores).__name__)
            raise TrainingError(f"rule {self.name!r}: _exit_scores returned {got}, not {k} "
                                f"tensor(s) of shape ({n}, {c}), one per exit; fix the rule")
        return list(scores)

    def autocast(self, x: Tensor):
        """The 16-bit autocast context for forward passes on ``x``'s device when the
        rule's amp is on (bf16 on a CPU, fp16 elsewhere, with a GradScaler that
        :meth:`_backward` and :meth:`_step` use), else a no-op. Backward passes run
        outside it."""
        if not self.amp_on(x.device):
            return contextlib.nullcontext()
        kind = x.device.type
        if kind == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(kind)
        return torch.autocast(kind, dtype=torch.float16)

    def amp_on(self, device: torch.device) -> bool:
        """Whether forward passes on ``device`` run under 16-bit autocast."""
        if not self.amp_wanted:
            return False
        if self._kept is not None:
            return self._kept.startswith(("bf16 autocast", "fp16 autocast"))
        return self.cfg.amp == "on" or half_precision_pays(device)[0]

    def keep_precision(self, recorded: object, device: torch.device | str) -> bool:
        """Under ``amp auto``, keep the arithmetic a resumed run started with
        (``recorded``: its config.json's ``precision``) instead of deciding again, since
        a timing on a busy machine may decide otherwise; whether it is kept."""
        half = "bf16" if torch.device(device).type == "cpu" else "fp16"
        if self.cfg.amp != "auto" or not self.amp_wanted or not isinstance(recorded, str) \
                or not recorded.startswith((f"{half} autocast (amp auto", "float32 (amp auto")):
            return False
        self._kept = recorded
        return True

    def precision(self, device: torch.device | str) -> str:
        """The arithmetic of forward passes on ``device`` and why, for the run's log and
        record: ``bf16 autocast (auto: ...)``, ``float32 (amp off)``, ..."""
        device = torch.device(device)
        half = "bf16" if device.type == "cpu" else "fp16"
        if self.cfg.amp == "on" and self.amp_wanted:
            return f"{half} autocast (amp on)"
        if not self.amp_wanted:
            return "float32 (amp " + ("off)" if self.cfg.amp == "off" else "auto: only "
                                      "spiking networks train in 16 bits)")
        if self._kept is not None:
            return self._kept
        pays, why = half_precision_pays(device)
        return f"{half} autocast (amp auto: {why})" if pays else f"float32 (amp auto: {why})"

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
            return [_full(s) for s in self._checked_scores(self._exit_scores(x), x.shape[0])]

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
        scores = self._checked_scores(self._exit_scores(x), x.shape[0])
        return torch.stack([(s.argmax(1) == y).sum() for s in scores])

    def _predict(self, x: Tensor) -> Tensor:
        return self._checked_scores(self._exit_scores(x), x.shape[0])[-1]

    # --- input checks --------------------------------------------------------------
    def _check_inputs(self, x: Tensor) -> int:
        """Check ``x`` against the network (on a CPU, with ``check_finite``, also that
        every value is finite); its batch size."""
        n = check_x(x, self.network)
        if n < 2:
            check_batch_statistics(self.network, n)
        if self.check_finite and x.device.type == "cpu":
            check_finite_x(x)
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
        """Load a state from :meth:`state_dict`; a mismatch raises CheckpointError before
        anything is loaded (the rule is unchanged)."""
        self.sync()
        hint = "the checkpoint was made with another network, rule or signal"
        if not isinstance(state, dict) or not isinstance(state.get("modules"), dict) \
                or not isinstance(state.get("optimizers"), list):
            raise CheckpointError(f"{hint} (not a rule state: no 'modules' and 'optimizers')")
        why = _module_mismatch(self.modules, state["modules"])
        if why is not None:
            if _dropped_biases(self.modules, state["modules"]):
                hint += (" (it holds the Linear bias in front of BatchNorm that fc blocks "
                         "no longer have: BatchNorm cancels it; retrain with this version)")
            raise CheckpointError(f"{hint} ({why})")
        if len(state["optimizers"]) != len(self.optimizers):
            raise CheckpointError(
                f"{hint} (it holds {len(state['optimizers'])} optimizer states, this rule "
                f"has {len(self.optimizers)}; sigprop checkpoints from before one grouped "
                "Adam per rule held one per block)"
            )
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            why = _optimizer_mismatch(opt, saved)
            if why is not None:
                raise CheckpointError(f"{hint} ({why})")
        try:  # checked above: what could fail here would be a bug, not the file
            self.modules.load_state_dict(state["modules"])
            for opt, saved in zip(self.optimizers, state["optimizers"]):
                opt.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{hint} ({first})") from None
        if "scaler" in state and self.amp_wanted:
            # a CUDA fp16 run's loss scale; a CPU (bf16) run needs none
            if self.scaler is None and torch.cuda.is_available():
                self.scaler = torch.amp.GradScaler("cuda")
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])

    def epoch_metrics(self) -> dict:
        """Numbers the rule measured over the epoch, for the metrics log (the trainer
        asks once at each epoch's end; the rule starts counting afresh)."""
        return {}

    def warnings(self, record: dict) -> list[str]:
        """One-line warnings about an epoch's record (its metrics), printed by the trainer."""
        return []

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
        # foreach bookkeeping cost ~0.1 ms a call (docs/studies/fast-path.md)
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


def build_rule(name: str, network: Network, num_classes: int, cfg: RuleConfig | None = None,
               **kw: Any) -> LearningRule:
    """Look up a registered rule by name and build it; ``kw`` (shared options or the
    rule's own) override ``cfg``'s."""
    if not isinstance(name, str):
        raise ConfigError(f"rule name must be a string, got {name!r}; choose one of: "
                          f"{', '.join(RULES.names())}")
    if cfg is not None and not isinstance(cfg, RuleConfig):
        raise ConfigError(f"cfg must be a RuleConfig, got {type(cfg).__name__}; build one "
                          "with sigprop.RuleConfig(...) or pass options as keywords")
    cls = RULES.get(name)
    cfg = (cfg or RuleConfig()).replace(**kw)
    cfg.validate()
    return cls(network, num_classes, cfg)


def _full(t: Tensor) -> Tensor:
    """A 16-bit result (from autocast) as float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _module_mismatch(modules: nn.Module, saved: dict) -> str | None:
    """Why ``saved`` cannot load into ``modules`` as it is (keys, shapes, dtypes), or
    None."""
    own = modules.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if missing:
        return f"it lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if missing[1:] else "")
    if extra:
        return f"it holds {extra[0]!r}, which this rule does not have"
    for key, mine in own.items():
        theirs = saved[key]
        if not isinstance(theirs, Tensor):
            return f"{key!r} is not a tensor"
        if theirs.shape != mine.shape:
            return (f"{key!r} has shape {tuple(theirs.shape)}, this rule's "
                    f"{tuple(mine.shape)}")
        if theirs.dtype != mine.dtype and not (theirs.is_floating_point()
                                               and mine.is_floating_point()):
            return f"{key!r} holds {theirs.dtype}, this rule's {mine.dtype}"
    return None


def _optimizer_mismatch(opt: torch.optim.Optimizer, saved: object) -> str | None:
    """Why ``saved`` cannot load into ``opt`` (its groups and their sizes), or None."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) \
            or not isinstance(saved.get("state"), dict):
        return "an optimizer state is damaged"
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups):
        return (f"its optimizer has {len(groups)} parameter groups, this rule's "
                f"{len(opt.param_groups)}")
    for mine, theirs in zip(opt.param_groups, groups):
        if not isinstance(theirs, dict) or len(theirs.get("params", ())) != len(mine["params"]):
            return f"an optimizer group differs from this rule's ({mine.get('name', '?')})"
    return None


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


def _spiking_rules() -> str:
    """The registered rules that train spiking networks, for an error message."""
    names = [n for n, cls in RULES.items() if getattr(cls, "trains_spiking", False)]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)
