"""How the packages import each other: no circle, and only in the allowed direction (docs/architecture.md)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("microdit", "dataprep", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:                 # `import a.b.c` of a function's module: a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}                            # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found[found.index(found[-1]):]
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "microdit.training.loop" in graph["microdit.training.stages"]
    assert "microdit.training.distributed" in graph["microdit.training.loop"]    # `from . import distributed`
    assert "microdit.model" in graph["microdit.training.loop"]                   # inside build_model
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_circle():
    assert _cycle(import_graph()) is None, f"import circle: {' -> '.join(_cycle(import_graph()))}"


def test_packages_import_one_way():
    """flows -> dataprep -> microdit; the libraries never import Prefect or the flows."""
    for name, targets in import_graph().items():
        pkg = name.split(".")[0]
        if pkg != "flows":
            assert not {t for t in targets if t.startswith("flows")}, f"{name} imports the flows"
        if pkg == "microdit":
            assert not {t for t in targets if t.startswith("dataprep")}, f"{name} imports dataprep"
    for pkg in ("microdit", "dataprep"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                assert not [n for n in names if n.split(".")[0] == "prefect"], f"{path} imports Prefect"
