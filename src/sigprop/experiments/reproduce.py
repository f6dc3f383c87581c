"""Run every training of an experiment into one folder, then write its report.

    OUT/reproduce.json, OUT/runs/<run>/       the manifest and the run folders (:mod:`.manifest`)
    OUT/report.md, report.json, plots/*.png   (:mod:`.report`)

A reproduction killed at any point continues where it stopped when the same command is
given again: finished runs are skipped, an interrupted one resumes from its last
checkpoint (``sigprop train --resume``), the rest start. Before anything is created,
everything that can be checked is: the experiment file, the budget and seeds, that each
dataset is there with sound file headers and sizes, that each network fits its data, and
that runs already in OUT were made with the settings this reproduction needs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO


from ..data import check_split_files, dataset_spec, split_paths
from ..engine import runio
from ..engine.config import Config
from ..engine.outputs import check_output_folder
from ..engine.resumable import config_changes, resumable
from ..engine.runstate import STAGES_FILE
from ..engine.stagespec import stage_count
from ..engine.runfolder import RunFolder
from ..engine.trainer import Trainer, resolve_device
from ..errors import ConfigError, DataError, SigpropError
from ..networks import build_network
from ..rules import build_rule
from .manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    planned_config,
    read_manifest,
    run_dir,
    run_state,
    write_manifest,
)
from .provenance import provenance
from .report import write_report
from .spec import Experiment, RunPlan



def check_data(exp: Experiment, budget: str, configs: dict[str, Config]) -> None:
    """Every split the runs read is where each run will look, and its files pass the cheap
    checks (headers and sizes: :func:`check_split_files`, nothing loaded), else one
    DataError line."""
    seen = set()
    for cfg in configs.values():
        d = cfg.data
        key = (d.dataset, d.train_split, d.data_dir)
        if key in seen:
            continue
        seen.add(key)
        try:
            split_paths(d.dataset, d.train_split, d.data_dir)
            split_paths(d.dataset, "test", d.data_dir)
        except DataError as err:
            hint = dataset_spec(d.dataset).install_hint
            how = f"`{hint}` or " if hint else ""
            raise DataError(
                f"{exp.name} needs dataset {d.dataset!r}, which is not here: {err} (get it "
                f"with {how}`sigprop data download {d.dataset}`, or point --data-dir at it)"
            ) from None
        for split in dict.fromkeys((d.train_split, "test")):
            try:
                check_split_files(d.dataset, split, d.data_dir)
            except DataError as err:
                raise DataError(f"{exp.name} needs dataset {d.dataset!r}, whose split "
                                f"{split!r} cannot be read: {err}") from None


def check_runs(plans: list[RunPlan], configs: dict[str, Config]) -> None:
    """What ``sigprop train`` checks before a run starts, for every run planned: one
    process each (stages and replicas are ``sigprop train``'s), a device that exists,
    and a rule that trains its network on its data (each distinct one built once, on
    the CPU, and dropped)."""
    seen = set()
    for plan in plans:
        cfg = configs[plan.id]
        t, m, d = cfg.train, cfg.model, cfg.data
        where = f"run {plan.id}"
        if stage_count(t.stages, t.split) > 1 or t.replicas > 1:
            raise ConfigError(
                f"{where}: stages, split and replicas are settings of `sigprop train` (its "
                "processes); a reproduction trains each run in one process: drop them from "
                "the experiment")
        try:
            resolve_device(t.device)
        except SigpropError as err:
            raise ConfigError(f"{where}: {err}") from None
        key = (m.network, m.dropout, d.dataset, repr(cfg.rule.to_dict()))
        if key in seen:
            continue
        seen.add(key)
        spec = dataset_spec(d.dataset)
        try:
            network = build_network(m.network, spec.shape, spec.num_classes, m.dropout)
            build_rule(cfg.rule.name, network, spec.num_classes, cfg.rule)
        except ConfigError as err:
            raise ConfigError(f"{where}: rule {cfg.rule.name} on {m.network} ({d.dataset}): "
                              f"{err}") from None


def check_out(out: Path) -> None:
    """``out`` is a reproduction's folder or a new one: not a training run's, whose files
    a report would be written among."""
    check_output_folder(str(out), "--out")
    if (out / MANIFEST).exists():
        return
    found = [n for n in (*runio.RUN_FILES, STAGES_FILE) if (out / n).exists()]
    if found:
        raise ConfigError(f"--out {out} is a training run's folder (it holds {found[0]}), not "
                          "a reproduction's; give another --out")


def check_existing(plans: list[RunPlan], out: Path, configs: dict[str, Config]) -> None:
    """Runs already in ``out`` must be the runs planned (same settings, where and how they
    compute aside); else a ConfigError before anything trains."""
    for plan in plans:
        folder = run_dir(out, plan)
        path = folder / runio.CONFIG
        if not path.exists():
            continue
        recorded = runio.recorded_config(runio.read_run_config(path)["config"], path)
        # may differ: where and how it computes, not how long it trains (a longer
        # schedule differs from the start on: another run)
        where = set(resumable()) - {"train.epochs"}
        diff = {k: v for k, v in config_changes(recorded, configs[plan.id]).items()
                if k not in where}
        if diff:
            listed = "; ".join(f"{k} {a!r} (there) vs {b!r} (needed)" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{folder} holds a run with other settings than this reproduction needs "
                f"({listed}); give another --out, or remove that run folder")


def select(exp: Experiment, plans: list[RunPlan], only: tuple[str, ...] | None
           ) -> list[RunPlan]:
    """The plans of the rows and columns named in ``only`` (keys; a run is kept when its
    row is named or no row is, and its column is named or no column is)."""
    if not only:
        return plans
    rows, cols = {r.key for r in exp.rows}, {c.key for c in exp.columns}
    unknown = [k for k in only if k not in rows | cols]
    if unknown:
        raise ConfigError(
            f"--only: {', '.join(map(repr, unknown))} names no row or column of "
            f"{exp.name!r}; its rows: {', '.join(r.key for r in exp.rows)}; its columns: "
            f"{', '.join(c.key for c in exp.columns)}")
    want_rows = rows & set(only) or rows
    want_cols = cols & set(only) or cols
    kept = [p for p in plans if p.row.key in want_rows and p.column.key in want_cols]
    if not kept:
        raise ConfigError(f"--only {','.join(only)} selects no run of {exp.name!r} (each "
                          "named row skips each named column)")
    return kept


def reproduce(exp: Experiment, budget: str, out: Path, *, seeds: tuple[int, ...] | None = None,
              data_dir: str | None = None, device: str | None = None, progress: bool = True,
              argv: list[str] | None = None, log: TextIO | None = None,
              only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run what is not finished of ``exp`` under ``budget`` into ``out`` (of the rows and
    columns in ``only``, if given: :func:`select`), then write the report of every run
    the folder holds. Returns ``{"report": path, "failed": {run: error}, "ran": n,
    "skipped": n}``.

    A run that fails (a SigpropError: a diverging loss, a damaged file) is recorded in
    the manifest and its cell marked in the report; the others still run.
    """
    def say(msg: str) -> None:
        print(msg, file=log or sys.stdout, flush=True)

    out = Path(out)
    plans = select(exp, exp.runs(budget, seeds), only)
    configs = {p.id: planned_config(p, out, data_dir=data_dir, device=device, progress=progress)
               for p in plans}
    for cfg in configs.values():
        cfg.validate()
    if device is not None:
        resolve_device(device)  # no GPU here: one line now, not one failure per run
    check_data(exp, budget, configs)
    check_runs(plans, configs)
    check_out(out)
    previous = read_manifest(out)
    if previous is not None and (previous["experiment"].get("name") != exp.name
                                 or previous["budget"] != budget):
        raise ConfigError(
            f"{out} holds the {previous['budget']!r} reproduction of "
            f"{previous['experiment'].get('name')!r}; this is the {budget!r} one of "
            f"{exp.name!r}: give another --out")
    check_existing(plans, out, configs)

    folder = RunFolder.acquire(out, flag="--out", user="reproduction")
    try:
        manifest = previous or {"format": MANIFEST_FORMAT, "runs": [], "failed": {},
                                "invocations": []}
        runs = manifest["runs"] + [p.id for p in plans if p.id not in manifest["runs"]]
        manifest.update({"experiment": exp.raw, "origin": exp.origin, "budget": budget,
                         "runs": runs,
                         "options": {"data_dir": data_dir, "device": device},
                         "invocations": manifest["invocations"] + [{
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                             "argv": argv, **provenance()}]})
        write_manifest(out, manifest)
        ran = skipped = 0
        for i, plan in enumerate(plans, 1):
            cfg = configs[plan.id]
            state = run_state(run_dir(out, plan), cfg.train.epochs)
            what = f"[{i}/{len(plans)}] {plan.row.label} / {plan.column.label} / seed {plan.seed}"
            if state.status == "finished":
                say(f"{what}: finished before, skipped ({run_dir(out, plan)})")
                skipped += 1
                continue
            resume = state.status in ("partial", "unreadable")
            say(f"{what}: {'resuming' if resume else 'training'} {cfg.model.network} "
                f"({cfg.rule.name}, {cfg.train.epochs} epochs) in {run_dir(out, plan)}")
            try:
                Trainer(cfg, run_dir(out, plan), resume=resume, out=log).run()
            except SigpropError as err:
                reason = " ".join(str(err).split())
                manifest["failed"][plan.id] = reason
                write_manifest(out, manifest)
                say(f"{what}: failed: {reason}")
                continue
            ran += 1
            if manifest["failed"].pop(plan.id, None) is not None:
                write_manifest(out, manifest)
        report = write_report(out)
    finally:
        folder.release()
    return {"report": report, "failed": dict(manifest["failed"]), "ran": ran,
            "skipped": skipped}
