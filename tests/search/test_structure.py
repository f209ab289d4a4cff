"""The shape of ``search/``: modules of one job (under 400 lines), no import cycle, and two wings,
``search.launch`` and ``search.query``, that depend on the shared core and never on each other."""

from __future__ import annotations

import ast
from pathlib import Path

SEARCH = Path(__file__).resolve().parents[2] / "search"
WINGS = ("search.launch", "search.query")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SEARCH.rglob("*.py"):
        parts = path.relative_to(SEARCH.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, *, typing_only: bool = True) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every ``from search... import`` in the file, wherever it is;
    without ``typing_only``, those under ``if TYPE_CHECKING:`` (never run) are left out."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if not typing_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
                skipped |= {id(inner) for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("search"):
            found.append((node.module or "", [alias.name for alias in node.names]))
    return found


def _wing(module: str) -> str | None:
    return next((wing for wing in WINGS if module == wing or module.startswith(wing + ".")), None)


def test_no_module_of_search_is_over_400_lines():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long


def test_the_launch_and_query_wings_never_import_each_other():
    for name, path in _modules().items():
        wing = _wing(name)
        for module, _ in _imports(path):
            other = _wing(module)
            assert not (wing and other and other != wing), f"{name} imports {module}"
            # The shared core never reaches into a wing (search.cli, which joins them, aside).
            assert not (wing is None and other and name != "search.cli"), f"{name} imports {module}"


def test_no_module_imports_a_private_name_of_another():
    for name, path in _modules().items():
        for module, names in _imports(path):
            private = [imported for imported in names if imported.startswith("_")]
            assert not private, f"{name} imports {private} from {module}"


def test_search_has_no_import_cycle():
    # Imports that run; search.forecast names search.plan's Stage in annotations only.
    modules = _modules()
    graph = {
        name: {
            module
            for module, _ in _imports(path, typing_only=False)
            if module in modules and module != name
        }
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how it re-exports them, not a cycle.
    for name in graph:
        graph[name] = {
            m for m in graph[name] if not (_is_package(modules[name]) and m.startswith(name + "."))
        }
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name) :], name])
        if name in done:
            return
        visiting.append(name)
        for module in graph[name]:
            visit(module)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"
