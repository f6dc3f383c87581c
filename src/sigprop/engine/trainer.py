"""The training loop: data -> rule steps -> evaluation -> metrics and checkpoint.

The hot loop keeps per-step numbers on the device; it syncs with the host once
every ``check_every`` steps (non-finite-loss check and progress bar) and once per
epoch. A checkpoint is written atomically after every epoch; a resumed run
replays exactly: the loader's draws depend only on (seed, epoch), and the global
RNG state (dropout) is restored from the checkpoint. :func:`load_trained` rebuilds a
trained run for evaluation.
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data import DeviceLoader, dataset_spec, load_dataset, parse_augment
from ..errors import CheckpointError, ConfigError, DataError, StorageError, TrainingError
from ..networks import build_network
from ..registry import RULES
from ..resources import check_fits, format_bytes
from ..rules import LearningRule, build_rule
from . import batchmemory, runio
from .config import Config, apply_overrides
from .layout import FORMATS, apply_layout, resolve_layout
from .runfolder import RunFolder
from .runstate import STAGES_FILE, RunStart, load_run_state

STEP_MILESTONES = (0.50, 0.75, 0.89, 0.94)  # Sec. IV: lr x0.25 at these fractions
STEP_FACTOR = 0.25
STEP10_MILESTONES = (0.60, 0.90)  # step10: lr x0.1 here (PEPITA's epochs 60 and 90 of 100)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate during ``epoch`` (0-based)."""
    if schedule == "step":
        # the epoch nearest each fraction, never the first (a 1-epoch run keeps its lr)
        passed = sum(epoch >= max(1, round(f * epochs)) for f in STEP_MILESTONES)
        return STEP_FACTOR**passed
    if schedule == "step10":
        return 0.1 ** sum(epoch >= max(1, round(f * epochs)) for f in STEP10_MILESTONES)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 1.0


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asked for, but this machine has no usable CUDA GPU; "
            "pass --device cpu (a checkpoint made on a GPU loads on the CPU)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use cpu or cuda")
    return device


@dataclass
class Experiment:
    """Everything built from a config: the rule and both loaders."""

    rule: LearningRule
    train: DeviceLoader
    test: DeviceLoader
    device: torch.device
    eval_batch: batchmemory.EvalBatch  # the evaluation batch and why (measured)
    layout: tuple[str, str] = ("nchw", "")  # the conv maps' memory layout and why


def build_config_rule(cfg: Config, device: torch.device, *, sequential: bool = False
                      ) -> LearningRule:
    """The rule of ``cfg``, initialised from its seed (every stage of a staged run builds
    the same one); with ``sequential``, one that updates on the calling thread only (no
    update thread: sigprop's ``pipeline`` off), for the memory probe. Its conv weights
    are laid out as ``train.layout`` resolves (:mod:`.layout`)."""
    spec = dataset_spec(cfg.data.dataset)
    torch.manual_seed(cfg.train.seed)  # model init
    network = build_network(cfg.model.network, spec.shape, spec.num_classes, cfg.model.dropout)
    apply_layout(network, resolve_layout(cfg.train.layout, network, cfg.model.network,
                                         cfg.rule.name, device)[0])
    rule_cfg = cfg.rule
    if sequential and any(o.name == "pipeline" for o in RULES.get(cfg.rule.name).options):
        rule_cfg = rule_cfg.replace(pipeline="off")
    return build_rule(cfg.rule.name, network, spec.num_classes, rule_cfg).to(device)


