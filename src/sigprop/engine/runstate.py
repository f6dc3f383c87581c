"""The state of a run folder, one-process or staged: the checkpoints, and the bookkeeping
of a run as it starts or resumes (:class:`RunStart`).

A one-process run writes ``checkpoint.pt`` after each epoch (:func:`runio.save_checkpoint`).
A staged run (sigprop.parallel) writes, at each epoch's end, every stage's part of the
rule's state to ``stages/epoch<E>-stage<r>of<S>.pt``: the module entries and Adam states
of its own blocks (the signal's with the first stage, the head's with the last), its
random-generator state, and on the first stage the history. Entries keep the
single-process rule's names (``network.blocks.3.0.weight``, ...), so no name is held by
two stages and the parts merge into a single-process state by union. When every stage
has written its file, the first stage replaces ``stages.json`` (atomically) to point at
the new epoch, then each stage removes its previous file: a crash at any point leaves
``stages.json`` naming a complete, consistent cut (every stage at the same step).

Why not ``torch.distributed.checkpoint``: its reader unpickles the ``.metadata`` file
with plain ``pickle.load``, so reading a checkpoint could run code from the file; ours
are read with ``torch.load(weights_only=True)`` (:func:`runio.load_checkpoint`).

:func:`load_run_state` gives the latest state of a run folder, staged or not, as a
single-process checkpoint dict (``sigprop eval``, ``--resume`` in one process);
:func:`stage_state` cuts a single-process state to one stage (``--resume --stages``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..data import split_file_records
from ..errors import CheckpointError, ConfigError
from . import runio
from .config import Config
from .resumable import resume_changes

STAGES_FILE = "stages.json"  # which stage files make the newest epoch
STAGES_DIR = "stages"
_BLOCK_KEY = re.compile(r"network\.blocks\.(\d+)\.")
_PROTO_KEY = re.compile(r"prototypes\.(?:mean|seen)(\d+)$")


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh run (no --resume) into a folder that holds one stops here, whichever way
    that run was trained (one process or stages)."""
    run_dir = Path(run_dir)
    if any((run_dir / name).exists() for name in (runio.CHECKPOINT, runio.CONFIG, STAGES_FILE)):
        raise ConfigError(f"run folder {run_dir} already holds a run; pass --resume to "
                          "continue it or choose another --run-dir")


def stage_file(epoch: int, stage: int, stages: int) -> str:
    return f"{STAGES_DIR}/epoch{epoch:04d}-stage{stage + 1}of{stages}.pt"


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


def write_stages(run_dir: Path, epoch: int, sizes: list[int]) -> None:
    stages = len(sizes)
    runio.atomic_write_text(run_dir / STAGES_FILE, runio.strict_dumps({
        "epoch": epoch, "split": sizes,
        "files": [stage_file(epoch, r, stages) for r in range(stages)]}, indent=2))


def read_stages(run_dir: Path) -> dict | None:
    """The stages.json of a staged run folder (checked), or None if there is none."""
    path = Path(run_dir) / STAGES_FILE
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
                              f"{STAGES_DIR}/) to use the run's checkpoint.pt, if any")
    return data


def load_stage_file(run_dir: Path, index: dict, stage: int) -> dict:
    path = Path(run_dir) / index["files"][stage]
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {STAGES_FILE} names it as stage {stage + 1}'s part of epoch "
            f"{index['epoch']} (a multi-machine run keeps each stage's file on its own "
            "machine: copy the stages/ files into one folder to read the run in one process)")
    try:
        state = runio.load_checkpoint(path, "cpu", stage=True)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}".split("; ")[0] + f"; it is stage {stage + 1}'s part of epoch "
            f"{index['epoch']}, which this run cannot go on from without it: restore the "
            "file, or start the run afresh in another --run-dir") from None
    if state.get("epoch") != index["epoch"] or state.get("stage") != stage:
        raise CheckpointError(f"{path} does not hold stage {stage + 1} of epoch "
                              f"{index['epoch']}; the run folder's stages/ files are mixed up")
    return state


