"""The layout's promises, checked on the source: the two walls and no import cycles in ``src/lopa``."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lopa"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The lopa modules ``path`` imports (relative imports resolved); ``top_level_only`` keeps the
    ones that run at import time (not those inside functions, which cannot form an import cycle)."""
    tree = ast.parse(path.read_text())
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lopa")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lopa"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    modules = {_module(p) for p in SRC.rglob("*.py")}
    return {m for m in found if m in modules}


def _under(mod: str, banned: tuple[str, ...]) -> bool:
    return any(mod == b or mod.startswith(b + ".") for b in banned)


def _all() -> dict[str, Path]:
    return {_module(p): p for p in SRC.rglob("*.py")}


def test_serve_never_imports_methods_the_wrapper_or_the_trainer():
    # nor the user's side (the client, the gateway), which loads generators
    banned = ("lopa.methods", "lopa.model", "lopa.train", "lopa.baselines", "lopa.client", "lopa.gateway")
    for mod, path in _all().items():
        if mod.startswith("lopa.serve"):
            bad = sorted(i for i in _imports(path, top_level_only=False) if _under(i, banned))
            assert not bad, f"{mod} imports {bad}: the server must know no generator"


def test_methods_never_import_the_wrapper_trainer_or_server():
    banned = ("lopa.model", "lopa.train", "lopa.serve", "lopa.baselines", "lopa.client")
    for mod, path in _all().items():
        if mod.startswith("lopa.methods"):
            bad = sorted(i for i in _imports(path, top_level_only=False) if _under(i, banned))
            assert not bad, f"{mod} imports {bad}: a method maps features to Z, nothing more"


def test_no_import_cycles():
    graph = {mod: _imports(path, top_level_only=True) - {mod} for mod, path in _all().items()}
    # a package's __init__ importing its own submodules is how registries fill; not a cycle of design
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not (d.startswith(mod + ".") and _all()[mod].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
