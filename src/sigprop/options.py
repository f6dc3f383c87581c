"""Options that a rule or a target generator declares in its own file.

    @register_rule("ll-bp")
    class LLBP(LearningRule):
        options = (Option("ll_beta", float, None, "the similarity share of predsim",
                          low=0.0, high=1.0, optional=True),)

One declaration gives the ``sigprop train`` flag (``--ll-beta``) and its help, the
check of a value (one line naming the option, :class:`ConfigError`), the TOML key of
``[rule]``, the entry in a run's ``config.json`` and whether ``--resume`` may change
it. Values arrive as Python values (the API, TOML) or as strings (flags).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

# ASCII digits only: int() and float() also take other scripts' digits
_NUMBER = {
    int: re.compile(r"[+-]?[0-9]+"),
    float: re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)",
                      re.IGNORECASE),
}
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
# no real use gives an option value larger than this; larger ones overflow later
MAX_MAGNITUDE = 1e12
MAX_TEXT = 200  # characters of a string option


@dataclass(frozen=True)
class Option:
    """One option: its ``name`` (TOML key, attribute, ``--name-with-dashes`` flag),
    type (int, float, str or bool), default, help and allowed values.

    ``choices``: the allowed strings, or a function giving them (a registry's names).
    ``low``/``high``: the range of a number, inclusive unless ``low_open``/``high_open``.
    ``optional``: None is allowed and means "the rule's own default" (its help says
    which). ``resumable``: ``--resume`` may change it (how a run computes, not what).
    ``switch``: an extra flag without a value that sets the option, ``("--signal-fixed",
    False)``. ``max_length``: the most characters of a string value; ``magnitude``: the
    largest absolute value of a number.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | Callable[[], Sequence[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    resumable: bool = False
    metavar: str | None = None
    switch: tuple[str, Any] | None = None
    max_length: int = MAX_TEXT
    magnitude: float = MAX_MAGNITUDE

    def __post_init__(self) -> None:
        if self.type not in (int, float, str, bool):
            raise TypeError(f"option {self.name!r}: type must be int, float, str or bool")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise TypeError(f"option {self.name!r}: a name is lowercase letters, digits and _")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """What values it takes, for messages and help."""
        allowed = self.allowed()
        if allowed is not None:
            return "one of: " + ", ".join(allowed)
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return "text"
        kind = "an integer" if self.type is int else "a finite number"
        low = self.low
        if self.type is int and low == 1 and not self.low_open:
            kind, low = "a positive integer", None
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {_num(low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def check(self, value: Any, where: str | None = None, text: bool = False) -> Any:
        """``value`` checked against the declaration; a ConfigError naming ``where``
        (default the name), what it means and what it takes otherwise. Values must have
        the option's type (an int may stand for a float), except with ``text`` (a
        command-line flag), where a string is parsed."""
        key = where or self.name
        if value is None:
            if self.optional:
                return None
            raise self._type_error(key, value)
        tp = self.type
        if tp is bool:
            if isinstance(value, bool):
                return value
            if text and isinstance(value, str) and value.strip().lower() in _BOOLS:
                return _BOOLS[value.strip().lower()]
            raise self._type_error(key, value)
        if tp is str:
            if not isinstance(value, str):
                raise self._type_error(key, value)
            if len(value) > self.max_length:
                raise ConfigError(f"{key} is {len(value)} characters long, more than the "
                                  f"{self.max_length} it may have ({self.help}); shorten it")
            allowed = self.allowed()
            if allowed is not None and value not in allowed:
                raise self._value_error(key, value)
            return value
        number = _to_number(value, tp, text)
        if number is None and isinstance(value, int) and not isinstance(value, bool):
            raise self._value_error(key, value)  # an integer beyond 64 bits
        if number is None:
            raise self._type_error(key, value)
        v = float(number)
        if not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {value!r} ({self.help}; "
                              f"it takes {self.describe()})")
        ok = abs(v) <= self.magnitude
        if ok and self.low is not None:
            ok = v > self.low if self.low_open else v >= self.low
        if ok and self.high is not None:
            ok = v < self.high if self.high_open else v <= self.high
        if not ok:
            raise self._value_error(key, value)
        return number

    def _got(self, value: Any) -> str:
        got = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            got += f" ({type(value).__name__})"
        return got

    def _type_error(self, key: str, value: Any) -> ConfigError:
        unset = ", or unset for the default" if self.optional else ""
        return ConfigError(f"{key}: expected {self.type.__name__}, got {self._got(value)} "
                           f"({self.help}; it takes {self.describe()}{unset})")

    def _value_error(self, key: str, value: Any) -> ConfigError:
        unset = " or leave it unset for the default" if self.optional else ""
        if self.allowed() is not None:
            return ConfigError(f"{key} must be {self.describe()}, got {self._got(value)}; "
                               f"choose one of them{unset}")
        return ConfigError(f"{key} ({self.help}) must be {self.describe()}, got "
                           f"{self._got(value)}; choose another value{unset}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _to_number(value: Any, tp: type, text: bool) -> int | float | None:
    """``value`` as ``tp`` (int or float): ints widen to float, floats never narrow,
    strings are parsed if ``text``; anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and tp is float):
        if isinstance(value, int) and abs(value) >= 2**63:
            return None  # beyond a 64-bit integer
        return tp(value)
    if text and isinstance(value, str) and len(value) <= 64 \
            and _NUMBER[tp].fullmatch(value.strip()):
        number = tp(value.strip())
        return number if tp is float or abs(number) < 2**63 else None
    return None


class Options(Mapping):
    """The checked values of one rule's options (its declarations' defaults filled in),
    read as attributes: ``opts.ll_beta``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option {name!r}") from None

    def __reduce__(self):
        return (Options, (dict(self._values),))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("options are read-only; build the rule with other options")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Options({self._values!r})"


def resolve(declared: Iterable[Option], given: Mapping[str, Any], owner: str) -> Options:
    """The declared options with ``given`` values checked and defaults filled in; a
    ConfigError for a value that fails its check or a name ``owner`` does not declare."""
    decl = {o.name: o for o in declared}
    unknown = sorted(set(given) - set(decl))
    if unknown:
        names = ", ".join(decl) or "none"
        raise ConfigError(f"{owner} has no option {unknown[0]!r}; its options are: {names}")
    return Options({name: o.check(given[name]) if name in given else o.default
                    for name, o in decl.items()})


def merge(groups: Iterable[Iterable[Option]]) -> dict[str, Option]:
    """One declaration per name from several groups; two different declarations under
    one name are a programming error (a flag can mean one thing only)."""
    out: dict[str, Option] = {}
    for group in groups:
        for o in group:
            seen = out.get(o.name)
            if seen is not None and seen != o:
                raise TypeError(f"option {o.name!r} is declared twice, differently; declare it "
                                "once and share the declaration")
            out[o.name] = o
    return out
