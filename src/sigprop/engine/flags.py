"""The `sigprop train` flags: the data, model and train sections' table, and the [rule]
flags made from what the rules and target generators declare (:mod:`sigprop.options`)."""

from __future__ import annotations

from typing import Any

from ..options import Option
from ..registry import NETWORKS, RULES, SIGNALS
from ..rules.config import SHARED, RuleConfig, declared_options


# `sigprop train` flags of the data, model and train sections: (flag, section, key,
# argparse keywords); argparse stores each under "section.key", and only what was given.
# The [rule] flags come from the declarations (:func:`rule_flags`).
SECTION_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--dataset", "data", "dataset", {"help": "dataset name (sigprop data list)"}),
    ("--data-dir", "data", "data_dir", {"help": "folder holding the dataset files"}),
    ("--train-limit", "data", "train_limit", {"metavar": "N", "help": "use the first N training samples"}),
    ("--test-limit", "data", "test_limit", {"metavar": "N", "help": "evaluate on the first N test samples only (quick checks)"}),
    ("--train-split", "data", "train_split", {"help": "the split to train on (default train; SVHN: train+extra, as the paper)"}),
    ("--augment", "data", "augment", {"help": "auto | none | crop | flip | crop+flip"}),
    ("--batch-size", "data", "batch_size", {"help": "training batch size (default 128; a rule may set its own)"}),
    ("--inputs", "data", "inputs", {"help": "what the network sees: standard (the dataset's mean and std; default) | unit (pixels in [0, 1])"}),
    ("--eval-batch-size", "data", "eval_batch_size", {"help": "the most samples an evaluation batch holds (default 1000; cut so a batch holds at most 2 GiB, printed at start; no result changes)"}),
    ("--network", "model", "network", {"help": "the network"}),
    ("--dropout", "model", "dropout", {"help": "dropout after each hidden block (default 0)"}),
    ("--epochs", "train", "epochs", {"help": "epochs to train (default 10)"}),
    ("--schedule", "train", "schedule", {"help": "learning-rate schedule: step (x0.25 at 50/75/89/94% of the epochs; default) | step10 (x0.1 at 60/90%) | cosine | none (a rule may set its own)"}),
    ("--seed", "train", "seed", {"help": "random seed (default 0)"}),
    ("--device", "train", "device", {"help": "cpu | cuda | cuda:N"}),
    ("--layout", "train", "layout", {"help": "the conv maps' memory layout: auto (channels-last for conv networks on an AVX2/AVX-512 CPU, where it is faster; NCHW elsewhere; default) | nchw | channels-last"}),
    ("--run-dir", "train", "run_dir", {"help": "run folder (default runs/<dataset>-<network>-<rule>-<time>)"}),
    ("--check-every", "train", "check_every", {"help": "steps between NaN checks"}),
    ("--stages", "train", "stages", {"metavar": "S", "help": "sigprop: split the blocks into S stages, one process each, learning concurrently (torch.distributed; balanced by --split-by)"}),
    ("--split", "train", "split", {"metavar": "K,K,...", "help": "blocks per stage, first stage first (e.g. 2,1); sets the stages by hand"}),
    ("--split-by", "train", "split_by", {"help": "what the stages balance: measured (each block's step time in a short calibration at the start; default) | counted (counted FLOPs and memory traffic)"}),
    ("--stage-threads", "train", "stage_threads", {"metavar": "N", "help": "intra-op threads of each stage process (default: the machine's cores / its processes)"}),
    ("--replicas", "train", "replicas", {"metavar": "R", "help": "sigprop: R data-parallel replicas of every stage (S x R processes): each batch is shared out among them and each stage's gradients are all-reduced before its update"}),
]

# boolean keys set by a flag without a value: (flag, section, key, the value it sets, help)
SWITCH_FLAGS: list[tuple[str, str, str, Any, str]] = [
    ("--no-progress", "train", "progress", False, "no progress bar"),
]

def rule_flags() -> list[tuple[str, str, dict[str, Any], str]]:
    """``(flag, key, argparse keywords, who takes it)`` for ``--rule``, the shared
    options and every option a registered rule or target generator declares."""
    out = [("--rule", "name", {"help": "the learning rule, one of: " + ", ".join(RULES.names()),
                               "metavar": "RULE"}, "every rule")]
    out += [(o.flag, o.name, _flag_kw(o), "every rule") for o in SHARED]
    groups: dict[str, list[str]] = {}
    for name, cls in RULES.items():
        for o in cls.options:
            groups.setdefault(o.name, []).append(name)
    for name, cls in SIGNALS.items():
        for o in cls.options:
            every = all(o in c.options for _, c in SIGNALS.items())
            label = "every target generator (--signal)" if every else f"signal {name}"
            who = groups.setdefault(o.name, [])
            if label not in who:
                who.append(label)
    declared = declared_options()
    for key, who in groups.items():
        if key not in RuleConfig.SHARED_NAMES:
            out.append((declared[key].flag, key, _flag_kw(declared[key]), ", ".join(who)))
    return out


def _flag_kw(o: Option) -> dict[str, Any]:
    allowed = o.allowed()
    listed = allowed is not None and all(a in o.help for a in allowed)
    text = o.help if listed else f"{o.help}; {o.describe()}"
    if o.default is not None and o.default != "":
        text += f" (default {o.default})"
    return {"help": text, "metavar": o.metavar or o.name.upper()}


def rule_switches() -> list[tuple[str, str, Any, str]]:
    """``(flag, key, the value it sets, help)`` of options with a valueless flag."""
    return [(o.switch[0], o.name, o.switch[1], f"sets {o.name} to {o.switch[1]}: {o.help}")
            for o in declared_options().values() if o.switch]


def network_help() -> str:
    return "the network, one of: " + ", ".join(NETWORKS.usages())
