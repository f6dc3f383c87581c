"""An experiment file read and checked: the TOML of a table, as an :class:`.Experiment`.

A TOML file describes an experiment (``sigprop/experiments/paper/<name>.toml`` for the
built-in ones; any path for a user's own)::

    name = "table6-fmnist"                  # file stem; lowercase letters, digits, . and -
    title = "..."                           # one line
    source = "Table VI"                     # where the paper reports it
    note = "..."                            # optional: said above the table in the report
    metric = "test_error"                   # what the table shows (see METRICS)
    select = "last"                         # last epoch | best (the lowest over epochs)
    paper_dataset = "MNIST"                 # optional: the paper's numbers are on other data
    gaps = [["sigprop", "backprop"]]        # optional: also compare column differences
    row_heading = "network"                 # optional: the heading of the rows' labels

    [defaults]                              # config of every run: [data] [model] [rule] [train]
    data = { dataset = "fashion-mnist" }

    [[columns]]                             # in table order
    key = "backprop"                        # lowercase letters, digits, . and -
    label = "BP"
    rule = { name = "backprop" }            # config sections, over the defaults

    [[rows]]
    key = "fc-2x800"
    label = "FC 2x800"
    model = { network = "fc-2x800" }        # config sections, over the column's
    paper = { backprop = [1.60, 0.06], sigprop = 1.71, shallow = "n/a" }
    skip = []                               # optional: columns without a run in this row

    [budgets.full]                          # full, quick and smoke are all required
    seeds = [0, 1, 2, 3, 4]
    train = { epochs = 100 }                # config sections, over the row's

A row's ``paper`` names every column it runs: a number, ``[mean, std]``, or ``"n/a"``
when the paper has none. Rows and columns may hold ``budgets.<name>`` tables too (config
sections for one budget); :mod:`.spec` says how a run's configuration is layered. Every
key is checked where it is read: a typo, an unknown rule or network, a missing paper
number is one :class:`ConfigError` naming the file and the place.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from pathlib import Path
from typing import Any

from ..engine.config import MAX_SEED, SECTIONS, Config, apply_overrides, read_toml
from ..errors import ConfigError
from .spec import (
    BUDGETS,
    METRICS,
    NOT_REPORTED,
    SELECTS,
    Budget,
    Column,
    Experiment,
    PaperValue,
    Row,
)

BUILTIN_DIR = Path(__file__).parent / "paper"

_KEY = re.compile(r"[a-z0-9][a-z0-9.-]*")
MAX_TEXT = 300  # characters of a title, label, source or description: one line
MAX_NOTE = 5000  # characters of a note: a paragraph or two


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TOP_KEYS = {"name", "title", "source", "note", "metric", "select", "paper_dataset", "gaps",
             "row_heading",
             "defaults", "columns", "rows", "budgets"}
_COLUMN_KEYS = {"key", "label", "budgets", *SECTIONS}
_ROW_KEYS = {"key", "label", "paper", "paper_dataset", "skip", "budgets", *SECTIONS}
_BUDGET_KEYS = {"seeds", "description", *SECTIONS}


def builtin_names() -> list[str]:
    """Names of the experiments that ship with sigprop."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_experiment(name_or_path: str) -> Experiment:
    """A built-in experiment by name, or an experiment file by path (ends in .toml or
    holds a /); ConfigError for an unknown name or a bad file."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError("name an experiment (sigprop reproduce --list) or give a .toml file")
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
    else:
        path = BUILTIN_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown experiment {name_or_path!r}; choose one of: "
                              f"{', '.join(builtin_names())} (or give an experiment .toml file)")
    raw = read_toml(path, "experiment file")
    return parse_experiment(raw, str(path), expected_name=path.stem)


def parse_experiment(raw: Any, origin: str, expected_name: str | None = None) -> Experiment:
    """Check the table of an experiment file (module docstring) and build it."""
    p = _Place(origin)
    if not isinstance(raw, dict):
        raise p.error("an experiment is a TOML table")
    raw = copy.deepcopy(raw)
    p.keys(raw, _TOP_KEYS, "the file")
    name = p.string(raw, "name", "the file")
    if not _KEY.fullmatch(name):
        raise p.error(f"name {name!r} must be lowercase letters, digits, '.' and '-'")
    if expected_name is not None and name != expected_name:
        raise p.error(f"name {name!r} differs from the file's name {expected_name!r}; make "
                      "them the same")
    metric = p.string(raw, "metric", "the file")
    if metric not in METRICS:
        raise p.error(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    select = p.string(raw, "select", "the file", default="last")
    if select not in SELECTS:
        raise p.error(f"select must be one of {', '.join(SELECTS)}, got {select!r}")
    defaults = p.sections(raw.get("defaults", {}), "[defaults]", allow=set(SECTIONS))
    columns = tuple(_column(p, c, i) for i, c in enumerate(p.array(raw, "columns")))
    _unique(p, [c.key for c in columns], "column")
    keys = [c.key for c in columns]
    rows = tuple(_row(p, r, i, keys) for i, r in enumerate(p.array(raw, "rows")))
    _unique(p, [r.key for r in rows], "row")
    gaps = tuple(_gap(p, g, keys) for g in p.list(raw, "gaps", "the file", default=[]))
    budgets = _budgets(p, raw.get("budgets"), rows, columns)
    exp = Experiment(
        name=name, title=p.string(raw, "title", "the file"),
        source=p.string(raw, "source", "the file"),
        note=p.string(raw, "note", "the file", default=""), metric=metric, select=select,
        paper_dataset=p.string(raw, "paper_dataset", "the file", default="") or None,
        gaps=gaps, row_heading=p.string(raw, "row_heading", "the file", default=""),
        defaults=defaults, columns=columns, rows=rows, budgets=budgets,
        raw=raw, origin=origin)
    for budget in BUDGETS:  # every cell resolves to a valid run under every budget
        for row, col in exp.cells():
            exp.config(row, col, budget, 0)
    return exp


def _column(p: _Place, raw: Any, i: int) -> Column:
    key, where = p.entry(raw, "columns", i, _COLUMN_KEYS)
    return Column(key, p.string(raw, "label", where), p.sections(raw, where),
                  p.budget_tables(raw.get("budgets", {}), where))


def _row(p: _Place, raw: Any, i: int, columns: list[str]) -> Row:
    key, where = p.entry(raw, "rows", i, _ROW_KEYS)
    skip = tuple(p.list(raw, "skip", where, default=[]))
    for s in skip:
        if s not in columns:
            raise p.error(f"{where}: skip names {s!r}, which is no column; columns are: "
                          f"{', '.join(columns)}")
    paper_raw = raw.get("paper")
    if not isinstance(paper_raw, dict):
        raise p.error(f"{where} lacks its paper numbers: add paper = {{ column = value, ... }} "
                      f"(a number, [mean, std] or \"{NOT_REPORTED}\")")
    for k in paper_raw:
        if k not in columns:
            raise p.error(f"{where}: paper names {k!r}, which is no column; columns are: "
                          f"{', '.join(columns)}")
    paper: dict[str, PaperValue | None] = {}
    for col in columns:
        if col in skip:
            continue
        if col not in paper_raw:
            raise p.error(f"{where}: the paper value of column {col!r} is missing; give a "
                          f"number, [mean, std], or \"{NOT_REPORTED}\" if the paper has none")
        paper[col] = _paper_value(p, paper_raw[col], f"{where}: paper.{col}")
    return Row(key, p.string(raw, "label", where), p.sections(raw, where),
               p.budget_tables(raw.get("budgets", {}), where), paper,
               p.string(raw, "paper_dataset", where, default="") or None, skip)


def _paper_value(p: _Place, value: Any, where: str) -> PaperValue | None:
    if value == NOT_REPORTED:
        return None
    if _real(value):
        return PaperValue(float(value))
    if isinstance(value, list) and len(value) == 2 and all(_real(v) for v in value) \
            and value[1] >= 0:
        return PaperValue(float(value[0]), float(value[1]))
    raise p.error(f"{where} must be a number, [mean, std] (std >= 0) or \"{NOT_REPORTED}\", "
                  f"got {value!r}")


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _gap(p: _Place, raw: Any, columns: list[str]) -> tuple[str, str]:
    if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(c, str) for c in raw)):
        raise p.error(f"gaps holds {raw!r}; each gap is [column, column], e.g. "
                      "[\"sigprop\", \"backprop\"] for SP - BP")
    for c in raw:
        if c not in columns:
            raise p.error(f"gaps names {c!r}, which is no column; columns are: "
                          f"{', '.join(columns)}")
    return raw[0], raw[1]


def _budgets(p: _Place, raw: Any, rows: tuple[Row, ...], columns: tuple[Column, ...]
             ) -> dict[str, Budget]:
    if not isinstance(raw, dict):
        raise p.error("the file lacks its budgets: add [budgets.full], [budgets.quick] and "
                      "[budgets.smoke]")
    for name in raw:
        if name not in BUDGETS:
            raise p.error(f"unknown budget [budgets.{name}]; budgets are: {', '.join(BUDGETS)}")
    out = {}
    for name in BUDGETS:
        where = f"[budgets.{name}]"
        if name not in raw:
            raise p.error(f"the file lacks {where}; every experiment has full, quick and smoke")
        b = raw[name]
        if not isinstance(b, dict):
            raise p.error(f"{where} must be a table")
        p.keys(b, _BUDGET_KEYS, where)
        seeds = p.list(b, "seeds", where)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                and 0 <= s <= MAX_SEED for s in seeds):
            raise p.error(f"{where}: seeds must be a non-empty list of integers in "
                          f"0..{MAX_SEED}, got {seeds!r}")
        _unique(p, [str(s) for s in seeds], f"{where} seed")
        out[name] = Budget(name, tuple(seeds), p.string(b, "description", where, default=""),
                           p.sections(b, where))
    return out


def _unique(p: _Place, keys: list[str], what: str) -> None:
    seen = set()
    for k in keys:
        if k in seen:
            raise p.error(f"{what} {k!r} appears twice; give each its own key")
        seen.add(k)


class _Place:
    """Checks with messages that name the experiment file and the place in it."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"experiment file {self.origin}: {msg}")

    def keys(self, table: dict, allowed: set[str], where: str) -> None:
        for k in table:
            if k not in allowed:
                raise self.error(f"unknown key {k!r} in {where}; keys there are: "
                                 f"{', '.join(sorted(allowed))}")

    def string(self, table: dict, key: str, where: str, default: str | None = None) -> str:
        if key not in table:
            if default is not None:
                return default
            raise self.error(f"{where} lacks {key!r}")
        value = table[key]
        if not isinstance(value, str) or (default is None and not value.strip()):
            raise self.error(f"{key} in {where} must be a non-empty string, got "
                             f"{_short(value)}")
        limit = MAX_NOTE if key == "note" else MAX_TEXT
        if len(value) > limit:
            raise self.error(f"{key} in {where} is {len(value):,} characters long, more than "
                             f"the {limit:,} it may have; shorten it")
        return value

    def key(self, table: dict, where: str) -> str:
        key = self.string(table, "key", where)
        if not _KEY.fullmatch(key):
            raise self.error(f"{where}: key {key!r} must be lowercase letters, digits, '.' "
                             "and '-' (it names run folders)")
        return key

    def entry(self, raw: Any, array: str, i: int, allowed: set[str]) -> tuple[str, str]:
        """The key of ``array[i]``, a table with keys ``allowed``, and its place for
        messages (``column 'bp'``)."""
        where = f"{array}[{i}]"
        if not isinstance(raw, dict):
            raise self.error(f"{where} must be a table ([[{array}]])")
        self.keys(raw, allowed, where)
        key = self.key(raw, where)
        return key, f"{array[:-1]} {key!r}"

    def list(self, table: dict, key: str, where: str, default: list | None = None) -> list:
        if key not in table and default is not None:
            return default
        value = table.get(key)
        if not isinstance(value, list):
            raise self.error(f"{key} in {where} must be a list, got {value!r}")
        return value

    def array(self, table: dict, key: str) -> list:
        value = table.get(key)
        if not isinstance(value, list) or not value:
            raise self.error(f"the file lacks its {key}: add at least one [[{key}]] table")
        return value

    def sections(self, table: Any, where: str, allow: set[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
        """The config sections ([data] [model] [rule] [train]) of ``table``, each
        checked against the config's keys and types."""
        if not isinstance(table, dict):
            raise self.error(f"{where} must be a table")
        if allow is not None:
            self.keys(table, allow, where)
        out = {s: table[s] for s in SECTIONS if s in table}
        try:
            apply_overrides(Config(), out)
        except ConfigError as err:
            raise self.error(f"{where}: {err}") from None
        return out

    def budget_tables(self, table: Any, where: str) -> dict[str, dict[str, dict[str, Any]]]:
        if not isinstance(table, dict):
            raise self.error(f"budgets in {where} must be a table of budget tables")
        out = {}
        for name, sections in table.items():
            if name not in BUDGETS:
                raise self.error(f"unknown budget {name!r} in {where}; budgets are: "
                                 f"{', '.join(BUDGETS)}")
            out[name] = self.sections(sections, f"{where} budgets.{name}", allow=set(SECTIONS))
        return out