def build_experiment(cfg: Config, *, with_train: bool = True) -> Experiment:
    cfg.validate()
    device = resolve_device(cfg.train.device)
    spec = dataset_spec(cfg.data.dataset)
    rule = build_config_rule(cfg, device)
    network = rule.network
    layout = resolve_layout(cfg.train.layout, network, cfg.model.network, cfg.rule.name,
                            device)
    memory_format = FORMATS[layout[0]]
    augment = parse_augment(cfg.data.augment, spec)
    mean, std = input_scaling(cfg.data.inputs, spec)
    if with_train:
        images, labels = load_dataset(spec.name, cfg.data.train_split, cfg.data.data_dir)
        if cfg.data.train_limit is not None:
            images, labels = images[: cfg.data.train_limit], labels[: cfg.data.train_limit]
    else:  # evaluation only: an empty training set
        images = torch.zeros(0, *spec.shape, dtype=torch.uint8)
        labels = torch.zeros(0, dtype=torch.int64)
    if with_train and len(labels) < 2:
        raise ConfigError(f"training needs at least 2 samples, got {len(labels)} (--train-limit)")
    # BatchNorm cannot train on one sample: a last batch of exactly one is dropped (a
    # different sample each epoch, since the order is shuffled).
    drop_last = len(labels) % cfg.data.batch_size == 1
    if with_train:
        batch = min(cfg.data.batch_size, len(labels))
        _check_batch_fits(cfg, network, spec.num_classes, batch, augment, device)
    train = DeviceLoader(
        images, labels, batch_size=cfg.data.batch_size, mean=mean, std=std,
        device=device, shuffle=True, augment=augment, seed=cfg.train.seed, drop_last=drop_last,
        num_classes=spec.num_classes, memory_format=memory_format,
    ) if len(labels) else None
    t_images, t_labels = load_dataset(spec.name, "test", cfg.data.data_dir)
    if cfg.data.test_limit is not None:
        t_images, t_labels = t_images[: cfg.data.test_limit], t_labels[: cfg.data.test_limit]
    eval_batch = batchmemory.choose(rule, network.input_shape, cfg.data.eval_batch_size,
                                 len(t_labels), device)
    test = DeviceLoader(
        t_images, t_labels, batch_size=eval_batch.size, mean=mean, std=std,
        device=device, shuffle=False, num_classes=spec.num_classes, memory_format=memory_format,
    )
    return Experiment(rule, train, test, device, eval_batch, layout)


def rule_defaults_line(cfg: Config) -> str:
    """What the run's rule chose for the engine, and what of it is in effect ('' when
    it chooses nothing)."""
    chosen = RULES.get(cfg.rule.name).engine_defaults
    if not chosen:
        return ""
    now = cfg.to_dict()
    parts = []
    for key, value in chosen.items():
        section, _, name = key.partition(".")
        actual = now[section][name]
        parts.append(f"{key} {actual}" + ("" if actual == value else f" (the rule's: {value})"))
    return f"{cfg.rule.name} settings: " + ", ".join(parts)


