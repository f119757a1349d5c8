"""The shape the code keeps (STYLE.md, the step-contract issue): no import cycles anywhere in the
package, counting imports inside functions and under TYPE_CHECKING too; the engine's modules
stay short enough to read in one sitting, and so do their functions."""

from __future__ import annotations

import ast
from pathlib import Path

import nanovllm

PACKAGE = Path(nanovllm.__file__).parent
ROOT = PACKAGE.parent
# The wheel installs these folders as subpackages (pyproject.toml's package-dir).
MAPPED = {"nanovllm.kernels": ROOT / "kernels", "nanovllm.tui": ROOT / "tui"}
MAX_ENGINE_MODULE_LINES = 300
MAX_ENGINE_FUNCTION_LINES = 40


def modules() -> dict[str, Path]:
    found = {}
    roots = {"nanovllm": PACKAGE, **MAPPED}
    for prefix, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    # A package's __init__ importing its own submodules is not a cycle of concepts.
    graph = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_planted_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_engine_modules_and_functions_stay_short():
    for path in sorted((PACKAGE / "engine").glob("*.py")):
        lines = path.read_text().splitlines()
        assert len(lines) <= MAX_ENGINE_MODULE_LINES, f"{path.name}: {len(lines)} lines"
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_ENGINE_FUNCTION_LINES, f"{path.name}:{node.name}: {length}"
