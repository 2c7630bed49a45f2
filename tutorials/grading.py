"""The check cells of the tutorials' exercises: grade a learner's function against a reference.

An exercise in a notebook is three cells:

1. an *exercise* cell (tag ``exercise``) with a function to write, whose body is
   ``raise NotImplementedError`` until the learner fills it in;
2. a *check* cell: ``check("name", learner_fn, reference_fn, cases)``. It calls both on every
   case and compares the results. A function still raising ``NotImplementedError`` is
   reported as not attempted (the notebook runs on); a wrong answer raises an
   ``AssertionError`` that says on which case and by how much;
3. a *solution* cell (tag ``solution``, its input collapsed) with a worked solution, graded
   by the same ``check``, so the solution itself is tested every time the notebook runs.

The reference is minisam's own function where there is one (``minisam.sam.dual_vector``,
``BatchNorm.backward``...) or a number from a trace the notebook has loaded.
"""
from __future__ import annotations

import numpy as np


def _compare(got, want, rtol, atol, where="result"):
    """None if ``got`` matches ``want`` (arrays, numbers, tuples/lists, dicts), else why not."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return f"{where}: expected a dict with keys {sorted(want)}, got {_kind(got)}"
        for k in want:
            why = _compare(got[k], want[k], rtol, atol, f"{where}[{k!r}]")
            if why:
                return why
        return None
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{where}: expected {len(want)} values, got {_kind(got)}"
        for i, (g, w) in enumerate(zip(got, want)):
            why = _compare(g, w, rtol, atol, f"{where}[{i}]")
            if why:
                return why
        return None
    if got is None:
        return f"{where}: got None (did the function forget to return?)"
    g, w = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        return f"{where}: shape {g.shape}, expected {w.shape}"
    if not np.allclose(g, w, rtol=rtol, atol=atol):
        err = np.abs(g - w).max()
        return f"{where}: off by up to {err:.3g} (tolerance {atol:g} + {rtol:g} x |expected|)"
    return None


def _kind(x):
    return f"{type(x).__name__} of length {len(x)}" if hasattr(x, "__len__") else type(x).__name__


def check(name: str, candidate, reference, cases, rtol: float = 1e-6,
          atol: float = 1e-9) -> bool:
    """Grade ``candidate`` against ``reference`` on every case (a tuple of arguments).

    Returns True when every case matches, False (and says so) when the candidate still
    raises ``NotImplementedError``; raises ``AssertionError`` naming the first wrong case.
    """
    cases = list(cases)
    for i, args in enumerate(cases):
        args = args if isinstance(args, tuple) else (args,)
        try:
            got = candidate(*args)
        except NotImplementedError:
            print(f"{name}: not attempted yet. Write the function above and run this cell "
                  f"again, or read the solution below.")
            return False
        why = _compare(got, reference(*args), rtol, atol)
        if why:
            raise AssertionError(f"{name}, case {i + 1} of {len(cases)}: {why}")
    print(f"{name}: correct on all {len(cases)} cases.")
    return True