def input_scaling(inputs: str, spec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the loader normalises pixels in [0, 1] with: the dataset's (standard),
    or none (unit: the network sees [0, 1])."""
    if inputs == "unit":
        channels = len(spec.mean)
        return (0.0,) * channels, (1.0,) * channels
    return tuple(spec.mean), tuple(spec.std)


def _recorded(run_dir: Path) -> dict[str, Any]:
    """The run folder's config.json, or {} where it has none or cannot be read."""
    try:
        record = runio.read_run_config(run_dir / runio.CONFIG)
    except (OSError, ValueError, CheckpointError, DataError, StorageError, ConfigError):
        return {}
    return record if isinstance(record, dict) else {}


def _check_batch_fits(cfg: Config, network, num_classes: int, batch: int, augment,
                      device: torch.device) -> None:
    """Refuse a training batch whose step cannot fit, before any is run: its memory
    measured on a fresh copy of the rule (:func:`.batchmemory.measure_train`)."""
    shape = network.input_shape
    pad = 2 * augment.crop_padding
    # crop pads (C, H, W) images as uint8, plus its index arithmetic (int64 per row/col)
    padded = shape[0] * (shape[1] + pad) * (shape[2] + pad) if len(shape) == 3 else 0
    per, fixed = batchmemory.measure_train(
        lambda: build_config_rule(cfg, device, sequential=True), shape, num_classes, device)
    check_fits(fixed + batch * (per + padded * 2),
               f"a training batch of {batch} samples through this network "
               f"({format_bytes(per)} a sample, measured) would",
               "lower --batch-size (or choose a smaller --network)", device)


def evaluate(rule: LearningRule, loader: DeviceLoader) -> dict[str, float]:
    """Accuracy of every exit of ``rule`` over ``loader`` (one host sync)."""
    rule.set_training(False)
    correct = None
    for x, y in loader.epoch(0):
        c = rule.eval_step(x, y)
        correct = c if correct is None else correct + c
    if correct is None:
        raise DataError("the evaluation set holds no samples; nothing to evaluate on")
    acc = (correct.double() / loader.num_samples).tolist()
    return dict(zip(rule.exit_names, acc))


def set_epoch_lr(rule: LearningRule, cfg: Config, epoch: int) -> float:
    """Set every optimizer group's learning rate for ``epoch`` (a rule's own per-group
    rate, else the run's, times the schedule); the run's rate of the epoch."""
    factor = lr_factor(cfg.train.schedule, epoch, cfg.train.epochs)
    for opt in rule.optimizers:
        for group in opt.param_groups:
            group["lr"] = group.get("base_lr", cfg.rule.lr) * factor
    return cfg.rule.lr * factor


def check_finite(window: torch.Tensor, names: list[str], epoch: int, step: int) -> None:
    """Raise naming the first (step, exit) whose loss in ``window`` (the losses of the
    steps up to ``step``, one column per exit of ``names``) is NaN or infinite."""
    bad = ~torch.isfinite(window)
    if not bool(bad.any()):
        return
    row, col = (int(i) for i in bad.nonzero()[0])
    first = step - (window.shape[0] - 1) + row
    value = float(window[row, col])
    raise TrainingError(
        f"loss of {names[col]} became {value} at epoch {epoch + 1}, step "
        f"{first + 1}; lower the learning rate (--lr) or check the input data"
    )


def epoch_record(rule: LearningRule, epoch: int, lr: float, train_loss: list[float],
                 train_acc: list[float], test_acc: list[float], elapsed: float,
                 seen: int) -> dict[str, Any]:
    """One epoch's metrics record (every exit, in ``rule.exit_names`` order)."""
    names = rule.exit_names
    return {
        **rule.epoch_metrics(),
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": train_loss[-1],
        "train_acc": train_acc[-1],
        "test_acc": test_acc[-1],
        "test_error": 1.0 - test_acc[-1],
        "train_loss_exits": dict(zip(names, train_loss)),
        "train_acc_exits": dict(zip(names, train_acc)),
        "test_acc_exits": dict(zip(names, test_acc)),
        "epoch_time_s": elapsed,
        "samples_per_s": seen / elapsed,
    }


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    exits = "  ".join(f"{k} {v:.4f}" for k, v in record["test_acc_exits"].items())
    return (f"epoch {record['epoch']}/{epochs}  train_loss {record['train_loss']:.4f}  "
            f"test_acc {record['test_acc']:.4f}  [{exits}]  "
            f"{record['samples_per_s']:.0f} samples/s")


class Trainer:
    """Runs one training into a run folder, which it holds locked (:mod:`.runfolder`).

    ``run_dir`` is a path, or a :class:`RunFolder` the caller already acquired. With
    ``resume``, the run continues from the folder's checkpoint; ``cfg`` may differ from
    the run's configuration only where :func:`.resumable.resumable` allows.
    """

    def __init__(self, cfg: Config, run_dir: Path | RunFolder, *, resume: bool = False,
                 out=None) -> None:
        self.cfg = cfg
        self.folder = run_dir if isinstance(run_dir, RunFolder) else None
        self.run_dir = Path(run_dir.path if isinstance(run_dir, RunFolder) else run_dir)
        self.resume = resume
        self.out = out  # None: whatever sys.stdout is when a line is printed
        self.epochs_done = 0  # checkpointed epochs, for an interrupted run's message
        self._start_epoch = 0  # the checkpoint's epoch this session started from
        self._recorded_config: bytes | None = None
        self._found: set[str] = set()  # run files the folder held before this session
        self._wrote_config = False

    def _log(self, msg: str) -> None:
        print(msg, file=self.out or sys.stdout, flush=True)

    def run(self) -> list[dict[str, Any]]:
        self.cfg.validate()  # bad values stop before the folder is touched
        folder = self.folder or RunFolder.acquire(self.run_dir)
        config_path = self.run_dir / runio.CONFIG
        self._recorded_config = config_path.read_bytes() if config_path.is_file() else None
        self._found = {n for n in runio.RUN_FILES if (self.run_dir / n).exists()}
        self._wrote_config = False
        try:
            return self._run(folder)
        except StorageError as err:  # a full disk, a folder made read-only, ...
            raise StorageError(f"{err}; {self._kept(folder)}") from None
        except KeyboardInterrupt:  # the message offers --resume: the folder stays
            folder.discard_if_unused()
            raise
        except BaseException:
            self._undo(folder)
            raise
        finally:
            if self.folder is None:
                folder.release()

    def _undo(self, folder: RunFolder) -> None:
        """A run that failed (a NaN loss, bad data, a bug) before this session saved a
        checkpoint leaves the folder as it found it: a fresh run's files removed (and the
        folder if it made it), a resumed run's config.json as recorded before."""
        if not self._wrote_config or self.epochs_done > self._start_epoch:
            folder.discard_if_unused()
            return
        try:
            if self._recorded_config is None:  # only what this session wrote goes
                folder.discard(tuple(n for n in runio.RUN_FILES if n not in self._found))
            else:
                runio.atomic_write_bytes(self.run_dir / runio.CONFIG, self._recorded_config)
        except OSError:
            pass  # the folder cannot be changed now: the error at hand is the one to report

    def _kept(self, folder: RunFolder) -> str:
        """What a run stopped by a failed write keeps, and how to go on: its newest
        checkpoint; a fresh run without one leaves nothing (its files are removed)."""
        again = f"sigprop train --resume --run-dir {shlex.quote(str(self.run_dir))}"
        if self.epochs_done:
            return (f"the checkpoint after epoch {self.epochs_done} is intact; make room (or "
                    f"fix the folder's permissions), then continue with: {again}")
        if not self.resume:
            folder.discard(runio.RUN_FILES)
            return ("nothing of this run was kept (its files were removed); make room or "
                    "choose another --run-dir, then start it again")
        return f"no epoch was kept; make room, then start it again with: {again}"

    def _run(self, folder: RunFolder) -> list[dict[str, Any]]:
        cfg = self.cfg
        # the newest checkpoint, this one's or a staged run's (sigprop.parallel) merged;
        # what this resume changes is settled before any data is read
        start = RunStart(self.run_dir, cfg, self.resume)
        self.epochs_done = start.epoch  # the checkpoint it continues from is kept
        exp = build_experiment(cfg)
        rule = exp.rule
        state = start.state
        if state is not None:
            rule.load_state_dict(state["rule"])
            torch.set_rng_state(state["rng"].cpu())
            if exp.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), exp.device)
        # what the run chose on this machine (16-bit or not), in its log and config.json;
        # a resumed run keeps what it started with
        kept = state is not None and rule.keep_precision(
            _recorded(self.run_dir).get("precision"), exp.device)
        precision = rule.precision(exp.device)
        self._start_epoch = start.epoch
        history = start.prepare(self._log, {"precision": precision, "layout": exp.layout[0],
                                            "eval_batch": exp.eval_batch.record()})
        self._wrote_config = True  # (from here on: write() may have written part of it)
        start.write()
        if state is not None:
            said = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in start.changes.items())
            self._log(f"resuming {self.run_dir} after epoch {start.epoch}"
                      + (f" (changed: {said})" if said else ""))
        if hasattr(rule, "step_kind"):
            self._log(f"{cfg.rule.name} step: {rule.step_kind}")
        said = rule_defaults_line(cfg)
        if said:
            self._log(said)
        self._log(f"precision: {precision}" + (" (kept from the run's start)" if kept else ""))
        if exp.layout[1] != "auto: no conv layer":
            self._log(f"layout: {exp.layout[0]} ({exp.layout[1]})")
        self._log(exp.eval_batch.line())
        if start.epoch == 0:
            torch.manual_seed(cfg.train.seed + 1)  # dropout stream, apart from the init stream
        ckpt_path = self.run_dir / runio.CHECKPOINT
        for epoch in range(start.epoch, cfg.train.epochs):
            record = self._epoch(exp, epoch)
            history.append(record)
            runio.save_checkpoint(ckpt_path, {
                "epoch": epoch + 1, "config": cfg.to_dict(), "rule": rule.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(exp.device) if exp.device.type == "cuda" else None,
                "history": history,
            })
            self.epochs_done = epoch + 1
            runio.write_metrics(self.run_dir, history)
            self._log(epoch_line(record, cfg.train.epochs))
            for text in rule.warnings(record):
                print(f"sigprop: warning: epoch {epoch + 1}: {text}", file=sys.stderr,
                      flush=True)
        return history

    def _epoch(self, exp: Experiment, epoch: int) -> dict[str, Any]:
        cfg, rule, loader = self.cfg, exp.rule, exp.train
        lr = set_epoch_lr(rule, cfg, epoch)
        k = len(rule.exit_names)
        every = cfg.train.check_every
        loss_sum = torch.zeros(k, device=exp.device, dtype=torch.float64)
        correct_sum = torch.zeros(k, device=exp.device, dtype=torch.int64)
        # recent losses, for the check; an epoch ends with a check, so no longer than one
        window = torch.zeros(min(every, len(loader)), k, device=exp.device)
        seen = 0
        rule.set_training(True)
        start = time.perf_counter()
        # a context: the bar is cleared on an error too, so the error gets its own line
        with tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="batch",
                  disable=not cfg.train.progress, leave=False, file=sys.stderr) as bar:
            for step, (x, y, *index) in enumerate(
                    loader.epoch(epoch, with_index=rule.uses_sample_index)):
                losses, correct = rule.train_step(x, y, *index)
                window[step % every] = losses
                loss_sum += losses * x.shape[0]
                correct_sum += correct
                seen += x.shape[0]
                last = step + 1 == len(loader)
                if (step + 1) % every == 0 or last:
                    check_finite(window[: step % every + 1], rule.exit_names, epoch, step)
                    bar.update(step % every + 1)
                    bar.set_postfix(loss=f"{float(loss_sum[-1]) / seen:.4f}",
                                    acc=f"{int(correct_sum[-1]) / seen:.4f}")
            rule.sync()  # updates still in flight (sigprop's pipeline) belong to this epoch
        elapsed = time.perf_counter() - start
        test_acc = evaluate(rule, exp.test)
        return epoch_record(rule, epoch, lr, (loss_sum / seen).tolist(),
                            (correct_sum.double() / seen).tolist(),
                            [test_acc[k] for k in rule.exit_names], elapsed, seen)



