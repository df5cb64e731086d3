"""The house rules: Dagster only at the edge, and no import cycle between the package's modules."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "exp_pipeline"
# What may import dagster: the definitions, the command-line driver, and the warehouse resource
# (resources must subclass Dagster's ConfigurableResource).
DAGSTER_EDGE = {"definitions.py", "cli.py", "warehouse/resources.py"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports, wherever in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules and not modules[name].name == "__init__.py"}


def _imports_dagster(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        )
        if any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in names):
            return True
    return False


def test_only_the_edge_imports_dagster():
    importing = {
        str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if _imports_dagster(path)
    }
    outside = {p for p in importing if not p.startswith("defs/") and p not in DAGSTER_EDGE}
    assert outside == set()
    assert {"definitions.py", "defs/assets.py", "defs/checks.py"} <= importing


def test_the_library_loads_without_dagster():
    library = sorted(
        name for name, path in _modules().items()
        if not _imports_dagster(path) and not name.startswith("exp_pipeline.defs") and name != "exp_pipeline.cli"
    )
    code = f"import sys\nfor m in {library!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    done, on_path = set(), []

    def visit(name: str) -> None:
        if name in on_path:
            raise AssertionError("import cycle: " + " -> ".join([*on_path[on_path.index(name):], name]))
        if name in done:
            return
        on_path.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        on_path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
