"""How sensitive are the reference cases to the GEMMs' summation order? (issue 13, GPU)

Runs ``minisam verify --device gpu`` under the strict CuPy stand-in with every matrix
product rounded as if it were accumulated exactly (float64 products and sums, then
float32): not cuBLAS's order, but a different one, as any GPU GEMM's will be.

    python benchmarks/verify_rounding.py [CASE ...]     # imports the stand-in itself

CASE: names in reference_results/ (default: all). Prints PASS or the failing groups.
"""
from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "standin"))
sys.path.insert(0, ROOT)
import cupy  # noqa: E402  (the stand-in)
from minisam.verify import verify  # noqa: E402


def exact_matmul(a, b, out=None):
    """``a @ b`` summed in float64, rounded once to the inputs' type."""
    x, y = cupy._unwrap(a), cupy._unwrap(b)
    r = np.matmul(x.astype(np.float64), y.astype(np.float64)).astype(np.result_type(x, y))
    if out is None:
        return cupy._wrap(r)
    cupy._unwrap(out)[...] = r
    return out


def main(argv=None):
    assert cupy.__version__.endswith("strict-standin"), cupy.__file__
    cases = (argv if argv is not None else sys.argv[1:]) or sorted(
        f[:-4] for f in os.listdir(os.path.join(ROOT, "reference_results")) if f.endswith(".npz"))
    cupy.matmul = exact_matmul
    cupy.ndarray.__matmul__ = lambda self, other: exact_matmul(self, other)
    cupy.ndarray.__rmatmul__ = lambda self, other: exact_matmul(other, self)
    for case in cases:
        rows, _ = verify(os.path.join(ROOT, "reference_results", case + ".npz"), device="gpu")
        bad = [f"{r.group} {r.max_rel:.1e}" for r in rows if not r.ok]
        print(f"{case}: " + ("PASS" if not bad else "FAIL " + "; ".join(bad[:4])), flush=True)


if __name__ == "__main__":
    main()
