"""Makes a notebook in notebooks/ open and rerun in JupyterLab as it should, after papermill executed it.

    .venv/bin/python tools/tidy_notebook.py notebooks/*.ipynb      # rewrites the files in place
    .venv/bin/python tools/tidy_notebook.py --check notebooks/*.ipynb   # exit 1 and name what it would change

Two things, both metadata of the kind papermill leaves behind when ``run_all.sh --profile paper`` copies an
executed notebook over ``notebooks/``:

1. Papermill's ``injected-parameters`` cell is removed. It comes right after the ``parameters`` cell and sets
   ``profile = "paper"`` again, so a reader who switches the ``parameters`` cell to ``"smoke"`` in JupyterLab and
   runs all cells still runs the paper profile. A paper run injects the parameters cell's own defaults
   (``profile = "paper"``, ``overrides = {}``), so removing it changes no result; a cell that injects anything
   else is refused (it would not be a plain paper run).
2. The kernelspec is the one the companion's environment provides, ``python3`` with ipykernel's display name
   ``Python 3 (ipykernel)``: JupyterLab started from .venv opens the notebook with that kernel without asking,
   and does not mark the notebook as changed on opening (it rewrites a differing display name).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _assignments(source: str) -> dict:
    """``name = literal`` lines of a parameters cell, as values (comments and other lines ignored)."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                values[node.targets[0].id] = ast.unparse(node.value)
    return values


def tidy(nb) -> list[str]:
    """Tidies ``nb`` in place; returns what changed, in words."""
    changes = []
    defaults = next((_assignments(c.source) for c in nb.cells
                     if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)
    kept = []
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            injected = _assignments(cell.source)
            if defaults is None or any(defaults.get(k, object()) != v for k, v in injected.items()):
                raise ValueError(f"the injected-parameters cell sets {injected}, not the parameters cell's defaults "
                                 f"{defaults}: this notebook holds a run with other parameters; rerun it with "
                                 f"./run_all.sh --profile paper")
            injected_text = cell.source.strip().replace("\n", "; ")
            changes.append(f"removed papermill's injected-parameters cell ({injected_text})")
            continue
        kept.append(cell)
    nb.cells = kept
    if dict(nb.metadata.get("kernelspec", {})) != KERNELSPEC:
        changes.append(f"kernelspec {dict(nb.metadata.get('kernelspec', {}))} -> {KERNELSPEC}")
        nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a notebook needs tidying")
    args = parser.parse_args(argv)
    untidy = 0
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        changes = tidy(nb)
        for change in changes:
            print(f"{path}: {change}")
        if changes:
            untidy += 1
            if not args.check:
                nbformat.write(nb, path)
    return 1 if args.check and untidy else 0


if __name__ == "__main__":
    sys.exit(main())
