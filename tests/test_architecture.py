"""The shape rules of docs/architecture.md, checked on the source: no import cycle between the
project's modules, no module using another module's `_private` name, and short functions in
`pipeline/` (a newcomer reads each one on one screen)."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("perl_core", "pipeline")
MAX_PIPELINE_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


MODULES = _modules()


def _absolute(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> tuple[set[str], list[str], dict[str, str]]:
    """(project modules imported, `_private` names imported from them, alias -> module)."""
    deps, private, aliases = set(), [], {}
    for n in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name in MODULES:
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(n, ast.ImportFrom):
            src = _absolute(module, n)
            if src is None:
                continue
            for a in n.names:
                full = f"{src}.{a.name}"
                if full in MODULES:  # a submodule
                    deps.add(full)
                    aliases[a.asname or a.name] = full
                elif src in MODULES:
                    deps.add(src)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{module}: from {src} import {a.name}")
    deps.discard(module)
    return deps, private, aliases


def _graph() -> dict[str, set[str]]:
    return {m: _imports(m)[0] for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_uses_another_modules_private_names():
    found = []
    for m in MODULES:
        _, private, aliases = _imports(m)
        found += private
        for n in ast.walk(ast.parse(MODULES[m].read_text())):
            if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                    and n.value.id in aliases and n.attr.startswith("_")
                    and not n.attr.startswith("__")):
                found.append(f"{m}: {aliases[n.value.id]}.{n.attr}")
    assert sorted(set(found)) == []


def test_pipeline_functions_are_short():
    long = defaultdict(int)
    for m, p in MODULES.items():
        if not m.startswith("pipeline"):
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = n.end_lineno - n.lineno + 1
                if lines > MAX_PIPELINE_FUNCTION_LINES:
                    long[f"{m}.{n.name}:{n.lineno}"] = lines
    assert dict(long) == {}


def test_perl_core_never_imports_pipeline():
    bad = [f"{m} -> {d}" for m, deps in _graph().items() if m.startswith("perl_core")
           for d in deps if d.startswith("pipeline")]
    assert bad == []

