"""Run configuration: one dataclass per section, TOML presets, flags on top.

    [data]   dataset, data_dir, train_split, train_limit, test_limit, augment, batch_size,
             eval_batch_size
    [model]  network, dropout
    [rule]   name, lr, weight_decay, signal, signal_learned, head, loss, ...
    [train]  epochs, schedule, seed, device, run_dir, progress, check_every, stages, split,
             stage_threads, replicas

Precedence: defaults < ``--config FILE.toml`` < command-line flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shlex
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..networks import DROPOUT_LEVELS  # Dropout's p is a multiple of 1/65536
from ..rules.base import RuleConfig
from .stagespec import parse_split

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
    # layer-parallel training (sigprop.parallel): blocks split into this many stages, one
    # process each; split the blocks per stage by hand ("2,1"), else balanced by cost
    stages: int = 1
    split: str | None = None
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
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check every value that can be checked without data or memory: bad values stop
        here, before a run folder is made or a file read."""
        from ..data import dataset_spec, parse_augment

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
        if t.schedule not in ("step", "cosine", "none"):
            raise ConfigError(f"train.schedule must be step, cosine or none, got {t.schedule!r}")
        if t.run_dir is not None and not t.run_dir.strip():
            raise ConfigError("train.run_dir is empty; give a folder name or leave it out")
        _positive("train.stages", t.stages)
        _positive("train.replicas", t.replicas)
        if t.stage_threads is not None:
            _positive("train.stage_threads", t.stage_threads)
        if t.split is not None:
            sizes = parse_split(t.split)
            if t.stages not in (1, len(sizes)):
                raise ConfigError(f"train.split {t.split!r} names {len(sizes)} stages but "
                                  f"train.stages is {t.stages}; give one of them, or agree")
        self.rule.validate()


# the dropout stream is seeded with seed + 1, which must fit torch's 64-bit seed
MAX_SEED = 2**63 - 2


def _positive(key: str, value: int, minimum: int = 1, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {need}{f' ({why})' if why else ''}, got {value!r}")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


@functools.lru_cache(maxsize=None)
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
            return _finite(key, tp(value))
        if isinstance(value, str) and _NUMBER[tp].fullmatch(value.strip()):
            return _finite(key, tp(value))
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


# ASCII digits only: int() and float() also take other scripts' digits ("٣")
_NUMBER = {
    int: re.compile(r"[+-]?[0-9]+"),
    float: re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)",
                      re.IGNORECASE),
}


def _finite(key: str, value: int | float) -> int | float:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


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
    try:
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give a .toml file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); save it "
                          "as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path} ({err.strerror or err})") from None


def config_from_dict(d: dict[str, dict[str, Any]]) -> Config:
    """Inverse of :meth:`Config.to_dict` (used to rebuild a run from its folder).

    A run recorded before ``rule.target_dropout`` existed (its rule table lacks the
    key) dropped its targets' units, the option's ``on``; with dropout it resumes so
    (its default is now ``off``; without dropout the option does nothing)."""
    rule, model = d.get("rule"), d.get("model")
    if (isinstance(rule, dict) and "target_dropout" not in rule and isinstance(model, dict)
            and isinstance(model.get("dropout"), (int, float)) and model["dropout"] > 0):
        d = {**d, "rule": {**rule, "target_dropout": "on"}}
    return apply_overrides(Config(), d)


