"""The layout's rules, checked on the source: no import cycles, arrows only point down
(app -> ui -> jobs -> pipelines -> core), no Gradio or SQL outside their rooms (SQL: the
core/store/ package, core/sqlbox.py, core/snapshot.py), and every module imports on its own in a
fresh interpreter."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "pipelines", "jobs", "ui")
LAYER = {"core": 0, "pipelines": 1, "jobs": 2, "ui": 3, "app": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    found = {"app": REPO / "app.py"}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "migrations" not in path.parts and path.name != "__main__.py":
                found[module_name(path)] = path
    return found


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: module-level statements only (imports inside
    functions and under `if TYPE_CHECKING:` run later or never)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def graph() -> dict[str, set[str]]:
    modules = our_modules()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in top_level_imports(path):
            # `from jobs import finetune` names a module; `from jobs.x import Thing` names x.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(graph()) is None


def test_imports_only_point_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if LAYER[target.split(".")[0]] > LAYER[name.split(".")[0]]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_gradio_only_in_ui_and_sql_only_in_the_store():
    for name, path in our_modules().items():
        text = path.read_text(encoding="utf-8")
        if not name.startswith("ui") and name != "app":
            assert "import gradio" not in text, name
        # the store's package, the SQL box's sandbox, and the snapshot that dumps and reloads
        # every table
        in_store = name == "core.store" or name.startswith("core.store.")
        if not in_store and name not in ("core.sqlbox", "core.snapshot"):
            for verb in ("SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM"):
                assert f'"{verb}' not in text, f"{name} writes SQL ({verb.strip()})"


def test_the_ui_calls_services_never_the_store():
    for name, path in our_modules().items():
        if name.startswith("ui"):
            text = path.read_text(encoding="utf-8")
            assert "services.store" not in text and "core.store" not in text, name


def test_only_app_ui_and_clis_import_the_wiring():
    users = {name for name, targets in graph().items() if "jobs.services" in targets}
    assert users <= {"app"} | {n for n in users if n.startswith("ui")}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_in_a_fresh_interpreter(package):
    """Each package's modules, deepest first, in a new interpreter: a module that only imports
    after some other module happened to be imported first fails here."""
    names = sorted((n for n in our_modules() if n.split(".")[0] == package),
                   key=lambda n: (-n.count("."), n))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
