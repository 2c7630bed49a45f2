"""The GEMM compute type, as CuPy's ``cupy/_core/_routines_linalg.pyx`` keeps it: one per
dtype class; TBD until first asked, then CUPY_TF32 decides for float32."""
import os
import threading

import numpy as np

COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC = 0, 1, 2
COMPUTE_TYPE_FP16, COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64 = 3, 4, 5
COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32 = 6, 7
_types = [COMPUTE_TYPE_TBD] * 3
_lock = threading.Lock()


def _index(dtype) -> int:
    char = np.dtype(dtype).char
    if char == "e":
        return 0
    if char in "fF":
        return 1
    if char in "dD":
        return 2
    raise TypeError(f"dtype is not supported: {dtype}")


def set_compute_type(dtype, compute_type):
    if compute_type not in range(8):
        raise ValueError(f"unknown compute type {compute_type}")
    with _lock:
        _types[_index(dtype)] = compute_type


def get_compute_type(dtype):
    i = _index(dtype)
    if _types[i] == COMPUTE_TYPE_TBD:
        tf32 = np.dtype(dtype).char in "fF" and int(os.getenv("CUPY_TF32", "0")) > 0
        set_compute_type(dtype, COMPUTE_TYPE_TF32 if tf32 else COMPUTE_TYPE_DEFAULT)
    return _types[i]
