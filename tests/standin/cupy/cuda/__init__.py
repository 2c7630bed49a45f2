"""``cupy.cuda`` of the stand-in: two pretend devices, per-thread current device and
stream (as in CuPy), events, memory hooks, and ``nccl``. Synchronising counts as a host
sync (``cupy.standin``)."""
from __future__ import annotations

import itertools
import threading
import time
import types

from .. import standin
from . import memory_hook
from .memory_hook import MemoryHook  # noqa: F401

N_DEVICES = 2
_local = threading.local()
_ptrs = itertools.count(0x1000)


def _props(i):
    return {"name": b"strict CuPy stand-in (NumPy)", "major": 9, "minor": 0,
            "multiProcessorCount": 2, "totalGlobalMem": 24 * 2**30}


def _device_synchronize():
    standin.count_sync("deviceSynchronize")


runtime = types.SimpleNamespace(
    getDeviceCount=lambda: N_DEVICES, getDevice=lambda: Device().id,
    getDeviceProperties=_props, runtimeGetVersion=lambda: 13000,
    driverGetVersion=lambda: 13000, deviceSynchronize=_device_synchronize)


class Device:
    """``Device()`` is this thread's current device; ``Device(i).use()`` makes i current."""

    def __init__(self, device=None):
        self.id = getattr(_local, "device", 0) if device is None else int(device)
        if not 0 <= self.id < N_DEVICES:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")

    def use(self):
        _local.device = self.id

    def __enter__(self):
        _local.__dict__.setdefault("device_stack", []).append(getattr(_local, "device", 0))
        self.use()
        return self

    def __exit__(self, *exc):
        _local.device = _local.device_stack.pop()

    def synchronize(self):
        standin.count_sync("Device.synchronize")

    @property
    def compute_capability(self):
        return "90"

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return self.id

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


class Stream:
    """A stream: ``Stream.null`` is the legacy default stream (ptr 0), current in every
    thread until another is made current with ``use()`` or ``with``."""

    null: "Stream"

    def __init__(self, null=False, non_blocking=False, ptds=False):
        self.ptr = 0 if null else next(_ptrs)
        self.device_id = Device().id

    def use(self):
        _local.stream = self
        return self

    def __enter__(self):   # the stack is per thread: Stream.null is shared by all threads
        _local.__dict__.setdefault("stream_stack", []).append(get_current_stream())
        return self.use()

    def __exit__(self, *exc):
        _local.stream = _local.stream_stack.pop()

    def synchronize(self):
        standin.count_sync("Stream.synchronize")

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return self.ptr

    def __repr__(self):
        return f"<Stream {self.ptr}>"


Stream.null = Stream(null=True)


def get_current_stream(device_id=None):
    return getattr(_local, "stream", Stream.null)


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        standin.count_sync("Event.synchronize")

    @property
    def done(self):
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    return (end.time - start.time) * 1e3


from . import nccl  # noqa: E402,F401
