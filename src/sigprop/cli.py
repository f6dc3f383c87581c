"""The ``sigprop`` command: train, eval, data.

Every user error (a SigpropError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, SigpropError

# flag -> (section, key); argparse stores under "section.key" and only what was given.
TRAIN_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--dataset", "data", "dataset", {"help": "dataset name (sigprop data list)"}),
    ("--data-dir", "data", "data_dir", {"help": "folder holding the dataset files"}),
    ("--train-limit", "data", "train_limit", {"metavar": "N", "help": "use the first N training samples"}),
    ("--augment", "data", "augment", {"help": "auto | none | crop | flip | crop+flip"}),
    ("--batch-size", "data", "batch_size", {}),
    ("--eval-batch-size", "data", "eval_batch_size", {}),
    ("--network", "model", "network", {"help": "e.g. fc-3x1000, fc-2x800"}),
    ("--dropout", "model", "dropout", {}),
    ("--rule", "rule", "name", {"help": "sigprop | backprop | shallow"}),
    ("--lr", "rule", "lr", {"help": "Adam learning rate (default 5e-4)"}),
    ("--weight-decay", "rule", "weight_decay", {}),
    ("--signal", "rule", "signal", {"help": "target generator: label | label-input | loop-pred | loop-error"}),
    ("--head", "rule", "head", {"help": "target (Fig. 2a) | classifier (Fig. 2b)"}),
    ("--loss", "rule", "loss", {"help": "L_pred comparison: dot | l2"}),
    ("--logit-scale", "rule", "logit_scale", {"help": "L_pred logit scale (default c/sqrt(d): dot c=4, l2 c=2; per-sample signals c=1, 0.5)"}),
    ("--bn-stats", "rule", "bn_stats", {"help": "BatchNorm statistics from: inputs | all"}),
    ("--eta", "rule", "eta", {"help": "error step of the loop-error signal (Eq. 12)"}),
    ("--fast-path", "rule", "fast_path", {"help": "sigprop step of standard fc blocks without autograd (every built-in signal): auto | on (error if it cannot) | off"}),
    ("--pipeline", "rule", "pipeline", {"help": "sigprop with the fast path on a CPU: each block's BatchNorm backward, weight gradient and Adam step on a second thread while the forward goes on (same updates): auto (>= 2 threads) | on | off"}),
    ("--exit-targets", "rule", "exit_targets", {"help": "early exits of per-sample signals: prototypes (running class means of training targets) | candidates (every class's target per sample)"}),
    ("--epochs", "train", "epochs", {}),
    ("--schedule", "train", "schedule", {"help": "step | cosine | none"}),
    ("--seed", "train", "seed", {}),
    ("--device", "train", "device", {"help": "cpu | cuda | cuda:N"}),
    ("--run-dir", "train", "run_dir", {"help": "run folder (default runs/<dataset>-<network>-<rule>-<time>)"}),
    ("--check-every", "train", "check_every", {"help": "steps between NaN checks"}),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sigprop", description="Signal propagation: learning in a forward pass.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a network", argument_default=argparse.SUPPRESS)
    t.add_argument("--config", metavar="FILE.toml", help="TOML file of [data]/[model]/[rule]/[train]")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    for flag, section, key, kw in TRAIN_FLAGS:
        t.add_argument(flag, dest=f"{section}.{key}", **kw)
    t.add_argument("--signal-fixed", dest="rule.signal_learned", action="store_const", const=False,
                   help="keep the target generator fixed (random projection)")
    t.add_argument("--no-progress", dest="train.progress", action="store_const", const=False,
                   help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint on the test set")
    e.add_argument("path", help="run folder or checkpoint.pt")
    e.add_argument("--data-dir")
    e.add_argument("--device")

    d = sub.add_parser("data", help="list, check or download datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dsub.add_parser("list", help="known datasets and where they were found")
    c = dsub.add_parser("check", help="look for a dataset's files and load them")
    c.add_argument("name")
    c.add_argument("--data-dir")
    dl = dsub.add_parser("download", help="download a dataset (checksums verified)")
    dl.add_argument("name")
    dl.add_argument("--dest", help="destination folder (default: the user cache)")
    dl.add_argument("--include-optional", action="store_true", help="also optional files (SVHN extra)")
    dl.add_argument("--stall-timeout", type=_seconds, default=30.0, metavar="S",
                    help="give up when no byte arrives for S seconds (default 30)")
    dl.add_argument("--deadline", type=_seconds, default=3600.0, metavar="S",
                    help="give up when the whole download takes over S seconds (default 3600)")
    return p


def _overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = value
    return out


def cmd_train(ns: argparse.Namespace) -> int:
    from .engine.config import Config, apply_overrides, load_toml
    from .engine.perf import tune_allocator
    from .engine.trainer import Trainer

    tune_allocator()
    overrides = _overrides(ns)
    resume = getattr(ns, "resume", False)
    run_dir = overrides.get("train", {}).get("run_dir")
    if resume and not run_dir:
        raise ConfigError("--resume needs --run-dir: the folder of the run to continue")
    # resume: the run's own settings, then the file's and the flags' (checked against
    # what resume may change when the checkpoint is read)
    cfg = _recorded_config(Path(run_dir)) if resume else None
    cfg = cfg or Config()
    if hasattr(ns, "config"):
        cfg = apply_overrides(cfg, load_toml(ns.config))
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    if cfg.train.run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = apply_overrides(cfg, {"train": {"run_dir": str(
            Path("runs") / f"{cfg.data.dataset}-{cfg.model.network}-{cfg.rule.name}-{stamp}")}})
    trainer = Trainer(cfg, Path(cfg.train.run_dir), resume=resume)
    try:
        history = trainer.run()
    except KeyboardInterrupt as stop:
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        again = (f"after epoch {trainer.epochs_done}; continue with" if trainer.epochs_done
                 else "before the first epoch ended; start it again with")
        print(f"sigprop: {what} {again}: sigprop train --resume --run-dir "
              f"{shlex.quote(cfg.train.run_dir)}", file=sys.stderr)
        return stop.code if isinstance(stop, Terminated) else 130
    last = history[-1]
    print(f"run folder: {cfg.train.run_dir}")
    for name, acc in last["test_acc_exits"].items():
        print(f"  exit {name:<8} test accuracy {acc:.4f}")
    print(f"test accuracy: {last['test_acc']:.4f} (error {100 * last['test_error']:.2f}%)")
    return 0


def _recorded_config(run_dir: Path):
    """The configuration of the run in ``run_dir`` (config.json, else the checkpoint's),
    or None when the folder holds no run yet."""
    from .engine.runio import CHECKPOINT, CONFIG, load_checkpoint, read_run_config, recorded_config

    try:
        if (run_dir / CONFIG).exists():
            path, config = run_dir / CONFIG, read_run_config(run_dir / CONFIG)["config"]
        elif (run_dir / CHECKPOINT).exists():
            path, config = run_dir / CHECKPOINT, load_checkpoint(run_dir / CHECKPOINT)["config"]
        else:
            return None
    except OSError as err:  # a name too long to look up, ...
        raise CheckpointError(f"cannot read run folder {run_dir} ({err.strerror or err})") from None
    return recorded_config(config, path)


def cmd_eval(ns: argparse.Namespace) -> int:
    from .engine.config import apply_overrides
    from .engine.runio import CHECKPOINT, load_checkpoint, recorded_config
    from .engine.trainer import build_experiment, evaluate

    if not ns.path.strip():
        raise ConfigError("the run folder or checkpoint to evaluate is empty; give its path")
    path = Path(ns.path)
    try:
        ckpt = path / CHECKPOINT if path.is_dir() else path
        found = ckpt.is_file()
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
    if not found:
        raise CheckpointError(f"no checkpoint at {ckpt}; give a run folder or a checkpoint.pt")
    state = load_checkpoint(ckpt, "cpu")
    cfg = recorded_config(state["config"], ckpt)
    over: dict[str, dict[str, Any]] = {"train": {"progress": False}}
    if ns.device:
        over["train"]["device"] = ns.device
    if ns.data_dir:
        over["data"] = {"data_dir": ns.data_dir}
    cfg = apply_overrides(cfg, over)
    exp = build_experiment(cfg, with_train=False)
    exp.rule.load_state_dict(state["rule"])
    acc = evaluate(exp.rule, exp.test)
    print(f"checkpoint: {ckpt} (epoch {state['epoch']}, rule {cfg.rule.name}, {cfg.model.network})")
    for name, a in acc.items():
        print(f"  exit {name:<8} test accuracy {a:.4f}")
    final = acc[exp.rule.exit_names[-1]]
    print(f"test accuracy: {final:.4f} (error {100 * (1 - final):.2f}%)")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from .data import check_dataset, download_dataset, find_dataset_dir
    from .registry import DATASETS

    if ns.data_command == "list":
        for name in DATASETS.names():
            try:
                where = str(find_dataset_dir(name))
            except SigpropError:
                where = "not found (sigprop data download " + name + ")"
            print(f"{name:<14} {where}")
        return 0
    if ns.data_command == "check":
        report = check_dataset(ns.name, ns.data_dir)
        print(report.summary())
        return 0 if report.ok else 1
    try:
        path = download_dataset(ns.name, ns.dest, include_optional=ns.include_optional,
                                stall_timeout=ns.stall_timeout, deadline=ns.deadline)
    except KeyboardInterrupt as stop:
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"sigprop: {what}; the partial download was removed (files already verified "
              f"stay); run `sigprop data download {ns.name}` again to finish", file=sys.stderr)
        return stop.code if isinstance(stop, Terminated) else 130
    print(f"{ns.name}: files in {path}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every cleanup (partial downloads,
    temporary checkpoint files, the run folder's lock) runs as on Ctrl-C."""

    code = 128 + signal.SIGTERM


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        ns = _parser().parse_args(argv)
        import sigprop.rules  # noqa: F401  (register rules)

        return {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}[ns.command](ns)
    except SigpropError as err:
        print(f"sigprop: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f"sigprop: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}",
              file=sys.stderr)
        return stop.code if isinstance(stop, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line(err: Exception) -> str:
    """The message on one line, however the cause (a path, an OS message) was written."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
