"""Make the committed notebooks from their sources, run them, and store the outputs.

Each tutorial is a pair: ``NN_name.py`` (jupytext's ``py:percent`` format, the only source:
edit that file, in any editor or in Jupyter, which saves both halves of the pair) and
``NN_name.ipynb`` (the same cells with their outputs, so the figures show on GitHub).
From the repository root:

    python tutorials/execute.py            # every notebook: build from the .py, run, write
    python tutorials/execute.py 03 05      # only these (name prefixes)
    python tutorials/execute.py --check    # are the pairs in sync? (what tests/ check)

Running keeps the outputs and drops what changes from one run to the next without
meaning anything (execution timestamps, the kernel's exact Python version), so a diff of
an .ipynb shows real changes only. Needs the dev extra (jupytext, nbclient, ipykernel).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import jupytext
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FORMATS = "ipynb,py:percent"
CELL_TIMEOUT = 300          # seconds per cell
BUDGET_S = 180              # what one notebook may take on 2 CPU cores (tests/test_tutorials)


def sources() -> list[str]:
    """The notebook sources: tutorials/NN_*.py."""
    return sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py")))


def notebook_path(source: str) -> str:
    return os.path.splitext(source)[0] + ".ipynb"


def cells(nb) -> list[tuple[str, str]]:
    """What the pair must agree on: every cell's kind and text."""
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def out_of_sync(source: str) -> str | None:
    """None if ``source`` and its .ipynb hold the same cells, else what differs."""
    ipynb = notebook_path(source)
    name = os.path.basename(ipynb)
    if not os.path.exists(ipynb):
        return f"{name} is missing: run python tutorials/execute.py {name[:2]}"
    a, b = cells(jupytext.read(source)), cells(nbformat.read(ipynb, as_version=4))
    if a == b:
        return None
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (f"{name} differs from its source from cell {first + 1} on ({len(a)} cells in the "
            f".py, {len(b)} in the .ipynb): run python tutorials/execute.py {name[:2]}")


def build(source: str):
    """The notebook of ``source``, without outputs, with the pairing and a plain kernelspec."""
    nb = jupytext.read(source)
    nb.metadata["jupytext"] = {"formats": FORMATS}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb):
    """Run ``nb`` in place in a fresh kernel, in tutorials/, with the repository importable."""
    from nbclient import NotebookClient
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)                      # the inline backend
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": HERE}}).execute(env=env)
    nb.metadata["language_info"] = {"name": "python"}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="notebooks to run (default: all), by prefix: 03")
    p.add_argument("--check", action="store_true",
                   help="only check that every .py and its .ipynb hold the same cells")
    args = p.parse_args(argv)
    chosen = [s for s in sources()
              if not args.names or any(os.path.basename(s).startswith(n) for n in args.names)]
    if not chosen:
        p.error(f"no notebook source matches {args.names} in {HERE}")
    if args.check:
        problems = [m for m in map(out_of_sync, chosen) if m]
        print("\n".join(problems) or f"{len(chosen)} notebooks in sync with their sources")
        return 1 if problems else 0
    for source in chosen:
        nb, path = build(source), notebook_path(source)
        t = time.perf_counter()
        try:
            execute(nb)
        finally:   # partial outputs are kept to look at if a cell fails
            nbformat.write(nb, path)
        took = time.perf_counter() - t
        note = "" if took <= BUDGET_S else f" (over the {BUDGET_S} s budget)"
        print(f"{os.path.relpath(path, ROOT)}: ran in {took:.1f} s{note}, "
              f"{os.path.getsize(path) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
