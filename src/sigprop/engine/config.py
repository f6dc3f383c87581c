"""Run configuration: one dataclass per section, TOML presets, flags on top.

    [data]   dataset, data_dir, train_split, train_limit, test_limit, augment, batch_size,
             eval_batch_size
    [model]  network, dropout
    [rule]   name, lr, weight_decay, amp, and the rule's own options (each rule declares
             them in its own file: sigprop.options)
    [train]  epochs, schedule, seed, device, layout, run_dir, progress, check_every,
             stages, split, split_by, stage_threads, replicas

Precedence: defaults < ``--config FILE.toml`` < command-line flags. What ``--resume`` may
change: :mod:`.resumable`.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import dataset_spec, parse_augment
from ..errors import ConfigError
from ..networks import DROPOUT_LEVELS  # Dropout's p is a multiple of 1/65536
from ..options import Option, Options
from ..registry import RULES
from ..resources import check_processes, check_threads
from ..rules.config import SHARED, RuleConfig, declared_options
from .flags import SECTION_FLAGS, SWITCH_FLAGS
from .layout import LAYOUTS
from .stagespec import parse_split, stage_count

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_split: str = "train"  # the split trained on (SVHN: train+extra, Sec. IV)
    train_limit: int | None = None  # use only the first N training samples
    test_limit: int | None = None  # evaluate on the first N test samples only (quick checks)
    augment: str = "auto"  # auto (the dataset's default) | none | crop | flip | crop+flip
    batch_size: int = 128
    eval_batch_size: int = 1000
    # what the network sees: standard (the dataset's mean and std) | unit (pixels in [0, 1])
    inputs: str = "standard"


@dataclass
class ModelConfig:
    network: str = "fc-3x1000"
    dropout: float = 0.0


class RuleSection(RuleConfig):
    """[rule]: the rule's ``name``, the shared options and the rule's own (``options``,
    as given; :meth:`resolved` fills in the defaults of the rule's declarations)."""

    def __init__(self, name: str = "sigprop", **kw: Any) -> None:
        super().__init__(**kw)
        self.name = name

    def replace(self, **changes: Any) -> RuleSection:
        name = changes.pop("name", self.name)
        base = RuleConfig.replace(self, **changes)
        return RuleSection(name, **base.shared(), options=base.options)

    def replace_options(self, options: dict[str, Any]) -> RuleSection:
        """A copy holding ``options`` (all of them) as the rule's own."""
        return RuleSection(self.name, **self.shared(), options=options)

    def resolved(self) -> Options:
        """The rule's options, checked, its declarations' defaults filled in."""
        return RULES.get(self.name).resolve_options(self.options)

    def to_dict(self) -> dict[str, Any]:
        """The [rule] table: name, shared options, then the rule's own (resolved when the
        rule is known, else as given)."""
        try:
            options = dict(self.resolved())
        except ConfigError:
            options = dict(self.options)
        return {"name": self.name, **self.shared(), **options}

    def validate(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"rule.name must be a rule's name, got {self.name!r}; choose "
                              f"one of: {', '.join(RULES.names())}")
        super().validate()
        self.resolved()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuleSection) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"RuleSection({self.to_dict()!r})"


