"""The import structure of ``src/sigprop``: one direction, no circles.

Every import statement of every module counts, wherever it stands (at the top, in a
function, under ``TYPE_CHECKING``), relative ones resolved: a function-local import
cannot hide a circle. ``from X import Y`` is an import of module ``X.Y`` when that is a
module, else of ``X``. The modules form the layers of :data:`LAYERS`; a module imports
from its own layer and the layers below, never from one above; within a layer, modules
and sibling packages import each other only where that makes no circle. The scripts and
benchmarks take library code from the library, never from ``sigprop.cli``.

A failure is one line per offending import: file:line, the statement, and why.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "src" / "sigprop"
CLIENTS = ("scripts/", "benchmarks/")  # code outside the library that uses it

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("cli.py", "__main__.py")),
    ("runs", ("parallel/", "experiments/")),
    ("engine", ("engine/",)),
    ("rules", ("rules/", "__init__.py")),
    ("signals", ("signals/",)),
    ("networks and data", ("networks/", "data/")),
    ("functional", ("functional/",)),
    ("base", ("errors.py", "registry.py", "resources.py", "options.py")),
)
"""The architecture, top to bottom; a module is named by its path under src/sigprop, an
entry ending in "/" holds every module under that folder.

- cli: the command line, and nothing else.
- runs: many trainings: staged and replicated runs (parallel/), the paper's tables run
  and reported (experiments/).
