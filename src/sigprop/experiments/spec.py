"""An experiment as data: a table of runs, its budgets, and the configuration of each run.

An experiment is ``rows`` (e.g. networks) by ``columns`` (e.g. rules), each cell one
training configuration run for several seeds, with the paper's number for that cell.
Each budget (full, quick, smoke) gives the seeds and the settings that make the runs
shorter. A run's configuration is, in order: the defaults, the column's, the row's, the
budget's, the column's and then the row's for that budget, and the seed
(:meth:`Experiment.config`). A rule's own option (``head``, ``targets``, ...) set in the
defaults, a row or a budget applies to the columns whose rule takes it; set in a column,
it must be that column's rule's. :mod:`.read` reads and checks an experiment file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..data import find_dataset_dir
from ..engine.config import (
    Config,
    apply_overrides,
    compose,
    foreign_options,
    without_options,
)
from ..errors import ConfigError, SigpropError
from ..registry import NETWORKS, RULES

BUDGETS = ("full", "quick", "smoke")
NOT_REPORTED = "n/a"  # a paper value the paper does not give

# metric -> (heading, unit, lower is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "test_error": ("test error", "%", True),
    "test_acc": ("test accuracy", "%", False),
}
SELECTS = ("last", "best")


@dataclass(frozen=True)
class PaperValue:
    """The paper's number for a cell: mean and, where it gives one, the spread."""

    mean: float
    std: float | None = None

    def __str__(self) -> str:
        return f"{self.mean:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    overrides: dict[str, dict[str, Any]]
    budgets: dict[str, dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    overrides: dict[str, dict[str, Any]]
    budgets: dict[str, dict[str, dict[str, Any]]]
    paper: dict[str, PaperValue | None]  # column key -> value (None: the paper has none)
    paper_dataset: str | None
    skip: tuple[str, ...]


@dataclass(frozen=True)
class Budget:
    name: str
    seeds: tuple[int, ...]
    description: str
    overrides: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class RunPlan:
    """One training of a reproduction: a cell and a seed, with its configuration (no
    run folder, device or data folder yet: where it runs is the caller's)."""

    id: str  # "<row>_<column>_s<seed>": the run folder's name
    row: Row
    column: Column
    seed: int
    config: Config


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str
    note: str
    metric: str
    select: str
    paper_dataset: str | None
    gaps: tuple[tuple[str, str], ...]
    row_heading: str
    defaults: dict[str, dict[str, Any]]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    budgets: dict[str, Budget]
    raw: dict[str, Any] = field(repr=False)  # the file's table, for the manifest
    origin: str = ""  # the file it was read from

    def column(self, key: str) -> Column:
        return next(c for c in self.columns if c.key == key)

    def cells(self) -> Iterator[tuple[Row, Column]]:
        """Every (row, column) that has runs, in table order."""
        for row in self.rows:
            for col in self.columns:
                if col.key not in row.skip:
                    yield row, col

    def row_paper_dataset(self, row: Row) -> str | None:
        """The data the paper's numbers of ``row`` are on, when not the runs' own."""
        return row.paper_dataset or self.paper_dataset

    def config(self, row: Row, column: Column, budget: str, seed: int) -> Config:
        """The configuration of one run (ConfigError naming the place if a key is bad)."""
        where = f"{self.origin}: row {row.key!r}, column {column.key!r}, budget {budget!r}"
        layers = [
            ("[defaults]", self.defaults),
            (f"column {column.key!r}", column.overrides),
            (f"row {row.key!r}", row.overrides),
            (f"budgets.{budget}", self.budgets[budget].overrides),
            (f"column {column.key!r} budgets.{budget}", column.budgets.get(budget, {})),
            (f"row {row.key!r} budgets.{budget}", row.budgets.get(budget, {})),
            ("the seed", {"train": {"seed": seed}}),
        ]
        for what, overrides in layers:  # each layer checked alone, to name it
            try:
                apply_overrides(Config(), overrides)
            except ConfigError as err:
                raise ConfigError(f"{self.origin}: {what}: {err}") from None
        # the defaults, the rule's own (batch size, schedule, ...), then the layers
        cfg = compose(*((overrides, False) for _, overrides in layers))
        # [rule] options of the defaults, rows and budgets apply to the columns whose rule
        # takes them; a column's own must be its rule's (checked below)
        own = {k for what, o in layers if what.startswith("column") for k in o.get("rule", {})}
        cfg = without_options(cfg, foreign_options(cfg.rule.name, cfg.rule.options) - own)
        try:
            cfg.validate()
            RULES.get(cfg.rule.name)
            NETWORKS.get(cfg.model.network.partition("-")[0])
        except SigpropError as err:
            raise ConfigError(f"{where}: {err}") from None
        return cfg

    def runs(self, budget: str, seeds: tuple[int, ...] | None = None) -> list[RunPlan]:
        """Every run of ``budget`` (its seeds, or ``seeds``), in table order then seed."""
        if budget not in self.budgets:
            raise ConfigError(f"unknown budget {budget!r}; choose one of: {', '.join(BUDGETS)}")
        seeds = self.budgets[budget].seeds if seeds is None else seeds
        return [RunPlan(f"{row.key}_{col.key}_s{seed}", row, col, seed,
                        self.config(row, col, budget, seed))
                for row, col in self.cells() for seed in seeds]

    def splits(self, budget: str) -> list[tuple[str, str]]:
        """(dataset, training split) pairs the runs of ``budget`` read, in first-use order."""
        pairs: list[tuple[str, str]] = []
        for plan in self.runs(budget, seeds=(0,)):
            pair = (plan.config.data.dataset, plan.config.data.train_split)
            if pair not in pairs:
                pairs.append(pair)
        return pairs

    def datasets(self, budget: str) -> list[str]:
        """The datasets the runs of ``budget`` read, in first-use order."""
        names: list[str] = []
        for plan in self.runs(budget, seeds=(0,)):
            if plan.config.data.dataset not in names:
                names.append(plan.config.data.dataset)
        return names

    def describe(self, data_dir: str | None) -> str:
        """What ``sigprop reproduce --list`` says of it: the paper's source, where its
        datasets were found (in ``data_dir`` or the usual places), its rows and columns,
        and each budget's runs."""
        lines = [f"{self.name}: {self.title}", f"  paper: {self.source}"]
        for name in self.datasets("full"):
            try:
                where = f"found in {find_dataset_dir(name, data_dir)}"
            except SigpropError:
                where = f"not found (sigprop data download {name}; sigprop data check {name})"
            lines.append(f"  data: {name}, {where}")
        lines.append("  rows: " + ", ".join(f"{r.label} [{r.key}]" for r in self.rows))
        lines.append("  columns: " + ", ".join(f"{c.label} [{c.key}]" for c in self.columns))
        for budget in BUDGETS:
            plans = self.runs(budget)
            epochs = sum(p.config.train.epochs for p in plans)
            b = self.budgets[budget]
            lines.append(f"  {budget}: {len(plans)} runs (seeds {', '.join(map(str, b.seeds))}; "
                         f"{epochs} epochs in all)"
                         + (f": {b.description}" if b.description else ""))
        return "\n".join(lines)
