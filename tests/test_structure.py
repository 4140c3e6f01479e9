"""The code base's own rules, checked on its source: short functions, no import cycle, one vocabulary."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from serval import vocab

PACKAGE = Path(__file__).resolve().parents[1] / "serval"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def serval_imports(path: Path) -> set[str]:
    """Every serval module this file imports, at the top or inside a function (lazy imports count)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("serval"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("serval"):
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from serval import model`
    modules = {module_name(p) for p in SOURCES}
    return {m for m in found if m in modules and m != me}


def test_the_import_graph_has_no_cycle():
    graph = {module_name(p): serval_imports(p) for p in SOURCES}
    # A module importing its own package (whose __init__ re-exports it) is not a cycle between modules.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # The check sees real edges: the network module's readers import it.
    assert "serval.model" in graph["serval.checkpoint"]


def test_model_imports_no_loading_code():
    network = {"serval.model_config", "serval.ecapa", "serval.masks"}  # split from model.py
    assert serval_imports(PACKAGE / "model.py") <= {"serval.vocab", "serval.features", *network}


MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def long_functions(path: Path, tree: ast.Module, limit: int) -> list[str]:
    """`path`'s functions over `limit` lines, as 'file:line name (n lines)'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                found.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    long = [f for path in SOURCES for f in long_functions(path, parsed(path), MAX_FUNCTION_LINES)]
    assert not long, long
    # The check is live: a 61-line function is caught.
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(Path("f.py"), ast.parse(f"def f():\n{body}\n"), MAX_FUNCTION_LINES)


def test_no_module_is_longer_than_500_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in SOURCES
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


VOCABULARY = {
    "EMOTIONS": vocab.EMOTIONS,
    "DIMENSIONS": vocab.DIMENSIONS,
    "SAMPLE_RATE": vocab.SAMPLE_RATE,
    "AUDIO_EXTENSIONS": vocab.AUDIO_EXTENSIONS,
}


def test_each_word_of_the_vocabulary_is_defined_once():
    """Only vocab.py assigns these names, and no other module writes their values out as literals."""
    # Exact copies only: the MERaLiON checkpoint's own dimension order is a different fact.
    values = {v for v in VOCABULARY.values() if isinstance(v, tuple)}
    found = []
    for path in SOURCES:
        if path.name == "vocab.py":
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                if names & VOCABULARY.keys():
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} assigns {sorted(names)}")
            if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts):
                literal = tuple(e.value for e in node.elts)
                if len(literal) > 2 and literal in values:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} writes {literal}")
    assert not found, found
    # The check is live: a copy of the class names is caught.
    copy = ast.parse(f"NAMES = {vocab.EMOTIONS!r}")
    assert any(
        isinstance(n, ast.Tuple) and tuple(e.value for e in n.elts) == vocab.EMOTIONS for n in ast.walk(copy)
    )
