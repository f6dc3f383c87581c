"""The ``sigprop`` command: train, eval, data.

Every user error (a SigpropError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
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
    return p


def _overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = value
    return out


def cmd_train(ns: argparse.Namespace) -> int:
    from .engine.config import Config, apply_overrides, config_from_dict, load_toml
    from .engine.perf import tune_allocator
    from .engine.runio import CONFIG, read_json
    from .engine.trainer import Trainer

    tune_allocator()
    overrides = _overrides(ns)
    resume = getattr(ns, "resume", False)
    run_dir = overrides.get("train", {}).get("run_dir")
    if resume and not run_dir:
        raise ConfigError("--resume needs --run-dir: the folder of the run to continue")
    if resume and (Path(run_dir) / CONFIG).exists():
        cfg = config_from_dict(read_json(Path(run_dir) / CONFIG)["config"])
    else:
        cfg = Config()
        if hasattr(ns, "config"):
            cfg = apply_overrides(cfg, load_toml(ns.config))
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    if cfg.train.run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = apply_overrides(cfg, {"train": {"run_dir": str(
            Path("runs") / f"{cfg.data.dataset}-{cfg.model.network}-{cfg.rule.name}-{stamp}")}})
    history = Trainer(cfg, Path(cfg.train.run_dir), resume=resume).run()
    last = history[-1]
    print(f"run folder: {cfg.train.run_dir}")
    for name, acc in last["test_acc_exits"].items():
        print(f"  exit {name:<8} test accuracy {acc:.4f}")
    print(f"test accuracy: {last['test_acc']:.4f} (error {100 * last['test_error']:.2f}%)")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from .engine.config import apply_overrides, config_from_dict
    from .engine.runio import CHECKPOINT, load_checkpoint
    from .engine.trainer import build_experiment, evaluate

    path = Path(ns.path)
    ckpt = path / CHECKPOINT if path.is_dir() else path
    if not ckpt.exists():
        raise CheckpointError(f"no checkpoint at {ckpt}; give a run folder or a checkpoint.pt")
    state = load_checkpoint(ckpt, "cpu")
    cfg = config_from_dict(state["config"])
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
    path = download_dataset(ns.name, ns.dest, include_optional=ns.include_optional)
    print(f"{ns.name}: files in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        ns = _parser().parse_args(argv)
        import sigprop.rules  # noqa: F401  (register rules)

        return {"train": cmd_train, "eval": cmd_eval, "data": cmd_data}[ns.command](ns)
    except SigpropError as err:
        print(f"sigprop: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sigprop: interrupted; continue a training run with --resume --run-dir DIR",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
