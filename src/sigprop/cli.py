"""The ``sigprop`` command: train, eval, data, reproduce, report, bench, plot.

Every user error (a SigpropError) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .engine.flags import SECTION_FLAGS, SWITCH_FLAGS, network_help, rule_flags, rule_switches
from .engine.interrupt import Terminated, one_line, sigterm_raises
from .engine.outputs import check_output_file, check_output_folder, checked_text
from .engine.runio import write_failure
from .engine.stagespec import stage_count
from .errors import ConfigError, DataError, SigpropError
from .registry import DATASETS, plugin_packages
from .resources import check_threads
from .rules import load_plugins


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
    _train_arguments(t)

    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint on the test set")
    e.add_argument("path", help="run folder or checkpoint.pt")
    e.add_argument("--data-dir")
    e.add_argument("--device")

    d = sub.add_parser("data", help="list, check or download datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dsub.add_parser("list", help="known datasets and where they were found")
    c = dsub.add_parser("check", help="look for a dataset's files and load them (exit 2, one "
                        "line on stderr, if a split fails)")
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
    r = sub.add_parser("reproduce", help="run a table of the paper and report it beside the "
                       "paper's numbers")
    r.add_argument("experiment", nargs="?", metavar="NAME",
                   help="experiment name (--list names them) or an experiment .toml file")
    r.add_argument("--list", action="store_true", help="name every experiment, its runs and "
                   "the data it needs")
    r.add_argument("--budget", default="full", choices=("full", "quick", "smoke"),
                   help="full: the paper's settings (default) | quick: well under an hour on "
                   "a CPU | smoke: seconds")
    r.add_argument("--seeds", type=_seeds, metavar="S,S,...",
                   help="seeds to run instead of the budget's (e.g. 0,1,2)")
    r.add_argument("--only", type=_keys, metavar="KEY,KEY,...",
                   help="run only these rows and/or columns (their keys: --list names them); "
                   "the report covers every run in --out")
    r.add_argument("--data-dir", help="folder holding the datasets (or each in its NAME/)")
    r.add_argument("--device", help="cpu | cuda | cuda:N")
    r.add_argument("--out", metavar="DIR",
                   help="output folder (default runs/reproduce/NAME-BUDGET); give the same "
                   "one again to continue a reproduction")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    rp = sub.add_parser("report", help="rebuild the report of a reproduction from its run "
                        "folders (no training)")
    rp.add_argument("folder", metavar="DIR", help="the --out folder of a sigprop reproduce")

    b = sub.add_parser("bench", help="time and memory per sample, per layer, of rules side by "
                       "side (Tables I-IV)")
    b.add_argument("--network", default="vgg8b", help="network (default vgg8b)")
    b.add_argument("--rules", default="backprop,ll-bp,ll-fa,sigprop", type=_names,
                   help="rules, comma-separated (default backprop,ll-bp,ll-fa,sigprop)")
    b.add_argument("--targets", default="dense", type=_names,
                   help="sigprop's targets: dense | sparse | sparse-gG (a G x G grid of "
                   "windows), comma-separated, e.g. dense,sparse (Tables III-IV)")
    b.add_argument("--input", default="3x32x32", type=_shape_arg, metavar="CxHxW",
                   help="sample shape (default 3x32x32: CIFAR-10)")
    b.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--dropout", type=float, default=None,
                   help="default 0.1 (Sec. IV), none for networks without dropout "
                        "(snn-, hopfield-)")
    b.add_argument("--head", default="classifier", choices=("target", "classifier"),
                   help="sigprop's prediction (default classifier: Fig. 2b, as Sec. IV-A)")
    b.add_argument("--pipeline", default="auto", choices=("auto", "off"),
                   help="sigprop's pipeline (per-layer times need it off)")
    b.add_argument("--layout", default="auto", choices=("auto", "nchw", "channels-last"),
                   help="memory layout of every rule's conv maps and weights: auto (as "
                        "sigprop train: channels-last for conv networks on an AVX2/AVX-512 "
                        "CPU; default) | nchw | channels-last (NHWC in memory, which oneDNN "
                        "convolves without reordering)")
    b.add_argument("--steps", type=int, default=2, help="steps per timed segment (default 2)")
    b.add_argument("--repeats", type=int, default=5, help="interleaved segments (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="warm-up steps per rule (default 1)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON")

    pl = sub.add_parser("plot", help="draw runs' learning curves and early exits (PNG)")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders")
    pl.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots "
                    "for one run, ./plots for several)")
    return p


def _train_arguments(t: argparse.ArgumentParser) -> None:
    """`sigprop train`'s flags: the sections' and, from the registries, the rule's (grouped
    by the rules and generators that take them)."""
    t.add_argument("--config", metavar="FILE.toml", help="TOML file of [data]/[model]/[rule]/[train]")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    helps = {"--dataset": "dataset, one of: " + ", ".join(DATASETS.names()),
             "--network": network_help()}
    for flag, section, key, kw in SECTION_FLAGS:
        text = helps.get(flag, kw.get("help", ""))
        t.add_argument(flag, dest=f"{section}.{key}",
                       **{"metavar": key.upper(), **kw, "help": _escaped(text)})
    for flag, section, key, value, text in SWITCH_FLAGS:
        t.add_argument(flag, dest=f"{section}.{key}", action="store_const", const=value,
                       help=_escaped(text))
    groups: dict[str, argparse._ArgumentGroup] = {}
    switches = {key: (flag, value, text) for flag, key, value, text in rule_switches()}
    for flag, key, kw, who in rule_flags():
        if who not in groups:
            title = "rule options" if who == "every rule" else f"options of {who}"
            groups[who] = t.add_argument_group(title)
        groups[who].add_argument(flag, dest=f"rule.{key}", **{**kw, "help": _escaped(kw["help"])})
        if key in switches:
            sflag, value, text = switches[key]
            groups[who].add_argument(sflag, dest=f"rule.{key}", action="store_const",
                                     const=value, help=_escaped(text))


def _escaped(text: str) -> str:
    """Help text as argparse takes it (a literal % is written %%)."""
    return text.replace("%", "%%")


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _shape_arg(text: str) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if not all(p.isascii() and p.isdigit() and 0 < len(p) < 6 for p in parts) \
            or min(int(p) for p in parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a sample shape like 3x32x32, got {text!r}")
    return tuple(int(p) for p in parts)


def _seeds(text: str) -> tuple[int, ...]:
    from .engine.config import MAX_SEED

    parts = [t.strip() for t in text.split(",")]
    if not all(t.isascii() and t.isdigit() and len(t) <= 19 for t in parts) \
            or not all(int(t) <= MAX_SEED for t in parts):
        raise argparse.ArgumentTypeError(
            f"expected seeds as integers in 0..{MAX_SEED} separated by commas, got {text!r}")
    seeds = tuple(int(t) for t in parts)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed appears twice in {text!r}")
    return seeds


def _keys(text: str) -> tuple[str, ...]:
    parts = tuple(t.strip() for t in text.split(","))
    if not all(t and len(t) <= 64 and t.isascii() and t.isprintable() for t in parts) \
            or len(parts) > 64:
        raise argparse.ArgumentTypeError(
            f"expected row or column keys separated by commas, got {text[:80]!r}")
    return tuple(dict.fromkeys(parts))


def _overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = value
    return out


def cmd_train(ns: argparse.Namespace) -> int:
    from .engine.config import (
        apply_overrides,
        compose,
        foreign_options,
        load_toml,
        without_options,
    )
    from .engine.perf import tune_allocator
    from .engine.runstate import recorded_run_config
    from .engine.trainer import Trainer

    tune_allocator()
    overrides = _overrides(ns)
    resume = getattr(ns, "resume", False)
    run_dir = overrides.get("train", {}).get("run_dir")
    if resume and not run_dir:
        raise ConfigError("--resume needs --run-dir: the folder of the run to continue")
    # resume: the run's own settings, then the file's and the flags' (checked against
    # what resume may change when the checkpoint is read)
    recorded = recorded_run_config(Path(run_dir)) if resume else None
    layers = [(load_toml(ns.config), False)] if hasattr(ns, "config") else []
    layers.append((overrides, True))
    if recorded is None:  # a new run: the defaults, the rule's own, the file, the flags
        cfg = compose(*layers)
    else:
        cfg = recorded
        for given, text in layers:
            cfg = apply_overrides(cfg, given, text=text)
    if recorded is not None and cfg.rule.name != recorded.rule.name:
        # the run's own options do not fit another rule: leave them out, so that the
        # resume check names the change of rule itself
        mine = {k for given, _ in layers for k in given.get("rule", {})}
        cfg = without_options(cfg, foreign_options(cfg.rule.name, cfg.rule.options) - mine)
    cfg.validate()
    if cfg.train.run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg = apply_overrides(cfg, {"train": {"run_dir": str(
            Path("runs") / f"{cfg.data.dataset}-{cfg.model.network}-{cfg.rule.name}-{stamp}")}})
    if stage_count(cfg.train.stages, cfg.train.split) > 1 or cfg.train.replicas > 1:
        return _train_staged(cfg, resume, explicit_dir=run_dir is not None)
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
    _summary(cfg, history[-1])
    return 0


def _summary(cfg, last: dict) -> None:
    print(f"run folder: {cfg.train.run_dir}")
    for name, acc in last["test_acc_exits"].items():
        print(f"  exit {name:<8} test accuracy {acc:.4f}")
    print(f"test accuracy: {last['test_acc']:.4f} (error {100 * last['test_error']:.2f}%)")


def _train_staged(cfg, resume: bool, explicit_dir: bool) -> int:
    """--stages / --split / --replicas: this process is one stage (under torchrun), or it
    starts them."""
    from .engine.runio import read_history
    from .parallel.launch import launch
    from .parallel.runner import run_stage
    from .parallel.stage import in_distributed_env

    if in_distributed_env():  # torchrun started this process as one stage
        # torchrun --max-restarts: a restarted job continues from the last checkpoint
        resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        if not explicit_dir:
            raise ConfigError("under torchrun every stage must write to the same run folder: "
                              "give --run-dir")
        from .parallel.worker import exit_now

        try:
            history = run_stage(cfg, Path(cfg.train.run_dir), resume)
        except SigpropError as err:  # gloo's teardown after a failure may abort: exit now
            print(f"sigprop: error: {one_line(err)}", file=sys.stderr)
            exit_now(2)
        if int(os.environ["RANK"]) == 0 and history:
            _summary(cfg, history[-1])
        return 0
    code = launch(cfg, resume)
    if code == 0:
        history = read_history(Path(cfg.train.run_dir))
        if history:
            _summary(cfg, history[-1])
    return code


def cmd_eval(ns: argparse.Namespace) -> int:
    from .engine import load_trained
    from .engine.trainer import evaluate

    exp, cfg, state, ckpt = load_trained(ns.path, ns.device, ns.data_dir)
    acc = evaluate(exp.rule, exp.test)
    print(f"checkpoint: {ckpt} (epoch {state['epoch']}, rule {cfg.rule.name}, {cfg.model.network})")
    for name, a in acc.items():
        print(f"  exit {name:<8} test accuracy {a:.4f}")
    final = acc[exp.rule.exit_names[-1]]
    print(f"test accuracy: {final:.4f} (error {100 * (1 - final):.2f}%)")
    return 0


def cmd_data(ns: argparse.Namespace) -> int:
    from .data import check_dataset, download_dataset, find_dataset_dir

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
        failure = report.failure()
        if failure is not None:  # the report stays on stdout; the first failure, one line
            raise DataError(failure)
        return 0
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


def cmd_reproduce(ns: argparse.Namespace) -> int:
    from .engine.perf import tune_allocator
    from .experiments import builtin_names, load_experiment, reproduce

    if ns.list:
        names = [ns.experiment] if ns.experiment else builtin_names()
        for i, name in enumerate(names):
            print(("\n" if i else "") + load_experiment(name).describe(ns.data_dir))
        return 0
    if not ns.experiment:
        raise ConfigError("name the experiment to reproduce (sigprop reproduce --list names "
                          "them) or give an experiment .toml file")
    exp = load_experiment(ns.experiment)
    out = (check_output_folder(ns.out, "--out") if ns.out is not None
           else Path("runs") / "reproduce" / f"{exp.name}-{ns.budget}")
    tune_allocator()
    try:
        result = reproduce(exp, ns.budget, out, seeds=ns.seeds, data_dir=ns.data_dir,
                           device=ns.device, progress=not ns.no_progress,
                           argv=["sigprop", *ns.argv], only=ns.only)
    except KeyboardInterrupt as stop:
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"sigprop: {what}; give the same command again to continue (finished runs are "
              "skipped, the interrupted one resumes)", file=sys.stderr)
        return stop.code if isinstance(stop, Terminated) else 130
    print(f"report: {result['report']} ({result['ran']} runs trained, {result['skipped']} "
          "finished before)")
    failed = result["failed"]
    if failed:
        listed = "; ".join(f"{run}: {why}" for run, why in failed.items())
        print(f"sigprop: error: {len(failed)} run(s) failed ({listed}); their cells are marked "
              f"in {result['report']}; fix the cause and give the same command again",
              file=sys.stderr)
        return 2
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    import torch

    from .engine.bench import as_json, describe_layouts, markdown, run_bench
    from .engine.perf import tune_allocator
    from .engine.runio import atomic_write_text, strict_dumps
    from .experiments.provenance import provenance
    from .registry import RULES

    for r in ns.rules:
        RULES.get(r)
    from .engine.bench import target_options

    for t in ns.targets:
        target_options(t)  # a ConfigError for a kind it does not know
    json_path = check_output_file(ns.json, "--json") if ns.json is not None else None
    if ns.threads is not None:
        torch.set_num_threads(check_threads(ns.threads, "--threads"))
    tune_allocator()  # as `sigprop train` runs: the timings are a training run's
    results = run_bench(ns.network, ns.input, ns.classes, ns.rules, targets=ns.targets,
                        batch_size=ns.batch_size, steps=ns.steps, repeats=ns.repeats,
                        warmup=ns.warmup, device=ns.device, dropout=ns.dropout,
                        head=ns.head, pipeline=ns.pipeline, layout=ns.layout,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    from .resources import cpu_capability

    layout = describe_layouts({r.variant.name: (r.layout, "") for r in results})
    print(f"CPU kernels: {cpu_capability()}; {torch.get_num_threads()} threads; layout "
          f"{layout}\n")
    print(markdown(results))
    if json_path is not None:
        facts = {"command": " ".join(["sigprop", *ns.argv]), **provenance(),
                 "args": {k: v for k, v in vars(ns).items() if k not in ("argv",)}}
        atomic_write_text(json_path, strict_dumps(as_json(results, facts), indent=2,
                                                  default=str) + "\n")
        print(f"results written to {ns.json}", file=sys.stderr)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from .experiments import write_report

    print(f"report: {write_report(check_output_folder(ns.folder, 'the report folder'))}")
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from .experiments.plots import plot_runs

    if ns.out is not None:
        out = check_output_folder(ns.out, "--out")
    else:
        out = Path(ns.runs[0]) / "plots" if len(ns.runs) == 1 else Path("plots")
        check_output_folder(str(out), "the plots folder (--out)")
    made = plot_runs([checked_text(r, "RUN_DIR") for r in ns.runs], out)
    if not made:
        raise ConfigError("nothing to plot: the runs hold no epoch with test accuracy or "
                          "loss; train them first")
    for path in made:
        print(f"plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    with sigterm_raises():
        try:
            argv = sys.argv[1:] if argv is None else list(argv)
            load_plugins()  # their rules, networks, generators and datasets, in the help too
            ns = _parser().parse_args(argv)
            ns.argv = argv

            commands = {"train": cmd_train, "eval": cmd_eval, "data": cmd_data,
                        "reproduce": cmd_reproduce, "report": cmd_report, "plot": cmd_plot,
                        "bench": cmd_bench}
            return commands[ns.command](ns)
        except SigpropError as err:
            print(f"sigprop: error: {one_line(err)}", file=sys.stderr)
            return 2
        except OSError as err:  # a path the checks above did not reach: the system's word
            where = f"{err.filename}: " if err.filename else ""
            print(f"sigprop: error: {one_line(Exception(where + write_failure(err)))}; check "
                  "the paths given", file=sys.stderr)
            return 2
        except MemoryError:
            print("sigprop: error: out of memory; lower --batch-size, or choose a smaller "
                  "--network", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:
            print(f"sigprop: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}",
                  file=sys.stderr)
            return stop.code if isinstance(stop, Terminated) else 130
        except Exception as err:
            where = _plugin_frame(err)
            if where is None:
                raise  # sigprop's own bug: the traceback is the report
            first = " ".join(str(err).split()) or type(err).__name__
            print(f"sigprop: error: plugin code failed at {where}: {type(err).__name__}: "
                  f"{first}; fix the plugin or uninstall its package", file=sys.stderr)
            return 2


def _plugin_frame(err: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``err``'s traceback that lies in a loaded
    plugin's package, or None if none does."""
    packages = plugin_packages()
    tb, where = err.__traceback__, None
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.split(".")[0] in packages:
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


if __name__ == "__main__":
    sys.exit(main())
