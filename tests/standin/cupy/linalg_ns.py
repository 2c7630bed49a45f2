"""``cupy.linalg`` and ``cupy.lib.stride_tricks`` of the stand-in: NumPy's, on device arrays."""
import types

import numpy as _np

from . import _call

linalg = types.SimpleNamespace(**{
    name: (lambda f: lambda *a, **k: _call(f, *a, **k))(getattr(_np.linalg, name))
    for name in ("norm", "eigh", "eigvalsh", "svd", "qr", "solve", "inv", "det", "cholesky")})
lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
    as_strided=lambda x, shape=None, strides=None: _call(
        _np.lib.stride_tricks.as_strided, x, shape=shape, strides=strides)))