- engine: one training: its config, the trainer, run folders, checkpoints, bench, meters.
- rules: the learning rules and the machinery only they use (sigprop's fast path,
  pipeline, sparse travel: rules/sigprop/), and the package's face
  (``sigprop/__init__.py``: what a rule's author imports).
- signals: sigprop's target generators.
- networks and data: the networks and their layers (input-statistics BatchNorm), the
  datasets and their loading.
- functional: the equations, as pure functions.
- base: errors, the registries, resource limits, small shared pieces (options).
"""

# Imports that break the rules today and are being removed, each with who removes it:
# (importer, imported) -> owner. An importer under scripts/ or benchmarks/ is named from
# the repository's root. Remove an entry with its import; a stale entry fails.
PENDING: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    importer: str  # path under src/sigprop (or from the repository's root for clients)
    imported: str  # path under src/sigprop
    line: int
    text: str  # the statement

    def where(self) -> str:
        prefix = "" if self.importer.startswith(CLIENTS) else "src/sigprop/"
        return f"{prefix}{self.importer}:{self.line}: `{self.text}`"


@functools.cache
def module_path(dotted: str) -> str | None:
    """The file of module ``sigprop.a.b`` as ``a/b.py`` or ``a/b/__init__.py``."""
    parts = dotted.split(".")
    if parts[0] != "sigprop":
        return None
    rel = Path(*parts[1:])
    if (PACKAGE / rel).with_suffix(".py").is_file() and parts[1:]:
        return rel.with_suffix(".py").as_posix()
    if (PACKAGE / rel / "__init__.py").is_file():
        return (rel / "__init__.py").as_posix()
    return None


def imports_of(file: Path, name: str, package: str) -> list[Import]:
    """Every import of a sigprop module in ``file`` (``name`` for messages; ``package``:
    the dotted package relative imports start from)."""
    out = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if module_path(f"{base}.{a.name}") else base
                       for a in node.names]
        for dotted in dict.fromkeys(targets):
            path = module_path(dotted)
            if path is not None and path != name:
                out.append(Import(name, path, node.lineno, ast.unparse(node)))
    return out


@functools.cache
def package_imports() -> tuple[Import, ...]:
    out: list[Import] = []
    for file in sorted(PACKAGE.rglob("*.py")):
        name = file.relative_to(PACKAGE).as_posix()
        dotted = ".".join(("sigprop", *file.relative_to(PACKAGE).parent.parts))
        out += imports_of(file, name, dotted)
    return tuple(out)


def layer_of(module: str) -> int | None:
    for i, (_, entries) in enumerate(LAYERS):
        if any(module == e or (e.endswith("/") and module.startswith(e)) for e in entries):
            return i
    return None


def circles(edges: Iterable[Import]) -> list[list[Import]]:
    """One circle (its imports, in order) per strongly connected group of modules."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        graph.setdefault(e.importer, {}).setdefault(e.imported, e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few hundred edges deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    out = []
    for group in groups:  # the shortest way from the group's first module back to it
        start = min(group)
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w == start:
                        cycle = paths[v] + [start]
                        break
                    if w in group and w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if cycle:
                    break
            frontier = nxt
        assert cycle is not None
        out.append([graph[a][b] for a, b in pairwise(cycle)])
    return out


def problems(edges: Sequence[Import]) -> list[str]:
    """One line per import that runs upward or closes a circle (PENDING aside)."""
    lines = []
    for e in edges:
        if (e.importer, e.imported) in PENDING:
            continue
        a, b = layer_of(e.importer), layer_of(e.imported)
        for m, layer in ((e.importer, a), (e.imported, b)):
            if layer is None:
                lines.append(f"{e.where()}: {m} is in no layer: add it to LAYERS")
        if a is not None and b is not None and b < a:
            lines.append(f"{e.where()}: upward: {e.importer} (layer {LAYERS[a][0]}) imports "
                         f"{e.imported} (layer {LAYERS[b][0]}, above it)")
    live = [e for e in edges if (e.importer, e.imported) not in PENDING]
    for cycle in circles(live):
        ring = " -> ".join([c.importer for c in cycle] + [cycle[0].importer])
        lines += [f"{c.where()}: circle {ring}" for c in cycle]
    return list(dict.fromkeys(lines))


def client_imports() -> list[Import]:
    out = []
    for folder in CLIENTS:
        for file in sorted((ROOT / folder).rglob("*.py")):  # folder ends in "/"
            out += imports_of(file, file.relative_to(ROOT).as_posix(), "")
    return out


def test_package_imports_run_one_way_without_circles():
    bad = problems(package_imports())
    assert not bad, "imports against the layers of tests/test_imports.py:\n" + "\n".join(bad)


def test_scripts_and_benchmarks_take_library_code_from_the_library():
    bad = [f"{e.where()}: imports sigprop.cli; take it from the library (move it there)"
           for e in client_imports()
           if e.imported == "cli.py" and (e.importer, e.imported) not in PENDING]
    assert not bad, "\n".join(bad)


def test_pending_imports_still_exist():
    """PENDING only shrinks: an entry whose import is gone is removed with it."""
    seen = {(e.importer, e.imported) for e in (*package_imports(), *client_imports())}
    stale = [f"PENDING lists {a} -> {b} ({who}), which no longer imports it: remove the entry"
             for (a, b), who in PENDING.items() if (a, b) not in seen]
    assert not stale, "\n".join(stale)


def test_the_checks_find_circles_upward_imports_and_strangers():
    """The checker itself, on a made-up graph."""
    def imp(a: str, b: str, line: int = 1) -> Import:
        return Import(a, b, line, f"import {b}")

    bad = problems([imp("engine/x.py", "rules/y.py"), imp("rules/y.py", "rules/z.py"),
                    imp("rules/z.py", "rules/y.py", 7), imp("signals/s.py", "engine/x.py"),
                    imp("nowhere.py", "errors.py")])
    assert len(bad) == 4, bad
    assert "src/sigprop/signals/s.py:1: `import engine/x.py`: upward" in bad[0]
    assert "nowhere.py is in no layer" in bad[1]
    assert bad[2].startswith("src/sigprop/rules/y.py:1:")
    assert bad[3].startswith("src/sigprop/rules/z.py:7:")
    assert bad[2].endswith("circle rules/y.py -> rules/z.py -> rules/y.py")
