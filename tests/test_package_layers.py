"""The companion's modules import downwards only: store <- train <- runner <- notebooks (issue 25 §3)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "companion"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def companion_imports(module: str) -> set:
    """The companion modules that ``module`` imports anywhere in its source, inside functions too."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y, from . import x, y
                names = [node.module] if node.module else [alias.name for alias in node.names]
            elif node.module and node.module.startswith("companion"):
                rest = node.module.split(".")[1:]
                names = rest[:1] or [alias.name for alias in node.names]
            else:
                continue
            found |= {name.split(".")[0] for name in names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("companion.")}
    return (found & set(MODULES)) - {module}


GRAPH = {module: companion_imports(module) for module in MODULES}


def test_the_import_graph_has_no_cycle():
    visiting, done = [], set()

    def visit(module):
        if module in visiting:
            pytest.fail("import cycle: " + " -> ".join(visiting[visiting.index(module):] + [module]))
        if module in done:
            return
        visiting.append(module)
        for dependency in sorted(GRAPH[module]):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


@pytest.mark.parametrize("module, above", [("store", {"train", "runner"}), ("train", {"runner"})])
def test_the_run_machinery_imports_downwards(module, above):
    assert not GRAPH[module] & above, f"companion/{module}.py imports {sorted(GRAPH[module] & above)}"


def test_experiments_still_run_through_the_runner():
    """train reaches the runner only through the executor the runner registers when it is imported."""
    import companion  # noqa: F401  (imports companion.runner)
    from companion import runner, train

    assert train._RUN_ALL is runner.run_all