def latest_kind(run_dir: Path) -> tuple[str | None, int, dict | None]:
    """("single" | "staged" | None, epoch, the one-process checkpoint when it is the
    newest) of a run folder: the newer of checkpoint.pt and stages.json."""
    run_dir = Path(run_dir)
    index = read_stages(run_dir)
    staged = index["epoch"] if index is not None else 0
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
    return _merged(run_dir, read_stages(run_dir)) if kind == "staged" else single


def recorded_run_config(run_dir: Path) -> Config | None:
    """The configuration of the run in ``run_dir`` (config.json, else the checkpoint's),
    or None when the folder holds no run yet."""
    try:
        if (run_dir / runio.CONFIG).exists():
            path = run_dir / runio.CONFIG
            config = runio.read_run_config(path)["config"]
        elif (run_dir / runio.CHECKPOINT).exists():
            path = run_dir / runio.CHECKPOINT
            config = runio.load_checkpoint(path)["config"]
        else:
            return None
    except OSError as err:  # a name too long to look up, ...
        raise CheckpointError(f"cannot read run folder {run_dir} ({err.strerror or err})") from None
    return runio.recorded_config(config, path)


def _merged(run_dir: Path, index: dict) -> dict:
    parts = [load_stage_file(run_dir, index, r) for r in range(len(index["split"]))]
    first = parts[0]
    return {"format": runio.CHECKPOINT_FORMAT, "epoch": index["epoch"],
            "config": first["config"], "rule": merge_states([p["rule"] for p in parts]),
            "rng": first["rng"], "history": first["history"], "split": index["split"]}


def remove_stale(run_dir: Path, keep: set[str], stage: int, stages: int) -> None:
    """Remove this stage's stage files other than ``keep`` (paths relative to the run)."""
    folder = Path(run_dir) / STAGES_DIR
    if not folder.is_dir():
        return
    for f in folder.glob(f"epoch*-stage{stage + 1}of*.pt"):
        if f"{STAGES_DIR}/{f.name}" not in keep:
            f.unlink(missing_ok=True)
    if stage == 0:  # parts of stages that a run with more stages had
        for f in folder.glob("epoch*-stage*of*.pt"):
            m = re.fullmatch(r"epoch\d+-stage(\d+)of(\d+)\.pt", f.name)
            if m and int(m.group(1)) > stages:
                f.unlink(missing_ok=True)


def save_stage(run_dir: Path, epoch: int, stage: int, stages: int, state: dict) -> None:
    (Path(run_dir) / STAGES_DIR).mkdir(exist_ok=True)
    runio.save_checkpoint(Path(run_dir) / stage_file(epoch, stage, stages), state)



def load_stage_part(rule, state: dict, stage: int, ranges: list[tuple[int, int]]) -> None:
    """Load ``stage``'s part of a rule state (a whole one or a stage file's) into ``rule``:
    its entries replace the rule's own; the rest (blocks the stage does not run) stay."""
    mine = stage_state(state, stage, ranges)
    full = rule.state_dict()
    full["modules"].update(mine["modules"])
    for opt, part in zip(full["optimizers"], mine["optimizers"]):
        opt["state"].update(part["state"])
    rule.load_state_dict(full)


