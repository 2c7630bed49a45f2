"""A strict stand-in for CuPy over NumPy, for tests on machines without a GPU (see README.md).

A device array (``cupy.ndarray``) wraps a NumPy array but is not one: NumPy cannot see
into it, it cannot be mixed with NumPy arrays, and every way of reading a value back to
the host is counted as a host synchronisation (``standin.host_syncs()``).
"""
from __future__ import annotations

import operator
import threading
import types
import weakref

import numpy as _np

__version__ = "14.2.0+strict-standin"


# ------------------------------------------------------------------------ host syncs
class _Standin:
    """Counters and switches of the stand-in (``cupy.standin``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.syncs: list = []          # (kind, thread name)

    def count_sync(self, kind: str):
        with self._lock:
            self.syncs.append((kind, threading.current_thread().name))

    def host_syncs(self) -> int:
        return len(self.syncs)

    def reset(self):
        with self._lock:
            self.syncs = []


standin = _Standin()


def _refuse_numpy(x):
    raise TypeError(f"Unsupported type {type(x)}")   # CuPy's message for a NumPy operand


def _unwrap(x, allow_numpy=False):
    """Device arrays -> their NumPy arrays (also inside lists and tuples); a NumPy array
    is refused unless ``allow_numpy`` (CuPy does not take host arrays as operands)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, _np.ndarray):
        return x if allow_numpy else _refuse_numpy(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, allow_numpy) for v in x)
    return x


def _wrap(x):
    """NumPy results -> device arrays (scalars too: CuPy reductions give 0-d arrays)."""
    if isinstance(x, _np.ndarray):
        return ndarray._from_numpy(x)
    if isinstance(x, _np.generic):
        return ndarray._from_numpy(_np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _call(fn, *args, **kwargs):
    return _wrap(fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))


# ------------------------------------------------------------------------ the array
_SYNC_METHODS = {"item", "tolist"}
_METHODS = {"reshape", "transpose", "sum", "mean", "max", "min", "argmax", "argmin", "astype",
            "copy", "ravel", "flatten", "fill", "view", "dot", "clip", "squeeze", "swapaxes",
            "var", "std", "all", "any", "cumsum", "prod", "nonzero", "take", "repeat", "round",
            "conj", "sort", "argsort", "partition", "diagonal", "trace", "ptp"}