@dataclass
class TrainConfig:
    epochs: int = 10
    schedule: str = "step"  # step (x0.25 at 50/75/89/94% of epochs) | step10 | cosine | none
    seed: int = 0
    device: str = "cpu"
    # the conv maps' memory layout: auto | nchw | channels-last (engine.layout)
    layout: str = "auto"
    run_dir: str | None = None
    progress: bool = True
    check_every: int = 50  # steps between non-finite-loss checks (one host sync each)
    # layer-parallel training (sigprop.parallel): blocks split into this many stages, one
    # process each; split the blocks per stage by hand ("2,1"), else balanced by cost
    stages: int = 1
    split: str | None = None
    # what the balanced split balances: each block's measured step time (a short
    # calibration at the start, recorded) or its counted cost (sigprop.parallel.split)
    split_by: str = "measured"
    stage_threads: int | None = None  # intra-op threads per stage (default: cores / processes)
    # data-parallel replicas of every stage: each batch is shared out among them and each
    # stage's gradients are all-reduced within its replicas before its optimizer step
    replicas: int = 1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rule: RuleSection = field(default_factory=RuleSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"data": dataclasses.asdict(self.data), "model": dataclasses.asdict(self.model),
                "rule": self.rule.to_dict(), "train": dataclasses.asdict(self.train)}

    def validate(self) -> None:
        """Check every value that can be checked without data or memory: bad values stop
        here, before a run folder is made or a file read."""
        d, m, t = self.data, self.model, self.train
        # BatchNorm cannot train on one sample (its variance would be 0)
        _positive("data.batch_size", d.batch_size, minimum=2,
                  why="BatchNorm needs at least 2 samples per training batch")
        _positive("data.eval_batch_size", d.eval_batch_size)
        if d.train_limit is not None:
            _positive("data.train_limit", d.train_limit)
        if d.test_limit is not None:
            _positive("data.test_limit", d.test_limit)
        if d.data_dir is not None and not d.data_dir.strip():
            raise ConfigError("data.data_dir is empty; give the dataset's folder or leave it out")
        spec = dataset_spec(d.dataset)
        parse_augment(d.augment, spec)
        if d.inputs not in INPUTS:
            raise ConfigError(f"data.inputs must be one of: {', '.join(INPUTS)}, got "
                              f"{d.inputs!r}; standard: the dataset's mean and std, unit: "
                              "pixels in [0, 1]")
        trainable = [s for s in spec.splits if s != "test"]
        if d.train_split not in trainable:
            raise ConfigError(f"data.train_split must be a training split of {d.dataset} "
                              f"({', '.join(trainable)}), got {d.train_split!r}")
        if not 0.0 <= m.dropout < 1.0 or round(m.dropout * DROPOUT_LEVELS) >= DROPOUT_LEVELS:
            raise ConfigError(
                f"model.dropout must be in [0, 1) and keep at least 1/{DROPOUT_LEVELS} of the "
                f"units (at most {1 - 1 / DROPOUT_LEVELS:.7f}), got {m.dropout}")
        _positive("train.epochs", t.epochs)
        _positive("train.check_every", t.check_every)
        if not isinstance(t.seed, int) or not 0 <= t.seed <= MAX_SEED:
            raise ConfigError(f"train.seed must be an integer in 0..{MAX_SEED} (2^63 - 2), "
                              f"got {t.seed!r}")
        if t.schedule not in ("step", "step10", "cosine", "none"):
            raise ConfigError(f"train.schedule must be step, step10, cosine or none, got "
                              f"{t.schedule!r}")
        if t.layout not in LAYOUTS:
            raise ConfigError(f"train.layout must be {', '.join(LAYOUTS)}, got {t.layout!r}")
        if t.run_dir is not None and not t.run_dir.strip():
            raise ConfigError("train.run_dir is empty; give a folder name or leave it out")
        _positive("train.stages", t.stages)
        _positive("train.replicas", t.replicas)
        if t.stage_threads is not None:
            check_threads(t.stage_threads, "train.stage_threads (--stage-threads)")
        if t.split is not None:
            sizes = parse_split(t.split)
            if t.stages not in (1, len(sizes)):
                raise ConfigError(f"train.split {t.split!r} names {len(sizes)} stages but "
                                  f"train.stages is {t.stages}; give one of them, or agree")
        if t.split_by not in ("measured", "counted"):
            raise ConfigError(f"train.split_by must be measured or counted, got {t.split_by!r}")
        stages = stage_count(t.stages, t.split)
        if stages * t.replicas > 1:
            check_processes(stages * t.replicas, f"{stages} stages x {t.replicas} replicas",
                            "give fewer --stages (--split) or --replicas")
        self.rule.validate()


# the dropout stream is seeded with seed + 1, which must fit torch's 64-bit seed
MAX_SEED = 2**63 - 2


INPUTS = ("standard", "unit")  # data.inputs

