"""Strips notebooks for git: no outputs, no execution counts, no per-cell run metadata.

  python tools/strip_notebook.py notebooks/*.ipynb           # rewrites them in place
  python tools/strip_notebook.py --check notebooks/*.ipynb   # exit 1 naming any not stripped

Notebook-level metadata (kernelspec, Colab's `accelerator`) is kept: it tells Colab which
runtime to open. `tests/test_notebook.py` checks the committed notebooks are stripped.
"""
from __future__ import annotations

import argparse
import sys

import nbformat

# Per-cell metadata worth keeping; the rest (execution timings, Colab's outputId, ...) is noise.
KEEP_CELL_METADATA = ("tags",)


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """`nb` with every code cell's outputs and execution count cleared (in place; returned)."""
  for cell in nb.cells:
    cell.metadata = {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA}
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
  return nb


def problems(nb: nbformat.NotebookNode) -> list[str]:
  """What is not stripped in `nb`, one line per cell ([] when it is clean)."""
  out = []
  for i, cell in enumerate(nb.cells):
    extra = sorted(set(cell.metadata) - set(KEEP_CELL_METADATA))
    if extra:
      out.append(f"cell {i}: metadata {extra}")
    if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
      out.append(f"cell {i}: {len(cell.outputs)} outputs, execution_count "
                 f"{cell.execution_count}")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="+")
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if unclean")
  args = parser.parse_args(argv)
  dirty = 0
  for path in args.paths:
    nb = nbformat.read(path, as_version=4)
    found = problems(nb)
    if not found:
      continue
    dirty += 1
    if args.check:
      print(f"{path}: not stripped ({'; '.join(found[:3])}{' ...' if len(found) > 3 else ''})")
    else:
      nbformat.write(strip(nb), path)
      print(f"{path}: stripped")
  return 1 if args.check and dirty else 0


if __name__ == "__main__":
  sys.exit(main())