class ndarray:
    """A device array. Construct with ``cupy.asarray``/``cupy.empty``... like CuPy's."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = _np.empty(shape, dtype=dtype, order=order)
        _pool._track(self._a)

    @classmethod
    def _from_numpy(cls, a: _np.ndarray) -> "ndarray":
        obj = cls.__new__(cls)
        obj._a = a
        _pool._track(a)
        return obj

    # -- what NumPy must not do with a device array ------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # `np.float32(2) * d` arrives here through the scalar's operator: allow a NumPy
        # scalar beside device arrays; refuse NumPy arrays and np.<ufunc>(device array).
        scalars = [x for x in inputs if isinstance(x, _np.generic)]
        if method == "__call__" and scalars and not kwargs and not any(
                isinstance(x, _np.ndarray) for x in inputs):
            return _wrap(getattr(ufunc, method)(*_unwrap(inputs)))
        raise TypeError(f"numpy.{ufunc.__name__} was called on a device array (with "
                        f"{[type(x).__name__ for x in inputs]}): device code must use "
                        "xp = get_xp(x) and xp.<function>, and move data with cupy.asnumpy")

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was called on a device array: device code "
                        "must use xp = get_xp(x) and xp.<function>")

    # -- attributes ----------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))

    @property
    def data(self):
        """``a.data.ptr``: the address of the first element (what NCCL is given)."""
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    @property
    def device(self):
        return cuda.Device()

    def __getattr__(self, name):
        if name in _METHODS:
            method = getattr(self._a, name)
            return lambda *a, **k: _call(method, *a, **k)
        if name in _SYNC_METHODS:
            method = getattr(self._a, name)

            def synced(*a, **k):
                standin.count_sync(f"ndarray.{name}")
                return method(*a, **k)
            return synced
        raise AttributeError(f"the strict CuPy stand-in's ndarray has no attribute {name!r}")

    def get(self, stream=None, order="C", out=None):
        standin.count_sync("ndarray.get")
        return _np.array(self._a, order=order)

    def set(self, arr, stream=None):
        self._a[...] = arr

    # -- host reads: each one a synchronisation ------------------------------------------
    def _sync(self, kind):
        standin.count_sync(kind)
        return self._a

    def __float__(self):
        return float(self._sync("float()"))

    def __int__(self):
        return int(self._sync("int()"))

    def __index__(self):
        return operator.index(self._sync("index"))

    def __bool__(self):
        return bool(self._sync("bool()"))

    def __complex__(self):
        return complex(self._sync("complex()"))

    def __repr__(self):
        return f"standin.array({self._sync('repr')!r})"

    __str__ = __repr__

    def __format__(self, spec):
        return format(self._sync("format"), spec)

    __hash__ = None

    # -- container protocol (no sync, like CuPy) -----------------------------------------
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, allow_numpy=True)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, allow_numpy=True)] = _unwrap(value, allow_numpy=True)

    def __neg__(self):
        return _wrap(-self._a)

    def __pos__(self):
        return _wrap(+self._a)

    def __abs__(self):
        return _wrap(abs(self._a))

    def __invert__(self):
        return _wrap(~self._a)


def _binary(op):
    def forward(self, other):
        return _wrap(op(self._a, _unwrap(other)))

    def reflected(self, other):
        return _wrap(op(_unwrap(other), self._a))

    def inplace(self, other):
        op(self._a, _unwrap(other), out=self._a)
        return self
    return forward, reflected, inplace


for _name, _op in [("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply),
                   ("truediv", _np.true_divide), ("floordiv", _np.floor_divide),
                   ("mod", _np.remainder), ("pow", _np.power), ("and", _np.bitwise_and),
                   ("or", _np.bitwise_or), ("xor", _np.bitwise_xor),
                   ("lshift", _np.left_shift), ("rshift", _np.right_shift)]:
    _f, _r, _i = _binary(_op)
    setattr(ndarray, f"__{_name}__", _f)
    setattr(ndarray, f"__r{_name}__", _r)
    setattr(ndarray, f"__i{_name}__", _i)
for _name, _op in [("lt", _np.less), ("le", _np.less_equal), ("gt", _np.greater),
                   ("ge", _np.greater_equal), ("eq", _np.equal), ("ne", _np.not_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_op)[0])
ndarray.__matmul__ = lambda self, other: _wrap(_np.matmul(self._a, _unwrap(other)))
ndarray.__rmatmul__ = lambda self, other: _wrap(_np.matmul(_unwrap(other), self._a))


# ------------------------------------------------------------------------ functions
_CREATE = {"asarray", "array", "asanyarray", "ascontiguousarray"}  # take host data
_DENY = {"save", "savez", "savez_compressed", "load", "loadtxt", "savetxt", "fromfile",
         "frombuffer", "genfromtxt", "errstate", "seterr", "geterr", "set_printoptions",
         "testing", "ctypeslib", "random", "memmap", "lib", "linalg", "fft", "ma", "char",
         "rec", "polynomial"}


class ufunc:
    """A NumPy ufunc on device arrays (``cupy.add(a, b)``, ``cupy.add.at(...)``)."""

    def __init__(self, np_ufunc):
        self._u = np_ufunc
        self.__name__ = np_ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _call(self._u, *args, **kwargs)

    def __getattr__(self, name):
        if name in ("at", "reduce", "accumulate", "outer", "reduceat"):
            return lambda *a, **k: _call(getattr(self._u, name), *a, **k)
        return getattr(self._u, name)


def _creating(fn):
    def create(obj, dtype=None, *args, **kwargs):
        if isinstance(obj, ndarray):
            out = obj._a if dtype is None or obj.dtype == dtype else obj._a.astype(dtype)
            return obj if out is obj._a else _wrap(out)
        host = _np.array(_unwrap(obj, allow_numpy=True), dtype=dtype, copy=True)
        return _wrap(host)
    return create


asarray = array = asanyarray = _creating(_np.asarray)


def ascontiguousarray(a, dtype=None):
    return _wrap(_np.ascontiguousarray(_unwrap(a), dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        standin.count_sync("asnumpy")
        return _np.array(a._a, order=order)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def show_config(_full=False):
    print(f"CuPy {__version__}: the strict stand-in over NumPy {_np.__version__}, no CUDA")


def get_default_memory_pool():
    return _pool


def __getattr__(name):
    if name in _DENY or name.startswith("_"):
        raise AttributeError(f"the strict CuPy stand-in has no cupy.{name}")
    value = getattr(_np, name)   # AttributeError for what NumPy lacks too
    if isinstance(value, _np.ufunc):
        return ufunc(value)
    if isinstance(value, type) or not callable(value):
        return value             # dtypes (cupy.float32 is numpy.float32), constants
    return lambda *a, **k: _call(value, *a, **k)


# ------------------------------------------------------------------------ memory pool
class _Pool:
    """Counts the bytes of live device buffers (views share their base's), like CuPy's
    pool's ``used_bytes``; ``total_bytes`` is the high-water mark until freed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict = {}
        self._used = self._total = 0

    def _track(self, a: _np.ndarray):
        base = a
        while isinstance(base.base, _np.ndarray):
            base = base.base
        key = id(base)
        if key in self._live or base.nbytes == 0:
            return
        hooks = cuda.memory_hook._hooks()
        for h in hooks:
            h.malloc_preprocess(device_id=cuda.Device().id, size=base.nbytes,
                                mem_size=base.nbytes)
        with self._lock:
            self._live[key] = base.nbytes
            self._used += base.nbytes
            self._total = max(self._total, self._used)
        weakref.finalize(base, self._release, key)
        for h in hooks:
            h.malloc_postprocess(device_id=cuda.Device().id, size=base.nbytes,
                                 mem_size=base.nbytes, mem_ptr=base.ctypes.data, pmem_id=key)

    def _release(self, key):
        with self._lock:
            self._used -= self._live.pop(key, 0)

    def used_bytes(self):
        return self._used

    def total_bytes(self):
        return max(self._total, self._used)

    def free_bytes(self):
        return self.total_bytes() - self._used

    def free_all_blocks(self, stream=None):
        self._total = self._used


_pool = _Pool()

from . import cuda  # noqa: E402  (cuda needs ndarray defined above)
from . import _core  # noqa: E402,F401
from .linalg_ns import linalg, lib  # noqa: E402,F401
