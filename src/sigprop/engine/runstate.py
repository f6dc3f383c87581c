"""Checkpoints of staged runs: one file per stage, one manifest, and the merged view.

At each epoch's end every stage writes its part of the rule's state to
``stages/epoch<E>-stage<r>of<S>.pt`` (atomically, with :func:`runio.save_checkpoint`):
the module entries and Adam states of its own blocks (the signal's with the first
stage, the head's with the last), its random-generator state, and on the first stage
the history. Entries keep the single-process rule's names (``network.blocks.3.0.weight``,
...), so no name is held by two stages and the parts merge into a single-process state
by union. When every stage has written its file, the first stage replaces
``stages.json`` (atomically) to point at the new epoch, then each stage removes its
previous file: a crash at any point leaves ``stages.json`` naming a complete, consistent
cut (every stage at the same step).

Why not ``torch.distributed.checkpoint``: its reader unpickles the ``.metadata`` file
with plain ``pickle.load``, so reading a checkpoint could run code from the file; ours
are read with ``torch.load(weights_only=True)`` (:func:`runio.load_checkpoint`).

:func:`load_run_state` gives the latest state of a run folder, staged or not, as a
single-process checkpoint dict (``sigprop eval``, ``--resume`` in one process);
:func:`stage_state` cuts a single-process state to one stage (``--resume --stages``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..engine import runio
from ..errors import CheckpointError, ConfigError

MANIFEST = "stages.json"
FOLDER = "stages"
_BLOCK_KEY = re.compile(r"network\.blocks\.(\d+)\.")
_PROTO_KEY = re.compile(r"prototypes\.(?:mean|seen)(\d+)$")


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh run (no --resume) into a folder that holds one stops here, whichever way
    that run was trained (one process or stages)."""
    run_dir = Path(run_dir)
    if any((run_dir / name).exists() for name in (runio.CHECKPOINT, runio.CONFIG, MANIFEST)):
        raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to "
                          "continue it or choose another --run-dir")


def stage_file(epoch: int, stage: int, stages: int) -> str:
    return f"{FOLDER}/epoch{epoch:04d}-stage{stage + 1}of{stages}.pt"


def owner(key: str, ranges: list[tuple[int, int]]) -> int:
    """The stage that holds a module entry of the rule's state_dict."""
    m = _BLOCK_KEY.match(key) or _PROTO_KEY.match(key)
    if m is not None:
        block = int(m.group(1))
        for k, (a, b) in enumerate(ranges):
            if a <= block < b:
                return k
        raise CheckpointError(f"state entry {key!r} belongs to block {block + 1}, which no stage "
                              f"runs (the stages cover {ranges[-1][1]} blocks)")
    if key.startswith("network.head."):
        return len(ranges) - 1
    return 0  # the signal and anything else that is not a block's: the first stage


def _group_stage(name: str, ranges: list[tuple[int, int]]) -> int:
    if name == "head":
        return len(ranges) - 1
    m = re.fullmatch(r"block(\d+)", str(name))
    if m is None:
        return 0
    return owner(f"network.blocks.{int(m.group(1)) - 1}.", ranges)


def stage_state(rule_state: dict, stage: int, ranges: list[tuple[int, int]]) -> dict:
    """The part of a rule's state_dict that ``stage`` owns: its module entries, and of
    each optimizer the states of the parameters in its groups (every group's settings
    are kept: they are small and the same on every stage)."""
    modules = {k: v for k, v in rule_state["modules"].items() if owner(k, ranges) == stage}
    optimizers = []
    for opt in rule_state["optimizers"]:
        mine = {i for g in opt["param_groups"] if _group_stage(g.get("name", ""), ranges) == stage
                for i in g["params"]}
        optimizers.append({"state": {i: s for i, s in opt["state"].items() if i in mine},
                           "param_groups": opt["param_groups"]})
    return {"modules": modules, "optimizers": optimizers}


def merge_states(parts: list[dict]) -> dict:
    """The single-process rule state from every stage's part (in stage order)."""
    modules: dict[str, Any] = {}
    for part in parts:
        modules.update(part["modules"])
    optimizers = []
    for k, first in enumerate(parts[0]["optimizers"]):
        state: dict = {}
        for part in parts:
            state.update(part["optimizers"][k]["state"])
        optimizers.append({"state": state, "param_groups": first["param_groups"]})
    return {"modules": modules, "optimizers": optimizers}


