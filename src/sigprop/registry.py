"""Name -> factory registries, so a new rule, network, generator or dataset is one
decorator in one file:

    @register_rule("dfa")
    class DFA(LearningRule): ...

The command line lists names with ``RULES.names()`` and looks them up with
``RULES.get``. Packages outside sigprop register theirs through the entry-point group
``sigprop.plugins`` (:func:`load_plugins`; docs/EXTENDING.md).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")
PLUGIN_GROUP = "sigprop.plugins"


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._usage: dict[str, str] = {}

    def register(self, name: str, usage: str | None = None) -> Callable[[T], T]:
        """Register under ``name``; ``usage`` is how a user writes it when that differs
        from the name (``"fc-<layers>x<width>"`` for the family ``fc``)."""
        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is registered twice; a plugin may "
                                  "not reuse a built-in name: rename it")
            self._items[name] = obj
            self._usage[name] = usage or name
            if isinstance(obj, type) and hasattr(obj, "name") and "name" not in vars(obj):
                obj.name = name  # a rule class knows its registered name (messages)
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.usages())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def usages(self) -> list[str]:
        """How each is written, in name order (``fc-<layers>x<width>``, ``vgg8b``, ...)."""
        return [self._usage[n] for n in self.names()]

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items


RULES: Registry = Registry("rule")
NETWORKS: Registry = Registry("network")
DATASETS: Registry = Registry("dataset")
SIGNALS: Registry = Registry("signal")
SPARSE_SIGNALS: Registry = Registry("sparse signal")  # sparse variants (Sec. III-E), by signal

register_rule = RULES.register
register_network = NETWORKS.register
register_dataset = DATASETS.register
register_signal = SIGNALS.register
register_sparse_signal = SPARSE_SIGNALS.register

_loaded: dict[str, str] = {}
_plugin_modules: set[str] = set()  # the top-level packages the plugins loaded from


def plugin_packages() -> frozenset[str]:
    """The top-level packages of the plugins loaded so far (to tell their errors apart)."""
    return frozenset(_plugin_modules)


def load_plugins(check: Callable[[], None] | None = None) -> dict[str, str]:
    """Import every module named in the entry-point group ``sigprop.plugins`` (its
    ``@register_*`` decorators run); once per process. Returns {entry name: module}. A
    plugin that fails to import, or after which ``check()`` raises ConfigError (what it
    registered does not fit: :func:`sigprop.rules.load_plugins` checks the rules), is a
    ConfigError naming it and the error."""
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        if ep.name in _loaded:
            continue
        try:
            ep.load()
            if check is not None:
                check()
        except ConfigError as err:
            raise ConfigError(f"plugin {ep.name!r} ({ep.value}): {err}") from None
        except (Exception, SystemExit) as err:  # a plugin's own bug: name it, no crash
            first = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"plugin {ep.name!r} ({ep.value}) failed to import: "
                              f"{type(err).__name__}: {first}; fix it or uninstall its "
                              "package") from None
        _loaded[ep.name] = ep.value
        _plugin_modules.add(ep.value.partition(":")[0].split(".")[0])
    return dict(_loaded)