class RunStart:
    """A run as it starts in its folder, one process or staged: the checkpoint it continues
    from and what continuing it with ``cfg`` changes, settled before any data is read.

    A fresh run (not ``resume``) into a folder that holds one stops here. ``state`` is
    the newest checkpoint (None: the run starts from the beginning): a staged run's
    parts merged (``merged``), else its first stage's part, which holds the config, the
    history and the first stage's generator state. A change that resume may not make is
    a ConfigError. :meth:`begin` then writes the folder's records.
    """

    def __init__(self, run_dir: Path, cfg: Config, resume: bool, *, merged: bool = True
                 ) -> None:
        self.run_dir, self.cfg, self.resume = Path(run_dir), cfg, resume
        self.kind: str | None = None  # "single" (checkpoint.pt) | "staged" (stages.json)
        self.state: dict | None = None
        self.epoch = 0
        self.split: list[int] | None = None  # a staged checkpoint's blocks per stage
        self.changes: dict[str, tuple[Any, Any]] = {}
        if not resume:
            refuse_existing_run(self.run_dir)
            return
        self.kind, self.epoch, self.state = latest_kind(self.run_dir)
        path = self.run_dir / runio.CHECKPOINT
        if self.kind == "staged":
            index = read_stages(self.run_dir)
            self.split, path = index["split"], self.run_dir / index["files"][0]
            self.state = (_merged(self.run_dir, index) if merged
                          else load_stage_file(self.run_dir, index, 0))
        if self.state is not None:
            recorded = runio.recorded_config(self.state["config"], path)
            self.changes = resume_changes(recorded, cfg, self.epoch)

    def prepare(self, log: Callable[[str], None], facts: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
        """Check that a resumed run reads the data it was trained on and settle the
        folder's records (nothing is written yet); the history so far."""
        cfg, run_dir = self.cfg, self.run_dir
        files = {split: split_file_records(cfg.data.dataset, name, cfg.data.data_dir)
                 for split, name in (("train", cfg.data.train_split), ("test", "test"))}
        record = {"config": cfg.to_dict(), "seed": cfg.train.seed, **(facts or {}),
                  "versions": runio.versions(),
                  "data_files": files}
        config_path = run_dir / runio.CONFIG
        history: list[dict[str, Any]] = []
        if self.state is not None:
            old = runio.read_run_config(config_path) if config_path.exists() else {}
            check_same_data(old.get("data_files"), files)
            history = list(self.state["history"])
            record = resumed_record(old, record, self.changes, self.epoch, cfg.train.epochs)
        elif self.resume:
            log(f"no checkpoint in {run_dir}: starting the run from the beginning")
        self._history, self._record = history, record
        return history

    def write(self) -> None:
        """Bring the metrics files up to the checkpoint (a run killed between the two
        leaves them behind) and write config.json (a resumed run keeps its first record
        and notes what each resume changed). Call it once every check has passed."""
        if self.state is not None:
            runio.write_metrics(self.run_dir, self._history)
        if self.state is None or self.changes or self.epoch < self.cfg.train.epochs:
            runio.atomic_write_text(self.run_dir / runio.CONFIG,
                                    runio.strict_dumps(self._record, indent=2))


def resumed_record(old: dict[str, Any], record: dict[str, Any],
                   changes: dict[str, tuple[Any, Any]], done: int, epochs: int
                   ) -> dict[str, Any]:
    """config.json of a resumed run: its first record (``old``) updated, with what this
    resume changed appended under ``resumes`` (when it changes or trains anything)."""
    if not old:
        return record
    resumes = old.get("resumes", []) if isinstance(old.get("resumes"), list) else []
    record = {**old, **record, "versions": old.get("versions", record["versions"]),
              "resumes": resumes}
    if changes or done < epochs:
        record["resumes"].append({"after_epoch": done, "versions": runio.versions(),
                                  "changed": {k: list(v) for k, v in changes.items()}})
    return record


def check_same_data(recorded: Any, files: dict[str, list[dict[str, Any]]]) -> None:
    """A resumed run must read the files it was trained on (compared by md5)."""
    if not isinstance(recorded, dict):
        return  # a run from before data files were recorded
    for split, now in files.items():
        was = recorded.get(split)
        if not isinstance(was, list):
            continue
        old = sorted(str(r.get("md5")) for r in was if isinstance(r, dict))
        new = sorted(r["md5"] for r in now)
        if old != new:
            where = ", ".join(r["path"] for r in now)
            raise ConfigError(
                f"the {split} data read now ({where}) differ from the files this run was "
                "trained on (md5 in its config.json); resume with the same data "
                "(--data-dir), or start a new run")
