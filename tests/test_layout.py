"""The layout DESIGN.md fixes: arrows point one way, no import circles, small rooms.

The import graph is read from the source with ``ast`` (no module is imported, so no framework
is loaded), and every import counts: at module level or inside a function.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The folders that the installed packages map to (pyproject's package-dir).
PACKAGE_FOLDERS = {"autobatch": "autobatch", "autobatch.backends": "backends", "autobatch.studies": "studies"}

# Stages from the top of the flow to the bottom: a module may import its own stage and the
# stages below it, never one above. Stages that share a rank sit side by side.
STAGE_RANKS = {
    "autobatch.cli": 7,
    "autobatch.integrations": 6,
    "autobatch.__main__": 7,
    "autobatch.search": 5,
    "autobatch.training": 5,
    "autobatch.report": 5,
    "autobatch.process": 4,
    "autobatch.backends": 3,
    "autobatch.studies": 2,
    "autobatch.tasks": 2,
    "autobatch.core": 1,
    "autobatch.errors": 0,
    "autobatch._validation": 0,
}
MAX_MODULE_LINES = 500


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def stage_rank(module: str) -> int | None:
    for prefix in sorted(STAGE_RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return STAGE_RANKS[prefix]
    return None


def test_every_module_belongs_to_a_stage():
    # The package's own __init__ only re-exports the public API, so it alone stands above the flow.
    unplaced = [name for name in project_modules() if name != "autobatch" and stage_rank(name) is None]
    assert unplaced == [], f"modules outside the stages of DESIGN.md: {unplaced}"


def test_imports_point_down_the_flow():
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if module != "autobatch" and stage_rank(target) is not None and stage_rank(target) > stage_rank(module)
    ]
    assert upward == [], (
        "imports against the flow (DESIGN.md: cli -> search/training/report -> process -> backends -> core):\n"
        + "\n".join(upward)
    )


def test_no_import_circles():
    graph = import_graph()
    # Tarjan's strongly connected components, iteratively (the graph is small, but recursion depth is not ours to spend).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    assert circles == [], f"import circles: {circles}"


def test_the_circle_finder_sees_a_lazy_circle(tmp_path, monkeypatch):
    # The check above must be able to fail: two modules that import each other, one of them
    # inside a function, make a circle.
    package = tmp_path / "autobatch"
    (package / "core").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("from autobatch.core.b import thing\n")
    (package / "core" / "b.py").write_text("def thing():\n    from autobatch.core import a\n")
    this_module = sys.modules[__name__]
    monkeypatch.setattr(this_module, "ROOT", tmp_path)
    monkeypatch.setattr(this_module, "PACKAGE_FOLDERS", {"autobatch": "autobatch"})
    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circles()


@pytest.mark.parametrize("folder", ["autobatch", "backends"])
def test_no_module_is_over_the_size_of_one_room(folder):
    long_modules = {
        str(path.relative_to(ROOT)): lines
        for path in (ROOT / folder).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_modules == {}, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"


def test_importing_autobatch_imports_no_framework_at_module_level():
    framework_imports = []
    for path in (ROOT / "autobatch").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            framework_imports += [
                f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in ("torch", "tensorflow", "keras")
            ]
    assert framework_imports == []
