"""The report of a reproduction: our numbers beside the paper's, from the run folders.

``write_report(out)`` reads ``out/reproduce.json`` and every run folder it names, and
writes ``report.md`` (tables in the paper's layout, plots, the commands behind every
cell, machine, versions and commit), ``report.json`` (the same numbers) and
``plots/*.png``. It trains nothing, so ``sigprop report OUT`` rebuilds it at any time. A
cell whose runs are missing, unfinished or failed is marked, never guessed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import runio
from ..engine.config import MAX_SEED, train_command
from ..errors import CheckpointError, ConfigError
from . import plots
from .manifest import MANIFEST, planned_config, read_manifest, run_dir, run_state
from .provenance import describe_machine, source_commit
from .read import parse_experiment
from .spec import METRICS, Column, Experiment, PaperValue, Row, RunPlan

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOTS = "plots"
# flags every cell's command shows, default or not: what the cell is
_ALWAYS = ("data.dataset", "model.network", "rule.name", "train.epochs", "train.seed")


@dataclass
class RunResult:
    plan: RunPlan
    status: str  # finished | partial | absent | failed | unreadable | damaged
    epochs: int  # epochs in its metrics
    planned: int  # epochs it is to train
    value: float | None  # the metric (finished runs only)
    epoch: int | None  # the epoch the value is from
    history: list[dict[str, Any]]
    command: str
    detail: str = ""  # why it failed / is unreadable
    # a partial run's metric over the epochs it has (best so far, or its last epoch), shown
    # beside it and never averaged with finished runs
    so_far: tuple[float, int | None] | None = None

    @property
    def mark(self) -> str:
        """Short status for a table cell: '' when finished."""
        running = f"running {self.epochs}/{self.planned} epochs"
        if self.so_far is not None:
            v, e = self.so_far
            running += f", so far {v:.2f} (epoch {e})"
        return {"finished": "", "partial": running,
                "absent": "not run", "failed": "failed",
                "unreadable": "unreadable", "damaged": "damaged"}[self.status]


@dataclass
class Cell:
    row: Row
    column: Column
    runs: list[RunResult]
    paper: PaperValue | None
    comparable: bool  # the paper's number is on the same data as ours
    values: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.values = [r.value for r in self.runs if r.value is not None]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def diff(self) -> float | None:
        if not self.comparable or self.paper is None or self.mean is None:
            return None
        return self.mean - self.paper.mean

    @property
    def missing(self) -> list[RunResult]:
        return [r for r in self.runs if r.status != "finished"]

    def ours(self) -> str:
        """``10.29 ± 0.08 (n=2)``, with what is missing marked."""
        marks = sorted({r.mark for r in self.missing})
        if self.mean is None:
            return "; ".join(marks) if marks else "-"
        text = f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "") \
            + f" (n={len(self.values)})"
        if self.missing:
            text += f" [{len(self.missing)} of {len(self.runs)}: {', '.join(marks)}]"
        return text


def _seed_text(text: str) -> bool:
    """A run id's seed part: ASCII digits of a seed sigprop accepts."""
    return text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= MAX_SEED


def _metric(record: dict[str, Any], metric: str) -> float | None:
    acc = record.get("test_acc")
    if not isinstance(acc, (int, float)):
        return None
    return 100.0 * (1.0 - acc) if metric == "test_error" else 100.0 * acc


def _select(history: list[dict[str, Any]], planned: int, metric: str, select: str
            ) -> tuple[float | None, int | None]:
    """The metric of the last planned epoch, or the best over the run."""
    history = history[:planned]
    if not history:
        return None, None
    if select == "last":
        return _metric(history[-1], metric), history[-1].get("epoch")
    lower = METRICS[metric][2]
    scored = [(v, r.get("epoch")) for r in history if (v := _metric(r, metric)) is not None]
    if not scored:
        return None, None
    return min(scored) if lower else max(scored)