def write_manifest(run_dir: Path, epoch: int, sizes: list[int]) -> None:
    stages = len(sizes)
    runio.atomic_write_text(run_dir / MANIFEST, json.dumps({
        "epoch": epoch, "split": sizes,
        "files": [stage_file(epoch, r, stages) for r in range(stages)]}, indent=2))


def read_manifest(run_dir: Path) -> dict | None:
    """The manifest of a staged run folder (checked), or None if there is none."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    data = runio.read_json(path)
    ok = (isinstance(data, dict) and isinstance(data.get("epoch"), int) and data["epoch"] >= 1
          and isinstance(data.get("split"), list) and data["split"]
          and all(isinstance(k, int) and k >= 1 for k in data["split"])
          and isinstance(data.get("files"), list) and len(data["files"]) == len(data["split"])
          and all(isinstance(f, str) and re.fullmatch(r"stages/epoch\d+-stage\d+of\d+\.pt", f)
                  for f in data["files"]))
    if not ok:
        raise CheckpointError(f"{path} is damaged or not written by sigprop; delete it (and "
                              f"{FOLDER}/) to use the run's checkpoint.pt, if any")
    return data


def load_stage_file(run_dir: Path, manifest: dict, stage: int) -> dict:
    path = Path(run_dir) / manifest["files"][stage]
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {MANIFEST} names it as stage {stage + 1}'s part of epoch "
            f"{manifest['epoch']} (a multi-machine run keeps each stage's file on its own "
            "machine: copy the stages/ files into one folder to read the run in one process)")
    try:
        state = runio.load_checkpoint(path, "cpu", stage=True)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}".split("; ")[0] + f"; it is stage {stage + 1}'s part of epoch "
            f"{manifest['epoch']}, which this run cannot go on from without it: restore the "
            "file, or start the run afresh in another --run-dir") from None
    if state.get("epoch") != manifest["epoch"] or state.get("stage") != stage:
        raise CheckpointError(f"{path} does not hold stage {stage + 1} of epoch "
                              f"{manifest['epoch']}; the run folder's stages/ files are mixed up")
    return state


def latest_kind(run_dir: Path) -> tuple[str | None, int, dict | None]:
    """("single" | "staged" | None, epoch, the one-process checkpoint when it is the
    newest) of a run folder: the newer of checkpoint.pt and stages.json."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    staged = manifest["epoch"] if manifest is not None else 0
    single = None
    if (run_dir / runio.CHECKPOINT).exists():
        single = runio.load_checkpoint(run_dir / runio.CHECKPOINT, "cpu")
    if single is not None and single["epoch"] >= staged:
        return "single", single["epoch"], single
    if staged:
        return "staged", staged, None
    return None, 0, None


def load_run_state(run_dir: Path) -> dict | None:
    """The newest checkpoint of a run folder as a single-process checkpoint dict
    (``epoch``, ``config``, ``rule``, ``rng``, ``history``; a staged run's parts merged;
    its generator state is the first stage's), or None if the folder has none."""
    run_dir = Path(run_dir)
    kind, _, single = latest_kind(run_dir)
    if kind != "staged":
        return single
    manifest = read_manifest(run_dir)
    parts = [load_stage_file(run_dir, manifest, r) for r in range(len(manifest["split"]))]
    first = parts[0]
    return {"format": runio.CHECKPOINT_FORMAT, "epoch": manifest["epoch"],
            "config": first["config"], "rule": merge_states([p["rule"] for p in parts]),
            "rng": first["rng"], "history": first["history"], "split": manifest["split"]}


def remove_stale(run_dir: Path, keep: set[str], stage: int, stages: int) -> None:
    """Remove this stage's stage files other than ``keep`` (paths relative to the run)."""
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return
    for f in folder.glob(f"epoch*-stage{stage + 1}of*.pt"):
        if f"{FOLDER}/{f.name}" not in keep:
            f.unlink(missing_ok=True)
    if stage == 0:  # parts of stages that a run with more stages had
        for f in folder.glob("epoch*-stage*of*.pt"):
            m = re.fullmatch(r"epoch\d+-stage(\d+)of(\d+)\.pt", f.name)
            if m and int(m.group(1)) > stages:
                f.unlink(missing_ok=True)


def save_stage(run_dir: Path, epoch: int, stage: int, stages: int, state: dict) -> None:
    (Path(run_dir) / FOLDER).mkdir(exist_ok=True)
    runio.save_checkpoint(Path(run_dir) / stage_file(epoch, stage, stages), state)