# no real run counts beyond this (samples, epochs, steps, stages); larger ones overflow
MAX_COUNT = 10**12


def _positive(key: str, value: int, minimum: int = 1, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_COUNT:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {need} (at most {MAX_COUNT:.0e}){f' ({why})' if why else ''}, "
                          f"got {value!r}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


@functools.lru_cache(maxsize=None)
def _section_types(section: str) -> dict[str, Any]:
    cls = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, tp: Any, text: bool) -> Any:
    """Check ``value`` against the field type ``tp`` (int, float, str, bool, X | None);
    a string is converted only when it comes from a command-line flag (``text``)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    what = _MEANING.get(key, key)
    return Option(key.replace(".", "_"), tp, None, what, max_length=MAX_PATH,
                  magnitude=2.0**63).check(value, key, text)


MAX_PATH = 4096  # characters of a path or name in a config (Linux PATH_MAX)
# section.key -> what it is, for messages (the help of its flag)
_MEANING: dict[str, str] = {f"{s}.{k}": kw["help"] for _, s, k, kw in SECTION_FLAGS if "help" in kw}


def rule_keys() -> list[str]:
    """Every key a [rule] table may hold: name, the shared options, every declared one."""
    return ["name", *(o.name for o in SHARED),
            *sorted(set(declared_options()) - {o.name for o in SHARED})]


def _apply_rule(rule: RuleSection, values: dict[str, Any], text: bool) -> RuleSection:
    declared = declared_options()
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key == "name":
            if not isinstance(value, str):
                raise ConfigError(f"rule.name: expected str, got {value!r}")
            changes[key] = value
        elif key in declared:
            changes[key] = declared[key].check(value, f"rule.{key}", text)
        else:
            raise ConfigError(f"unknown key rule.{key}; keys of [rule] are: "
                              f"{', '.join(rule_keys())}")
    return rule.replace(**changes)


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], text: bool = False
                    ) -> Config:
    """Return ``cfg`` with ``{section: {key: value}}`` applied, each value type-checked
    (``text``: the values are command-line strings, converted to each key's type)."""
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section [{section}]; sections are: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of key = value")
        if section == "rule":
            cfg = dataclasses.replace(cfg, rule=_apply_rule(cfg.rule, values, text))
            continue
        types_ = _section_types(section)
        changes = {}
        for key, value in values.items():
            if key not in types_:
                raise ConfigError(
                    f"unknown key {section}.{key}; keys of [{section}] are: {', '.join(types_)}"
                )
            changes[key] = _coerce(f"{section}.{key}", value, types_[key], text)
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})
    return cfg


MAX_TOML = 2**20  # bytes of a config or experiment file: far more than any needs


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The table of the TOML file ``path``; every failure (missing, a folder, too large,
    not UTF-8, not TOML, nested too deeply) one ConfigError naming ``what`` and the path."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a directory; give a .toml file")
        if not path.exists():
            raise ConfigError(f"{what} {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"{what} {path} is not a regular file (a device, a pipe or a "
                              "socket); give a .toml file")
        with open(path, "rb") as f:
            data = f.read(MAX_TOML + 1)
        if len(data) > MAX_TOML:
            raise ConfigError(f"{what} {path} is larger than {MAX_TOML // 2**20} MiB; no "
                              "sigprop file is: give the right file")
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}); save it "
                          "as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to be a sigprop file; give "
                          "the right file") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path} ({err.strerror or err})") from None


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """A ``--config`` file's tables."""
    return read_toml(path, "config file")


def rule_defaults(name: object) -> dict[str, dict[str, Any]]:
    """The engine settings rule ``name`` chooses for itself (``engine_defaults``), as
    overrides ({} for an unknown name: said when the config is checked)."""
    cls = RULES.get(name) if isinstance(name, str) and name in RULES else None
    out: dict[str, dict[str, Any]] = {}
    for key, value in (cls.engine_defaults if cls is not None else {}).items():
        section, _, field_ = key.partition(".")
        out.setdefault(section, {})[field_] = value
    return out


