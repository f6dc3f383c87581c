"""The reproduction manifest and where a reproduction's runs live in its folder.

    OUT/reproduce.json                 the manifest: experiment (as read), budget, the runs,
                                       failures, options, and each invocation's provenance
    OUT/runs/<row>_<column>_s<seed>/   one ordinary run folder per run

Written by :mod:`.reproduce`, read by it and by :mod:`.report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import runio
from ..engine.config import Config, apply_overrides
from ..errors import CheckpointError
from .spec import RunPlan

MANIFEST = "reproduce.json"
RUNS = "runs"
MANIFEST_FORMAT = 1


@dataclass
class RunState:
    status: str  # "finished" | "partial" | "absent" | "unreadable"
    epochs: int = 0  # epochs in its metrics
    detail: str = ""


def run_dir(out: Path, plan: RunPlan) -> Path:
    return Path(out) / RUNS / plan.id


def run_state(folder: Path, epochs: int) -> RunState:
    """How far the run in ``folder`` got, from its metrics (``epochs`` planned)."""
    if not folder.is_dir():
        return RunState("absent")
    try:
        history = runio.read_history(folder)
    except CheckpointError as err:
        return RunState("unreadable", detail=str(err))
    if len(history) >= epochs:
        return RunState("finished", len(history))
    started = (folder / runio.CONFIG).exists() or (folder / runio.CHECKPOINT).exists()
    return RunState("partial" if started else "absent", len(history))


def planned_config(plan: RunPlan, out: Path, *, data_dir: str | None, device: str | None,
                   progress: bool) -> Config:
    """``plan``'s configuration placed in ``out`` (its run folder, device, data folder)."""
    where: dict[str, dict[str, Any]] = {"train": {"run_dir": str(run_dir(out, plan)),
                                                  "progress": progress}}
    if device is not None:
        where["train"]["device"] = device
    if data_dir is not None:
        where["data"] = {"data_dir": data_dir}
    return apply_overrides(plan.config, where)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the reproduction in ``out`` (None if there is none), checked."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    m = runio.read_json(path)
    fix = "restore it, or give another --out"
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} is not a sigprop reproduction manifest; {fix}")
    kinds = {"experiment": dict, "budget": str, "runs": list, "failed": dict,
             "invocations": list, "options": dict}
    for key, kind in kinds.items():
        if not isinstance(m.get(key), kind):
            raise CheckpointError(f"{path} is damaged: {key!r} is missing or not a "
                                  f"{kind.__name__}; {fix}")
    if not all(isinstance(r, str) for r in m["runs"]):
        raise CheckpointError(f"{path} is damaged: 'runs' must list run names; {fix}")
    return m


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    runio.atomic_write_text(Path(out) / MANIFEST, runio.strict_dumps(manifest, indent=2) + "\n")