# `sigprop train` flags: (flag, section, key, argparse keywords); argparse stores each
# under "section.key", and only what was given.
TRAIN_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--dataset", "data", "dataset", {"help": "dataset name (sigprop data list)"}),
    ("--data-dir", "data", "data_dir", {"help": "folder holding the dataset files"}),
    ("--train-limit", "data", "train_limit", {"metavar": "N", "help": "use the first N training samples"}),
    ("--test-limit", "data", "test_limit", {"metavar": "N", "help": "evaluate on the first N test samples only (quick checks)"}),
    ("--train-split", "data", "train_split", {"help": "the split to train on (default train; SVHN: train+extra, as the paper)"}),
    ("--augment", "data", "augment", {"help": "auto | none | crop | flip | crop+flip"}),
    ("--batch-size", "data", "batch_size", {}),
    ("--eval-batch-size", "data", "eval_batch_size", {}),
    ("--network", "model", "network", {"help": "e.g. fc-3x1000, fc-2x800"}),
    ("--dropout", "model", "dropout", {}),
    ("--rule", "rule", "name", {"help": "sigprop | backprop | shallow | fa | dfa | ll-bp | ll-fa | ep-loopback | ep-symmetric | bp-surrogate | sp-surrogate | sp-voltage"}),
    ("--lr", "rule", "lr", {"help": "Adam learning rate (default 5e-4)"}),
    ("--weight-decay", "rule", "weight_decay", {}),
    ("--signal", "rule", "signal", {"help": "target generator: label | label-input | loop-pred | loop-error"}),
    ("--head", "rule", "head", {"help": "target (Fig. 2a) | classifier (Fig. 2b)"}),
    ("--loss", "rule", "loss", {"help": "L_pred comparison: dot | l2"}),
    ("--logit-scale", "rule", "logit_scale", {"help": "L_pred logit scale (default c/sqrt(d): dot c=4, l2 c=2; per-sample signals c=1, 0.5)"}),
    ("--bn-stats", "rule", "bn_stats", {"help": "BatchNorm statistics from: inputs | all"}),
    ("--target-dropout", "rule", "target_dropout", {"help": "sigprop with dropout: off (default: only the inputs are dropped; targets pass undropped) | on (target rows dropped too, each with its own mask, as the official code)"}),
    ("--eta", "rule", "eta", {"help": "error step of the loop-error signal (Eq. 12)"}),
    ("--ll-beta", "rule", "ll_beta", {"help": "ll-bp / ll-fa: the similarity share of the predsim loss (default 0.99 / 0.01)"}),
    ("--ll-features", "rule", "ll_features", {"help": "ll-bp / ll-fa: the most values an auxiliary classifier reads (default 2048)"}),
    ("--loopback", "rule", "loopback", {"help": "ep-loopback: learned | fixed loop-back weights"}),
    ("--ep-free-steps", "rule", "ep_free_steps", {"help": "EP: Euler steps of the free phase (default: ep-loopback 20; ep-symmetric 60, 150 or 500 for 1, 2 or 3 hidden layers)"}),
    ("--ep-nudge-steps", "rule", "ep_nudge_steps", {"help": "EP: Euler steps of the nudged phase (default: ep-loopback 8; ep-symmetric 4, 6 or 8 by depth)"}),
    ("--ep-dt", "rule", "ep_dt", {"help": "EP: the Euler step (default 0.5)"}),
    ("--ep-beta", "rule", "ep_beta", {"help": "EP: the nudge (default: ep-loopback 2; ep-symmetric 0.5, or 1 with 2+ hidden layers)"}),
    ("--ep-beta-sign", "rule", "ep_beta_sign", {"help": "EP: auto | positive | random (per batch)"}),
    ("--ep-lrs", "rule", "ep_lrs", {"help": "EP: learning rates per matrix, input's first, e.g. 0.1,0.05"}),
    ("--ep-tol", "rule", "ep_tol", {"help": "EP: end the free phase once every residual is below this (0: never)"}),
    ("--targets", "rule", "targets", {"help": "dense (block 1's output target, Eq. 1) | sparse (Sec. III-E: a small target for block 1's input; label signal)"}),
    ("--sparse-size", "rule", "sparse_size", {"metavar": "K", "help": "values of a sparse target for an fc first block, zero-filled to its input (default: half the input)"}),
    ("--sparse-grid", "rule", "sparse_grid", {"metavar": "G", "help": "a conv first block's sparse target: a G x G grid of kernel windows, fields of G x G cells after it (default 1: the paper's one window)"}),
    ("--fast-path", "rule", "fast_path", {"help": "sigprop step of standard fc blocks without autograd (every built-in signal): auto | on (error if it cannot) | off"}),
    ("--pipeline", "rule", "pipeline", {"help": "sigprop with the fast path on a CPU: each block's BatchNorm backward, weight gradient and Adam step on a second thread while the forward goes on (same updates): auto (>= 2 threads) | on | off"}),
    ("--exit-targets", "rule", "exit_targets", {"help": "early exits of per-sample signals: prototypes (running class means of training targets) | candidates (every class's target per sample)"}),
    ("--spike-threshold", "rule", "spike_threshold", {"help": "spiking networks: the IF neurons' threshold (default: 0.5 for sp-surrogate / sp-voltage, 1.0 otherwise, Sec. VI)"}),
    ("--amp", "rule", "amp", {"help": "16-bit mixed precision (bf16 autocast on a CPU, fp16 + GradScaler on CUDA): auto (on for spiking networks) | on | off"}),
    ("--epochs", "train", "epochs", {}),
    ("--schedule", "train", "schedule", {"help": "step | cosine | none"}),
    ("--seed", "train", "seed", {}),
    ("--device", "train", "device", {"help": "cpu | cuda | cuda:N"}),
    ("--run-dir", "train", "run_dir", {"help": "run folder (default runs/<dataset>-<network>-<rule>-<time>)"}),
    ("--check-every", "train", "check_every", {"help": "steps between NaN checks"}),
    ("--stages", "train", "stages", {"metavar": "S", "help": "sigprop: split the blocks into S stages, one process each, learning concurrently (torch.distributed; balanced by counted cost)"}),
    ("--split", "train", "split", {"metavar": "K,K,...", "help": "blocks per stage, first stage first (e.g. 2,1); sets the stages by hand"}),
    ("--stage-threads", "train", "stage_threads", {"metavar": "N", "help": "intra-op threads of each stage process (default: the machine's cores / its processes)"}),
    ("--replicas", "train", "replicas", {"metavar": "R", "help": "sigprop: R data-parallel replicas of every stage (S x R processes): each batch is shared out among them and each stage's gradients are all-reduced before its update"}),
]

