"""One code path for CPU and GPU.

Every op in minisam takes its array module from its input (``get_xp(x)``), so the
same function runs on NumPy arrays on the CPU and on CuPy arrays on a GPU. Only this
file knows whether CuPy is installed. It also keeps the layers' scratch buffers.
"""
from __future__ import annotations

import contextlib
import importlib
import threading

import numpy as np

try:  # CuPy is an optional extra (minisam[gpu-cuda12] or [gpu-cuda13]).
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
                "install the GPU extra matching the driver's CUDA major (pip install "
                "'minisam[gpu-cuda12]' or 'minisam[gpu-cuda13]') on a machine with an "
                "NVIDIA GPU, or use --device cpu")
        return _cupy
    raise ValueError(f"unknown device {device!r}; expected one of {DEVICES}")


def set_tf32(enabled: bool):
    """Let cuBLAS run float32 GEMMs (every conv and dense layer) on TF32 tensor cores, or not.

    TF32 keeps float32's range but rounds the inputs of each product to a 10-bit mantissa
    (relative error about 1e-3, against float32's 6e-8), which is far above the 1e-5 that
    ``minisam verify`` holds to, so it is off unless asked for (``--tf32``). minisam sets it
    explicitly either way, so an exported ``CUPY_TF32=1`` does not switch it on behind the
    run's back. CuPy keeps the choice per process (``cupy/_core/_routines_linalg.pyx``,
    ``set_compute_type``). A no-op without CuPy."""
    if _cupy is None:
        return
    linalg = importlib.import_module("cupy._core._routines_linalg")
    kind = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(np.float32, kind)


def tf32_enabled() -> bool:
    """True when float32 GEMMs would run in TF32 (set_tf32, or CUPY_TF32 if never set)."""
    if _cupy is None:
        return False
    linalg = importlib.import_module("cupy._core._routines_linalg")
    return linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32


def thread_context():
    """A context manager factory that gives another thread the calling thread's CuPy device
    and current stream (CuPy keeps both per thread: a new thread starts on device 0 and the
    legacy default stream). Replica threads that share one stream need no events: the
    work each one queues runs in the order the threads queued it, so a replica reading
    another's arrays after a barrier reads them finished. A no-op without a GPU."""
    if not gpu_available():
        return contextlib.nullcontext
    device, stream = _cupy.cuda.Device().id, _cupy.cuda.get_current_stream()

    @contextlib.contextmanager
    def enter():
        with _cupy.cuda.Device(device), stream:
            yield
    return enter


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


# ---------------------------------------------------------------------------------------
# Scratch buffers: big arrays allocated anew every step cost page faults (on the CPU) that
# can take longer than the matrix multiply that fills them, so layers reuse them.

_local = threading.local()  # per-thread scratch space, freed when the thread ends


def reusable_buffer(owner: dict, key, shape, like):
    """An uninitialised array of ``shape`` and ``like``'s dtype and device, kept in
    ``owner[key]`` and returned again while shape, dtype and device stay the same."""
    xp = get_xp(like)
    buf = owner.get(key)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or get_xp(buf) is not xp:
        buf = owner[key] = xp.empty(shape, like.dtype)
    return buf


def workspace(shape, like):
    """A scratch buffer shared by every layer of this thread: for use within one call only
    (layers can share it, replica threads cannot, hence one set per thread)."""
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return reusable_buffer(_local.buffers, (shape, str(like.dtype), get_xp(like).__name__),
                           shape, like)
