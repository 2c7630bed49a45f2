"""One code path for CPU and GPU.

Every op in minisam takes its array module from its input (``get_xp(x)``), so the
same function runs on NumPy arrays on the CPU and on CuPy arrays on a GPU. Only this
file knows whether CuPy is installed.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is an optional extra (`pip install minisam[gpu]`).
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None

DTYPE = np.float32
DEVICES = ("cpu", "gpu")


def gpu_available() -> bool:
    """True when CuPy is importable and sees at least one usable CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(*arrays):
    """The array module (numpy or cupy) of the given arrays, like cupy.get_array_module."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def xp_for(device: str):
    """The array module for a device name: 'cpu' -> numpy, 'gpu' -> cupy."""
    if device == "cpu":
        return np
    if device == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "device 'gpu' was asked for but no usable CuPy GPU was found; "
                "install the GPU extra (pip install 'minisam[gpu]') on a machine with "
                "an NVIDIA GPU, or use --device cpu")
        return _cupy
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")


def to_numpy(x):
    """Copy an array (NumPy or CuPy) or a scalar to host memory as a NumPy array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x, device: str, dtype=None):
    """Put a host or device array on `device` ('cpu' or 'gpu'), optionally casting it."""
    xp = xp_for(device)
    if xp is np:
        x = to_numpy(x)
        return x if dtype is None else x.astype(dtype, copy=False)
    return xp.asarray(x, dtype=dtype)


def tree_to_device(tree: dict, device: str) -> dict:
    """`to_device` over a flat dict of arrays (parameters, state, gradients)."""
    return {k: to_device(v, device) for k, v in tree.items()}


def tree_to_numpy(tree: dict) -> dict:
    return {k: to_numpy(v) for k, v in tree.items()}