def compose(*layers: tuple[dict[str, dict[str, Any]], bool]) -> Config:
    """A new run's config: the defaults, then the chosen rule's own (batch size, schedule,
    inputs, ...), then each ``(overrides, text)`` layer in order (``text``: flags). The
    rule is the one the layers name (the last one that does)."""
    name = Config().rule.name
    for overrides, _ in layers:
        rule = overrides.get("rule") if isinstance(overrides, dict) else None
        if isinstance(rule, dict) and "name" in rule:
            name = rule["name"]
    cfg = apply_overrides(Config(), rule_defaults(name))
    for overrides, text in layers:
        cfg = apply_overrides(cfg, overrides, text=text)
    return cfg


def config_from_dict(d: dict[str, dict[str, Any]]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used to rebuild a run from its folder).

    Records written before rules declared their own options hold every rule's options;
    those the recorded rule does not take are dropped (they had no effect on it). A run
    recorded before ``rule.target_dropout`` existed (its rule table lacks the key)
    dropped its targets' units, the option's ``on``; with dropout it resumes so. A rule
    whose defaults changed reads older records itself (``recorded_options``)."""
    rule, model = d.get("rule"), d.get("model")
    if isinstance(rule, dict):
        if (rule.get("name", "sigprop") == "sigprop" and "target_dropout" not in rule
                and isinstance(model, dict)
                and isinstance(model.get("dropout"), (int, float)) and model["dropout"] > 0):
            rule = {**rule, "target_dropout": "on"}
        name = rule.get("name", "sigprop")
        if isinstance(name, str) and name in RULES:
            rule = RULES.get(name).recorded_options(rule)
        d = {**d, "rule": _own_options(rule)}
    return apply_overrides(Config(), d)


def _own_options(rule: dict[str, Any]) -> dict[str, Any]:
    """A recorded [rule] table without the options its rule does not take."""
    shared = {"name", *RuleConfig.SHARED_NAMES}
    given = {k: v for k, v in rule.items() if k not in shared}
    foreign = foreign_options(rule.get("name", "sigprop"), given)
    return {k: v for k, v in rule.items() if k not in foreign}


def foreign_options(name: Any, given: dict[str, Any]) -> set[str]:
    """The names in ``given`` that rule ``name`` does not take (none when the rule is
    unknown or a value that decides its options is bad: checking says so later)."""
    if not isinstance(name, str) or name not in RULES:
        return set()
    try:
        scope = {o.name for o in RULES.get(name).option_scope(given)}
    except ConfigError:
        return set()
    return set(given) - scope


def without_options(cfg: Config, names: set[str]) -> Config:
    """``cfg`` without the [rule] options ``names``."""
    options = {k: v for k, v in cfg.rule.options.items() if k not in names}
    return dataclasses.replace(cfg, rule=cfg.rule.replace_options(options))


def train_command(cfg: Config, always: tuple[str, ...] = ()) -> str:
    """The `sigprop train` command line that runs ``cfg``: a flag for every value that
    differs from the defaults, and for the ``always`` keys (``"section.key"``)."""
    # against the defaults of its rule (its own batch size, schedule, ...)
    base = compose(({"rule": {"name": cfg.rule.name}}, False)).to_dict()
    now = cfg.to_dict()
    words = ["sigprop", "train"]
    for flag, section, key, _ in SECTION_FLAGS:
        value = now[section][key]
        if value is not None and (value != base[section][key] or f"{section}.{key}" in always):
            words += [flag, str(value)]
    for flag, section, key, value, _ in SWITCH_FLAGS:
        if now[section][key] == value:
            words.append(flag)
    rule, declared = now["rule"], declared_options()
    if rule["name"] != "sigprop" or "rule.name" in always:
        words += ["--rule", rule["name"]]
    for key, value in rule.items():
        o = declared.get(key)
        if o is None or value is None:
            continue
        if o.switch and value == o.switch[1]:
            words.append(o.switch[0])
        elif value != o.default or f"rule.{key}" in always:
            words += [o.flag, str(value).lower() if o.type is bool else str(value)]
    return shlex.join(words)
