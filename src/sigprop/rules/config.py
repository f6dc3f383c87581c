"""What every rule shares (learning rate, weight decay, mixed precision) and the
registry-wide view of the options that rules and target generators declare.

A rule's own options live in its own file (``options = (Option(...), ...)`` on its
class, :mod:`sigprop.options`); :class:`RuleConfig` carries their values by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..options import Option, merge
from ..registry import RULES, SIGNALS

LR = Option("lr", float, 5e-4, "the Adam learning rate", low=0.0, low_open=True)
WEIGHT_DECAY = Option("weight_decay", float, 0.0, "Adam's weight decay", low=0.0)
AMP = Option("amp", str, "auto",
             "16-bit mixed precision (bf16 autocast on a CPU, fp16 + GradScaler on CUDA): auto "
             "(spiking networks, where the device computes 16 bits natively and faster: CUDA, "
             "a CPU with native bf16 that a timed conv confirms) | on | off",
             choices=("auto", "on", "off"))
SHARED = (LR, WEIGHT_DECAY, AMP)
# the IF neurons' threshold, for every rule that trains spiking networks (Sec. VI-A)
SPIKE_THRESHOLD = Option(
    "spike_threshold", float, None,
    "spiking networks: the IF neurons' threshold (default: 0.5 for sp-surrogate / "
    "sp-voltage, 1.0 otherwise, Sec. VI)", low=0.0, low_open=True, high=1e6, optional=True)


class RuleConfig:
    """The options of one rule: the shared ones as attributes (``lr``, ``weight_decay``,
    ``amp``), the rule's own by name in ``options`` (``RuleConfig(lr=1e-3,
    head="classifier")`` puts ``head`` there). The rule checks its own when it is built."""

    SHARED_NAMES = tuple(o.name for o in SHARED)

    def __init__(self, lr: float = LR.default, weight_decay: float = WEIGHT_DECAY.default,
                 amp: str = AMP.default, *, options: Mapping[str, Any] | None = None,
                 **more: Any) -> None:
        self.lr, self.weight_decay, self.amp = lr, weight_decay, amp
        self.options: dict[str, Any] = {**(options or {}), **more}

    def replace(self, **changes: Any) -> RuleConfig:
        """A copy with ``changes`` (shared names or options) applied."""
        shared = {k: changes.pop(k) for k in list(changes) if k in self.SHARED_NAMES}
        values = {k: getattr(self, k) for k in self.SHARED_NAMES} | shared
        return RuleConfig(**values, options={**self.options, **changes})

    def shared(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.SHARED_NAMES}

    def validate(self) -> None:
        """Check the shared values, and each option against its declaration (whoever
        declares it); the rule checks that its options are its own when it is built."""
        for o in SHARED:
            o.check(getattr(self, o.name))
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a dict of option name -> value, got "
                              f"{type(self.options).__name__}")
        known = declared_options()
        for name, value in self.options.items():
            if name not in known:
                raise unknown_option(name)
            known[name].check(value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuleConfig) and self.shared() == other.shared() \
            and self.options == other.options

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in {**self.shared(), **self.options}.items())
        return f"RuleConfig({inner})"


def declared_options() -> dict[str, Option]:
    """Every option a registered rule or target generator declares, by name, and the
    shared ones."""
    groups = [SHARED] + [cls.options for _, cls in RULES.items()]
    groups += [cls.options for _, cls in SIGNALS.items()]
    return merge(groups)


def owners(name: str) -> list[str]:
    """The rules (and generators, as ``signal X``) that declare option ``name``."""
    rules = [n for n, cls in RULES.items() if any(o.name == name for o in cls.options)]
    signals = [f"signal {n}" for n, cls in SIGNALS.items()
               if any(o.name == name for o in cls.options)]
    return rules + signals


def unknown_option(name: str) -> ConfigError:
    names = ", ".join([*RuleConfig.SHARED_NAMES, *sorted(set(declared_options())
                                                         - set(RuleConfig.SHARED_NAMES))])
    return ConfigError(f"unknown rule option {name!r}; choose from: {names}")


def foreign_option(name: str, rule: str, detail: str = "") -> ConfigError:
    """The error for an option that exists, but not for this rule (or generator)."""
    who = ", ".join(owners(name)) or "no rule"
    flag = "--" + name.replace("_", "-")
    return ConfigError(f"{name} ({flag}) is an option of {who}, not of rule {rule!r}"
                       f"{detail}; drop it")