def collect(out: Path) -> tuple[Experiment, dict[str, Any], list[Cell]]:
    """The experiment recorded in ``out``, its manifest, and every cell's runs."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise CheckpointError(f"{out} holds no reproduction ({MANIFEST} is missing); give the "
                              "--out folder of a `sigprop reproduce`")
    try:
        exp = parse_experiment(manifest["experiment"], f"{out / MANIFEST} (its experiment)")
    except ConfigError as err:
        raise CheckpointError(f"the experiment recorded in {out / MANIFEST} no longer reads "
                              f"with this sigprop: {err}") from None
    budget = manifest["budget"]
    if budget not in exp.budgets:
        raise CheckpointError(f"{out / MANIFEST} is damaged: unknown budget {budget!r}")
    listed = set(manifest["runs"])
    seeds = sorted({int(r.rsplit("_s", 1)[1]) for r in listed
                    if _seed_text(r.rsplit("_s", 1)[-1])} | set(exp.budgets[budget].seeds))
    options = manifest["options"]
    by_cell: dict[tuple[str, str], list[RunResult]] = {}
    for plan in exp.runs(budget, tuple(seeds)):
        if plan.id not in listed:
            continue
        cfg = planned_config(plan, out, data_dir=options.get("data_dir"),
                             device=options.get("device"), progress=True)
        planned = cfg.train.epochs
        state = run_state(run_dir(out, plan), planned)
        history: list[dict[str, Any]] = []
        if state.status in ("finished", "partial"):
            history = runio.read_history(run_dir(out, plan))
        status, detail = state.status, state.detail
        if plan.id in manifest["failed"] and status != "finished":
            status, detail = "failed", str(manifest["failed"][plan.id])
        value = epoch = so_far = None
        picked = _select(history, planned, exp.metric, exp.select)
        if status == "finished":
            value, epoch = picked
            if value is None:
                status, detail = "damaged", "its metrics hold no test accuracy"
        elif status == "partial" and picked[0] is not None:
            so_far = picked
        cmd = train_command(cfg, always=_ALWAYS)
        by_cell.setdefault((plan.row.key, plan.column.key), []).append(RunResult(
            plan, status, len(history), planned, value, epoch, history, cmd, detail, so_far))
    cells = []
    for row, col in exp.cells():
        runs = by_cell.get((row.key, col.key), [])
        cells.append(Cell(row, col, runs, row.paper.get(col.key),
                          comparable=exp.row_paper_dataset(row) is None))
    return exp, manifest, cells


def _fmt_diff(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _table(exp: Experiment, cells: list[Cell]) -> list[str]:
    other = any(exp.row_paper_dataset(r) for r in exp.rows)
    deltas = any(exp.row_paper_dataset(r) is None for r in exp.rows)  # any Δ to show
    head = [exp.row_heading]
    if other:
        head.append("paper's data")
    for col in exp.columns:
        head += [f"{col.label} ours", f"{col.label} paper"] + (["Δ"] if deltas else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    index = {(c.row.key, c.column.key): c for c in cells}
    for row in exp.rows:
        line = [row.label]
        if other:
            line.append(exp.row_paper_dataset(row) or "same")
        for col in exp.columns:
            cell = index.get((row.key, col.key))
            if cell is None:  # skipped in this row
                line += ["", ""] + ([""] if deltas else [])
                continue
            line += [cell.ours(), str(cell.paper) if cell.paper else "n/a"]
            line += [_fmt_diff(cell.diff)] if deltas else []
        lines.append("| " + " | ".join(line) + " |")
    return lines


def _gap_table(exp: Experiment, cells: list[Cell]) -> list[str]:
    index = {(c.row.key, c.column.key): c for c in cells}
    head = [""]
    for a, b in exp.gaps:
        la, lb = exp.column(a).label, exp.column(b).label
        head += [f"{la} − {lb} ours", f"{la} − {lb} paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in exp.rows:
        line = [row.label + (f" ({exp.row_paper_dataset(row)} in the paper)"
                             if exp.row_paper_dataset(row) else "")]
        for a, b in exp.gaps:
            ca, cb = index.get((row.key, a)), index.get((row.key, b))
            ours = paper = None
            if ca and cb and ca.mean is not None and cb.mean is not None:
                ours = ca.mean - cb.mean
            if ca and cb and ca.paper and cb.paper:
                paper = ca.paper.mean - cb.paper.mean
            line += [_fmt_diff(ours), _fmt_diff(paper)]
        lines.append("| " + " | ".join(line) + " |")
    return lines


def _plots(exp: Experiment, cells: list[Cell], out: Path) -> dict[str, Path]:
    curve_panels, exit_panels = [], []
    for row in exp.rows:
        series = []
        for cell in (c for c in cells if c.row.key == row.key):
            hist = [r.history for r in cell.runs if r.history]
            if hist:
                series.append(plots.Series(cell.column.label, hist))
                exit_panels.append(plots.Panel(f"{row.label}, {cell.column.label}",
                                               [plots.Series(cell.column.label, hist)]))
        curve_panels.append(plots.Panel(row.label, series))
    made = {}
    title = f"{exp.name}: {exp.title}"
    if (p := plots.learning_curves(curve_panels, out / PLOTS / "curves.png", title)):
        made["curves"] = p
    if (p := plots.exit_curves(exit_panels, out / PLOTS / "exits.png",
                               f"{exp.name}: early-exit test accuracy per layer")):
        made["exits"] = p
    aligned = [plots.Series(f"{c.row.label}, {c.column.label}", [r.history for r in c.runs
                                                                  if r.history][:1])
               for c in cells if any(r.history for r in c.runs)]
    if (p := plots.alignment_curves(aligned, out / PLOTS / "alignment.png",
                                    f"{exp.name}: weight alignment around the loop (Fig. 4)")):
        made["alignment"] = p
    for stale in ("curves", "exits", "alignment"):  # a figure that can no longer be drawn
        if stale not in made:
            (out / PLOTS / f"{stale}.png").unlink(missing_ok=True)
    return made


def _check_targets(out: Path) -> None:
    """Every path the report writes can be written: the plots folder is a folder (or
    absent), the files are not folders; else one ConfigError naming the path."""
    plots_dir = out / PLOTS
    if plots_dir.exists() and not plots_dir.is_dir():
        raise ConfigError(f"{plots_dir} is a file where the report puts its plots folder; "
                          "move or delete it, then run sigprop report again")
    targets = [out / REPORT_MD, out / REPORT_JSON] + [
        plots_dir / f"{name}.png" for name in ("curves", "exits", "alignment")]
    for path in targets:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder where the report writes a file; move or "
                              "delete it, then run sigprop report again")


def write_report(out: Path) -> Path:
    """Write ``report.md``, ``report.json`` and the plots of the reproduction in ``out``."""
    out = Path(out)
    exp, manifest, cells = collect(out)
    budget = exp.budgets[manifest["budget"]]
    _check_targets(out)  # before any file changes
    made = _plots(exp, cells, out)
    heading, unit, lower = METRICS[exp.metric]
    runs = [r for c in cells for r in c.runs]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    seeds = sorted({r.plan.seed for r in runs})
    which = "of the last epoch" if exp.select == "last" else \
        "of the best epoch (lowest over the run, selected on the test set as the paper does)"
    md = [f"# {exp.name}: {exp.title}", ""]
    md += [f"Paper: {exp.source}.", ""]
    md += [f"Budget **{budget.name}**" + (f" ({budget.description})" if budget.description
                                          else "") + f"; seeds {', '.join(map(str, seeds))}; "
           f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
           + ".", ""]
    if exp.note:
        md += [exp.note, ""]
    md += [f"## {heading.capitalize()} ({unit}) {which}", ""]
    other = [r.label for r in exp.rows if exp.row_paper_dataset(r)]
    md += ["Ours: mean ± std over seeds (n seeds); paper: as printed"
           + ("" if len(other) == len(exp.rows) else "; Δ = ours − paper")
           + f" ({'lower' if lower else 'higher'} is better)."
           + (" The paper's numbers of " + ("every row" if len(other) == len(exp.rows)
                                            else ", ".join(other))
              + " are on other data (the column \"paper's data\"): for orientation only, "
              "not compared" + ("; compare the gaps between columns below." if exp.gaps
                                else ".") if other else ""), ""]
    md += _table(exp, cells) + [""]
    md += _column_settings(exp) + [""]
    if exp.gaps:
        md += ["### Gaps between columns (what carries over between data sets)", ""]
        md += _gap_table(exp, cells) + [""]
    if made:
        md += ["## Plots", ""]
        if "curves" in made:
            md += [("Learning curves: test error and training loss per epoch, mean over seeds "
                    "(band: ± one std)."), "", f"![learning curves]({PLOTS}/curves.png)", ""]
        if "exits" in made:
            md += ["Early exits: test accuracy of every layer's own prediction per epoch.", "",
                   f"![early exits]({PLOTS}/exits.png)", ""]
        if "alignment" in made:
            md += [("Alignment (Fig. 4): the angle of each matrix around the loop with the "
                    "product of the others, per sample, mean ± std per epoch (first seed)."),
                   "", f"![alignment]({PLOTS}/alignment.png)", ""]
    md += ["## Runs", "", (f"Each cell's runs; every line's command trains that run alone. "
                           f"All of them: `sigprop reproduce {exp.name} --budget "
                           f"{budget.name} --out {out}`{_options(manifest)}."), ""]
    md += [f"| run | status | epochs | {heading} ({unit}) | s/epoch | command |",
           "|---|---|---|---|---|---|"]
    for r in runs:
        secs = [h["epoch_time_s"] for h in r.history
                if isinstance(h.get("epoch_time_s"), (int, float))]
        status = (r.status + (f": {r.detail}" if r.detail else "")).replace("|", "/")
        value = "-" if r.value is None else f"{r.value:.2f}"
        if r.so_far is not None:
            value = f"{r.so_far[0]:.2f} so far (epoch {r.so_far[1]})"
        per_epoch = f"{statistics.fmean(secs):.1f}" if secs else "-"
        md.append(f"| {r.plan.id} | {status} | {r.epochs}/{r.planned} | {value} | "
                  f"{per_epoch} | `{r.command}` |")
    md += ["", "## Where these numbers come from", ""]
    for inv in manifest["invocations"]:
        if not isinstance(inv, dict):
            continue
        m = inv.get("machine") if isinstance(inv.get("machine"), dict) else {}
        v = inv.get("versions") if isinstance(inv.get("versions"), dict) else {}
        md.append(f"- {inv.get('started', '?')}: `{' '.join(inv.get('argv') or ['?'])}` on "
                  f"{describe_machine(m)}; sigprop {v.get('sigprop', '?')}, torch "
                  f"{v.get('torch', '?')}, Python {v.get('python', '?')}, "
                  f"{v.get('platform', '?')}; commit {inv.get('commit', '?')}")
    md += ["", (f"Report written {time.strftime('%Y-%m-%d %H:%M:%S %z')} from the run "
                f"folders (`sigprop report {out}`), code at commit {source_commit()}."), ""]
    runio.atomic_write_text(out / REPORT_MD, "\n".join(md))
    runio.atomic_write_text(out / REPORT_JSON, runio.strict_dumps(_as_json(exp, manifest, cells, made),
                                                          indent=2) + "\n")
    return out / REPORT_MD


def _column_settings(exp: Experiment) -> list[str]:
    """One line per column: the settings it gives beside the experiment's defaults (what a
    reader needs to know which variant of a rule each column ran)."""
    lines = ["Columns: the settings each gives (the rest: the defaults of the experiment and "
             "of each rule).", ""]
    for col in exp.columns:
        given = [f"{section}.{k} = {v}" for section, values in col.overrides.items()
                 for k, v in values.items()]
        lines.append(f"- {col.label}: " + (", ".join(given) if given else "the defaults"))
    return lines


def _options(manifest: dict[str, Any]) -> str:
    o = manifest["options"]
    return "".join(f" {flag} {o[k]}" for k, flag in (("data_dir", "--data-dir"),
                                                      ("device", "--device")) if o.get(k))


def _as_json(exp: Experiment, manifest: dict[str, Any], cells: list[Cell],
             made: dict[str, Path]) -> dict[str, Any]:
    return {
        "experiment": exp.name, "title": exp.title, "budget": manifest["budget"],
        "metric": exp.metric, "select": exp.select, "unit": METRICS[exp.metric][1],
        "cells": [{
            "row": c.row.key, "column": c.column.key, "n": len(c.values), "mean": c.mean,
            "std": c.std, "values": c.values,
            "paper": None if c.paper is None else {"mean": c.paper.mean, "std": c.paper.std},
            "paper_dataset": exp.row_paper_dataset(c.row), "diff": c.diff,
            "runs": [{"run": r.plan.id, "seed": r.plan.seed, "status": r.status,
                      "epochs": r.epochs, "planned_epochs": r.planned, "value": r.value,
                      "epoch": r.epoch, "detail": r.detail, "command": r.command,
                      "so_far": None if r.so_far is None else
                      {"value": r.so_far[0], "epoch": r.so_far[1]}}
                     for r in c.runs],
        } for c in cells],
        "plots": {k: f"{PLOTS}/{v.name}" for k, v in made.items()},
    }
