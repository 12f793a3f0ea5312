"""The package's house plan, checked on its source: layers, no cycles, sizes.

Every `fem_hpc` import counts: top-level, function-local and `TYPE_CHECKING` alike. Imports go
only down (or sideways within a layer) the list below, the module graph has no cycle, and a
function-local project import is allowed only in cli.py (it keeps `fem-hpc --help` fast).
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fem_hpc"

# Bottom first. A module belongs to the longest entry that is it or its package; a module no entry
# names fails the test (so a new module is placed on purpose, not by default at the bottom).
LAYERS: list[tuple[str, ...]] = [
    ("fem_hpc", "fem_hpc.model", "fem_hpc.layout", "fem_hpc.logs", "fem_hpc.backoff"),
    ("fem_hpc.config_retention", "fem_hpc.config", "fem_hpc.journal", "fem_hpc.metrics"),
    ("fem_hpc.policy", "fem_hpc.diskguard", "fem_hpc.staging", "fem_hpc.broker"),
    ("fem_hpc.executors", "fem_hpc.render"),
    ("fem_hpc.lifecycle",),
    ("fem_hpc.protocols", "fem_hpc.ops"),
    ("fem_hpc.service", "fem_hpc.client", "fem_hpc.plan", "fem_hpc.exits", "fem_hpc.orchestrate", "fem_hpc.cli"),
]
# Allowed limits (lines) and the two modules the issue exempts from the module limit.
MODULE_LIMIT, CLASS_LIMIT = 500, 300
EXEMPT = {"fem_hpc.protocols.legacy.literal", "fem_hpc.protocols.legacy.mapping"}


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".")
        is_pkg = modules()[module].name == "__init__.py"
        base = base if is_pkg else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{a.name}" for a in node.names]
    return [target, *names]


def imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported fem_hpc module, line, function-local) for every import of `module`."""
    known = modules()
    tree = ast.parse(path.read_text())
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
                   for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            candidates = _resolve(module, node)
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for cand in candidates:
            if cand in known and cand != module:
                out.append((cand, node.lineno, id(node) in local_nodes))
    return out


def layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            # the bare package root holds only __version__: it names itself, not every module under it
            inside = module.startswith(name + ".") and name != "fem_hpc"
            if (module == name or inside) and (best is None or len(name) > best[1]):
                best = (i, len(name))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m, p)} for m, p in modules().items()}


def test_every_import_points_down() -> None:
    wrong = []
    for module, path in modules().items():
        for target, line, _ in imports(module, path):
            if target == "fem_hpc":
                continue  # the package root holds only __version__
            if layer(target) > layer(module):
                wrong.append(f"{path.relative_to(ROOT)}:{line} {module} (layer {layer(module)}) imports "
                             f"{target} (layer {layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:  # the graph is small: recursion is fine
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if nxt == "fem_hpc":
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_function_local_project_imports_only_in_cli() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {target} inside a function"
             for module, path in modules().items() if module != "fem_hpc.cli"
             for target, line, local in imports(module, path) if local]
    assert not wrong, "\n".join(wrong)


def test_sizes() -> None:
    big = []
    for module, path in modules().items():
        text = path.read_text()
        n = text.count("\n")
        if n > MODULE_LIMIT and module not in EXEMPT:
            big.append(f"{path.relative_to(ROOT)}: {n} lines (limit {MODULE_LIMIT})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > CLASS_LIMIT:
                    big.append(f"{path.relative_to(ROOT)}: class {node.name} is {size} lines (limit {CLASS_LIMIT})")
    assert not big, "\n".join(big)


def test_lifecycle_knows_no_protocol() -> None:
    """No reply queue, exchange or protocol string is decided in the lifecycle: the Route is passed
    through opaquely and the frontend of its protocol builds every message."""
    pattern = re.compile(r"reply_to|correlation_id|exchange|protocol ==|== \"v1\"|\"legacy\"")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((PKG / "lifecycle").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_wheel_lists_every_package() -> None:
    """pyproject lists the packages explicitly (the top-level templates/ are mapped into the wheel),
    so a new package directory must be listed there or a non-editable install would miss it."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")} | {"fem_hpc.templates"}
    assert listed == found, (sorted(found - listed), sorted(listed - found))
    assert sorted(p.name for p in (ROOT / "templates").glob("*.j2")), "templates/ holds the job templates"


def test_observers_carry_no_replies() -> None:
    """Only the CLI hangs display hooks on the lifecycle; replies are a frontend's business."""
    hits = [f"{p.relative_to(ROOT)}" for p in PKG.rglob("*.py")
            if "observers.append" in p.read_text() and p.name != "cli.py"]
    assert not hits, hits


def test_a_module_no_layer_names_is_refused() -> None:
    with pytest.raises(AssertionError, match="is in no layer"):
        layer("fem_hpc.somewhere_new")
    assert layer("fem_hpc") == 0 and layer("fem_hpc.protocols.legacy.codec") == layer("fem_hpc.ops")
