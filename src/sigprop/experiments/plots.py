"""PNG figures of training runs, drawn with matplotlib's Agg canvas (no display, no
global pyplot state): learning curves and early-exit accuracy per layer.

A *series* is one labelled curve family: the histories (``metrics.jsonl`` records) of one
configuration over its seeds; a panel draws the mean over the seeds that reached each
epoch, with a band of one standard deviation where there are two or more.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..engine.runio import atomic_write_bytes

History = list[dict[str, Any]]

PANEL_W, PANEL_H = 5.2, 3.2  # inches per panel
DPI = 110


@dataclass
class Series:
    label: str
    histories: list[History]  # one per seed


@dataclass
class Panel:
    title: str
    series: list[Series]


def _mean_band(histories: list[History], value: Callable[[dict[str, Any]], float | None]
               ) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std over the histories that have each epoch (and the value)."""
    longest = max((len(h) for h in histories), default=0)
    epochs, means, stds = [], [], []
    for e in range(longest):
        vals = [v for h in histories if len(h) > e
                if (v := value(h[e])) is not None and math.isfinite(v)]
        if not vals:
            continue
        epochs.append(e + 1)
        means.append(statistics.fmean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return epochs, means, stds


def _draw(ax, series: list[Series], value: Callable[[dict[str, Any]], float | None],
          show_n: bool = True) -> bool:
    """Draw each series' mean (and band) of ``value``; whether anything was drawn."""
    drawn = False
    for s in series:
        epochs, means, stds = _mean_band(s.histories, value)
        if not epochs:
            continue
        n = len(s.histories)
        line, = ax.plot(epochs, means, marker="o" if len(epochs) < 3 else None, markersize=3,
                        label=s.label + (f" (n={n})" if n > 1 and show_n else ""))
        if any(stds):
            ax.fill_between(epochs, [m - d for m, d in zip(means, stds)],
                            [m + d for m, d in zip(means, stds)], color=line.get_color(),
                            alpha=0.2, linewidth=0)
        drawn = True
    return drawn


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _percent(key: str, complement: bool = False) -> Callable[[dict[str, Any]], float | None]:
    def get(record: dict[str, Any]) -> float | None:
        v = record.get(key)
        if not isinstance(v, (int, float)):
            return None
        return 100.0 * (1.0 - v if complement else v)
    return get


def _number(key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(record: dict[str, Any]) -> float | None:
        v = record.get(key)
        return float(v) if isinstance(v, (int, float)) else None
    return get


def learning_curves(panels: Sequence[Panel], path: Path, title: str) -> Path | None:
    """One row per panel: test error (%) and training loss per epoch of every series.
    None (nothing written) when no panel has a finished epoch."""
    if not panels:
        return None
    fig = Figure(figsize=(2 * PANEL_W, PANEL_H * len(panels) + 0.6), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    anything = False
    for (err_ax, loss_ax), panel in zip(axes, panels):
        drew = _draw(err_ax, panel.series, _percent("test_acc", complement=True))
        _draw(loss_ax, panel.series, _number("train_loss"))
        anything |= drew
        err_ax.set_title(f"{panel.title}: test error")
        err_ax.set_ylabel("test error (%)")
        loss_ax.set_title(f"{panel.title}: training loss")
        loss_ax.set_ylabel("training loss (each rule's own)")
        for ax in (err_ax, loss_ax):
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if drew:
                ax.legend(fontsize="small")
    if not anything:
        return None
    fig.suptitle(title)
    return _save(fig, path)


def exit_curves(panels: Sequence[Panel], path: Path, title: str) -> Path | None:
    """One panel per (configuration): test accuracy (%) of every early exit per epoch,
    mean over seeds. Each panel holds exactly one series; its exits become the curves.
    None when no panel has a run with more than one exit."""
    panels = [p for p in panels if p.series and _exit_names(p.series[0].histories)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(PANEL_W * cols, PANEL_H * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        histories = panel.series[0].histories
        for name in _exit_names(histories):
            _draw(ax, [Series(name, histories)],
                  lambda r, name=name: _exit_acc(r, name), show_n=False)
        ax.set_title(panel.title + (f" (n={len(histories)})" if len(histories) > 1 else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def alignment_curves(series: Sequence[Series], path: Path, title: str) -> Path | None:
    """Fig. 4: one panel per run (or configuration), the angle of each loop matrix with
    the product of the others (``alignment_deg``, mean per epoch) with a band of
    ``alignment_std_deg``; a dotted line at 90 degrees (no alignment). None when no run
    logged alignment."""
    series = [s for s in series if any(isinstance(r.get("alignment_deg"), dict)
                                       for h in s.histories for r in h)]
    if not series:
        return None
    fig = Figure(figsize=(PANEL_W * len(series), PANEL_H + 0.6), layout="constrained")
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, s in zip(axes, series):
        history = s.histories[0]
        names = sorted({k for r in history for k in (r.get("alignment_deg") or {})})
        for name in names:
            pts = [(r["epoch"], r["alignment_deg"][name],
                    (r.get("alignment_std_deg") or {}).get(name, 0.0))
                   for r in history if name in (r.get("alignment_deg") or {})]
            epochs, means, stds = zip(*pts)
            line, = ax.plot(epochs, means, marker="o" if len(epochs) < 3 else None,
                            markersize=3, label=name)
            ax.fill_between(epochs, [m - d for m, d in zip(means, stds)],
                            [m + d for m, d in zip(means, stds)], color=line.get_color(),
                            alpha=0.2, linewidth=0)
        ax.axhline(90, color="grey", linestyle=":", linewidth=1)
        ax.set_title(s.label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("angle (degrees)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def _exit_names(histories: list[History]) -> list[str]:
    """The exits of the runs' records when there is more than one (early exits)."""
    for h in histories:
        if h and isinstance(h[0].get("test_acc_exits"), dict):
            names = list(h[0]["test_acc_exits"])
            return names if len(names) > 1 else []
    return []


def _exit_acc(record: dict[str, Any], name: str) -> float | None:
    exits = record.get("test_acc_exits")
    v = exits.get(name) if isinstance(exits, dict) else None
    return 100.0 * v if isinstance(v, (int, float)) else None


def plot_runs(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """``curves.png`` (every run's test error and training loss), for runs with early
    exits ``exits.png``, for runs that logged alignment ``alignment.png``, in ``out``; a
    run folder without metrics is a CheckpointError naming it (before anything is
    drawn)."""
    from ..engine.runio import read_history
    from ..errors import CheckpointError

    series = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise CheckpointError(f"{d} is not a run folder (not a folder); give the folder of "
                                  "a `sigprop train` run")
        history = read_history(d)
        if not history:
            raise CheckpointError(f"{d} holds no finished epoch yet (no metrics.jsonl records); "
                                  "plot it after its first epoch")
        series.append(Series(d.resolve().name or str(d), [history]))
    made = []
    curves = learning_curves([Panel("runs", series)], Path(out) / "curves.png",
                             "learning curves")
    if curves:
        made.append(curves)
    exits = exit_curves([Panel(s.label, [s]) for s in series], Path(out) / "exits.png",
                        "early-exit test accuracy per layer")
    if exits:
        made.append(exits)
    aligned = alignment_curves(series, Path(out) / "alignment.png",
                               "weight alignment around the loop (Fig. 4)")
    if aligned:
        made.append(aligned)
    return made
