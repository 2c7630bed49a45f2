"""``cupy._core`` of the stand-in: only the GEMM compute type (TF32) lives here."""
from . import _routines_linalg  # noqa: F401
