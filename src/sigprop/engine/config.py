"""Run configuration: one dataclass per section, TOML presets, flags on top.

    [data]   dataset, data_dir, train_limit, augment, batch_size, eval_batch_size
    [model]  network, dropout
    [rule]   name, lr, weight_decay, signal, signal_learned, head, loss, ...
    [train]  epochs, schedule, seed, device, run_dir, progress, check_every

Precedence: defaults < ``--config FILE.toml`` < command-line flags.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..rules.base import RuleConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_limit: int | None = None  # use only the first N training samples
    augment: str = "auto"  # auto (the dataset's default) | none | crop | flip | crop+flip
    batch_size: int = 128
    eval_batch_size: int = 1000


@dataclass
class ModelConfig:
    network: str = "fc-3x1000"
    dropout: float = 0.0


@dataclass
class RuleSection(RuleConfig):
    name: str = "sigprop"


@dataclass
class TrainConfig:
    epochs: int = 10
    schedule: str = "step"  # step (x0.25 at 50/75/89/94% of epochs) | cosine | none
    seed: int = 0
    device: str = "cpu"
    run_dir: str | None = None
    progress: bool = True
    check_every: int = 50  # steps between non-finite-loss checks (one host sync each)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleSection = field(default_factory=RuleSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        d, m, t = self.data, self.model, self.train
        _positive("data.batch_size", d.batch_size)
        _positive("data.eval_batch_size", d.eval_batch_size)
        if d.train_limit is not None:
            _positive("data.train_limit", d.train_limit)
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        _positive("train.epochs", t.epochs)
        _positive("train.check_every", t.check_every)
        if t.schedule not in ("step", "cosine", "none"):
            raise ConfigError(f"train.schedule must be step, cosine or none, got {t.schedule!r}")
        self.rule.validate()


def _positive(key: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types(section: str) -> dict[str, Any]:
    cls = {"data": DataConfig, "model": ModelConfig, "rule": RuleSection, "train": TrainConfig}[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the field type ``tp`` (int, float, str, bool, X | None)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp in (int, float):
        # ints widen to float; floats never narrow to int; strings come from flags
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and (tp is float or isinstance(value, int)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]]) -> Config:
    """Return ``cfg`` with ``{section: {key: value}}`` applied, each value type-checked."""
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section [{section}]; sections are: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value")
        types_ = _section_types(section)
        changes = {}
        for key, value in values.items():
            if key not in types_:
                raise ConfigError(
                    f"unknown key {section}.{key}; keys of [{section}] are: {', '.join(types_)}"
                )
            changes[key] = _coerce(f"{section}.{key}", value, types_[key])
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
    return cfg


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def config_from_dict(d: dict[str, dict[str, Any]]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used to rebuild a run from its folder)."""
    return apply_overrides(Config(), d)