def load_trained(path_text: str, device: str | None = None, data_dir: str | None = None
                 ) -> tuple[Experiment, Config, dict, Path]:
    """(experiment with the trained rule loaded, its config, the checkpoint state, the
    file it came from) of a run folder (its newest checkpoint; a staged run's parts
    merged into one rule) or a checkpoint file; built for evaluation only (no training
    set). ``sigprop eval`` and scripts that inspect a trained run share it."""
    if not path_text.strip():
        raise ConfigError("the run folder or checkpoint to evaluate is empty; give its path")
    path = Path(path_text)
    try:
        ckpt = path / runio.CHECKPOINT if path.is_dir() else path
        staged = path.is_dir() and (path / STAGES_FILE).is_file()
        found = ckpt.is_file() or staged
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
    if not found:
        raise CheckpointError(f"no checkpoint at {ckpt}; give a run folder or a checkpoint.pt")
    # a run folder: its newest checkpoint (a staged run's parts merged into one rule)
    state = load_run_state(path) if path.is_dir() else runio.load_checkpoint(ckpt, "cpu")
    if path.is_dir() and staged and state is not None and "split" in state:
        ckpt = path / STAGES_FILE
    cfg = runio.recorded_config(state["config"], ckpt)
    over: dict[str, dict[str, Any]] = {"train": {"progress": False}}
    if device:
        over["train"]["device"] = device
    if data_dir:
        over["data"] = {"data_dir": data_dir}
    cfg = apply_overrides(cfg, over)
    exp = build_experiment(cfg, with_train=False)
    exp.rule.load_state_dict(state["rule"])
    return exp, cfg, state, ckpt