# boolean keys set by a flag without a value: (flag, section, key, the value it sets)
SWITCH_FLAGS: list[tuple[str, str, str, bool]] = [
    ("--signal-fixed", "rule", "signal_learned", False),
    ("--no-progress", "train", "progress", False),
]


def train_command(cfg: Config, always: tuple[str, ...] = ()) -> str:
    """The `sigprop train` command line that runs ``cfg``: a flag for every value that
    differs from the defaults, and for the ``always`` keys (``"section.key"``)."""
    base, now = Config().to_dict(), cfg.to_dict()
    words = ["sigprop", "train"]
    for flag, section, key, _ in TRAIN_FLAGS:
        value = now[section][key]
        if value is not None and (value != base[section][key] or f"{section}.{key}" in always):
            words += [flag, str(value)]
    for flag, section, key, value in SWITCH_FLAGS:
        if now[section][key] == value:
            words.append(flag)
    return shlex.join(words)


# What ``--resume`` may change: where and how the run computes, never what it computes.
# Everything else is the run's identity; changing it needs a new run folder.
RESUMABLE = (
    "train.epochs",  # a longer run: the schedule follows the new total from the next epoch
    "train.device", "train.progress", "train.check_every", "train.run_dir",
    "data.data_dir",  # the same files elsewhere (their checksums are compared)
    "data.eval_batch_size",  # evaluation is per sample
    "rule.fast_path", "rule.pipeline",  # the same updates, up to rounding
    # where the blocks run: the same updates (sigprop.parallel)
    "train.stages", "train.split", "train.stage_threads",
)


def config_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old, new)}`` for every value that differs."""
    a, b = old.to_dict(), new.to_dict()
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}


def resume_changes(recorded: Config, requested: Config, epochs_done: int
                   ) -> dict[str, tuple[Any, Any]]:
    """The changes a resume makes to a run that finished ``epochs_done`` epochs; a
    ConfigError if any of them is not one resume may make (:data:`RESUMABLE`)."""
    changes = config_changes(recorded, requested)
    fixed = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if fixed:
        listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in fixed.items())
        raise ConfigError(
            f"--resume continues a run as it was configured, but these settings differ from "
            f"the run's: {listed}; drop them, or start a new run in another --run-dir "
            f"(resume may change only {', '.join(RESUMABLE)})")
    if requested.train.epochs < epochs_done:
        raise ConfigError(
            f"train.epochs {requested.train.epochs} is fewer than the {epochs_done} epochs this "
            f"run has trained; resume can only extend a run (evaluate it with `sigprop eval`)")
    return changes
