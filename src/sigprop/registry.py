"""Name -> factory registries, so a new rule, network or dataset is one decorator.

    @register_rule("dfa")
    class DFA(LearningRule): ...

The CLI lists names with ``RULES.names()`` and looks them up with ``RULES.get``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            if isinstance(obj, type) and hasattr(obj, "name") and "name" not in vars(obj):
                obj.name = name  # a rule class knows its registered name (messages)
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

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
