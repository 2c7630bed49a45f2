"""Communicators: how replicas of the per-replica train step talk to each other.

The train step is SPMD, like the JAX code under ``jax.pmap(axis_name='batch')``: every
replica runs the same function on its slice of the batch and calls
``comm.allreduce_mean(tree)`` where the JAX code calls ``jax.lax.pmean(tree, 'batch')``.

* ``LocalComm``: one replica; the mean is the identity.
* ``ThreadComm``: N replicas as N threads of one process on the CPU, meeting at a barrier.
  NumPy releases the GIL in its heavy kernels, so the threads do overlap. Tests use it to
  check per-replica BN statistics and per-replica perturbations against the two-replica
  JAX reference without any GPU.
* ``NcclComm``: one process per GPU (started by ``python -m minisam.launch``), talking
  through NCCL. ``comm_from_env()`` picks it when ``WORLD_SIZE > 1``.

Every communicator has ``rank``, ``size``, ``allreduce_mean(tree) -> tree``,
``broadcast(tree, root=0) -> tree`` and ``barrier()``. A tree is a flat dict of arrays
(parameters, gradients, BN state); the result has the same keys, in the same order.
"""
from __future__ import annotations

import os
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from .backend import to_numpy


class LocalComm:
    rank, size, local_rank = 0, 1, 0

    def allreduce_mean(self, tree: dict) -> dict:
        return tree

    def broadcast(self, tree: dict, root: int = 0) -> dict:
        return tree

    def barrier(self):
        pass

    def close(self):
        pass


class ThreadComm:
    """A group of ``size`` threads; ``for_rank(r)`` gives each thread its handle."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"ThreadComm needs at least one replica, got {size}")
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots = [None] * size

    def for_rank(self, rank: int) -> "_ThreadRank":
        return _ThreadRank(self, rank)


class _ThreadRank:
    def __init__(self, group: ThreadComm, rank: int):
        self.group, self.rank, self.size = group, rank, group.size
        self.local_rank = rank

    def barrier(self):
        self.group._barrier.wait()

    def allreduce_mean(self, tree: dict) -> dict:
        """Mean over replicas, summed in rank order so that every replica gets the same bits."""
        g = self.group
        g._slots[self.rank] = tree
        self.barrier()                     # every replica has posted its tree
        trees = list(g._slots)
        out = {}
        for k, v in tree.items():
            acc = trees[0][k]
            for t in trees[1:]:
                acc = acc + t[k]
            out[k] = acc / self.size
        self.barrier()                     # nobody overwrites a slot still being read
        return out

    def broadcast(self, tree: dict, root: int = 0) -> dict:
        """Every replica gets a copy of ``root``'s tree (same keys as its own)."""
        g = self.group
        g._slots[self.rank] = tree
        self.barrier()
        src = g._slots[root]
        out = {k: src[k].copy() for k in tree}
        self.barrier()
        return out

    def close(self):
        pass


def run_replicas(size: int, fn):
    """Run ``fn(rank, comm)`` in ``size`` threads sharing a ThreadComm; return results by rank.

    An exception in any replica aborts the barrier (so no thread hangs) and is re-raised."""
    group = ThreadComm(size)
    results, errors = [None] * size, [None] * size

    def target(r):
        try:
            results[r] = fn(r, group.for_rank(r))
        except BaseException as e:  # noqa: BLE001 - re-raised below in the caller's thread
            errors[r] = e
            group._barrier.abort()

    if size == 1:
        return [fn(0, group.for_rank(0))]
    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real or any(errors):
        raise (real or [e for e in errors if e])[0]
    return results


# --------------------------------------------------------------------------------------
# Flat buffers: one NCCL call per bucket instead of one per array.
#
# A WRN-28-10 has ~100 parameter arrays; one all-reduce each would pay NCCL's launch
# latency ~100 times. Instead the dict is packed into a few contiguous buffers. The
# packing is pure array code (``xp`` is NumPy or CuPy), so it is tested on the CPU.
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """Where one array lives inside its bucket: elements [offset, offset + size)."""
    key: str
    shape: tuple
    offset: int
    size: int


@dataclass(frozen=True)
class Bucket:
    """One contiguous buffer of a single dtype holding consecutive arrays of the layout."""
    dtype: np.dtype
    slots: tuple
    size: int           # elements

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


@dataclass(frozen=True)
class FlatLayout:
    """How a dict of arrays maps onto buckets. Build it with ``plan_layout``."""
    buckets: tuple

    @property
    def keys(self) -> list:
        return [s.key for b in self.buckets for s in b.slots]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def digest(self) -> int:
        """A 20-bit hash of keys, shapes, dtypes and bucketing; equal on ranks that agree."""
        text = repr([(str(b.dtype), [(s.key, s.shape) for s in b.slots]) for b in self.buckets])
        return zlib.crc32(text.encode()) & 0xFFFFF


def _shape_dtype(v):
    """(shape, dtype) of an array, NumPy or CuPy, or of a Python scalar (a 0-d array)."""
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return tuple(v.shape), np.dtype(v.dtype)
    a = np.asarray(v)
    return a.shape, a.dtype


def layout_signature(tree: dict, bucket_bytes=None) -> tuple:
    """A hashable summary of a tree (sorted keys, shapes, dtypes): the cache key of its layout."""
    return (bucket_bytes,) + tuple((k,) + _shape_dtype(tree[k]) for k in sorted(tree))


def plan_layout(tree: dict, bucket_bytes: int | None = None) -> FlatLayout:
    """Plan the flat buffers for ``tree``.

    Order: keys **sorted** (so every rank packs the same way, whatever order its dict was
    built in), grouped by dtype (float32 first in practice: dtypes sorted by name).
    Buckets: ``bucket_bytes=None`` (or 0) puts each dtype in one buffer; otherwise arrays
    are added to a bucket until the next one would push it past ``bucket_bytes``, then a
    new bucket starts. An array is never split, so an array larger than ``bucket_bytes``
    gets a bucket of its own."""
    if bucket_bytes is not None and bucket_bytes < 0:
        raise ValueError(f"bucket_bytes must be None, 0 or positive, got {bucket_bytes}")
    by_dtype: dict = {}
    for k in sorted(tree):
        shape, dtype = _shape_dtype(tree[k])
        by_dtype.setdefault(dtype, []).append((k, shape))
    buckets = []
    for dtype in sorted(by_dtype, key=str):
        slots, size = [], 0
        for k, shape in by_dtype[dtype]:
            n = int(np.prod(shape, dtype=np.int64))
            if slots and bucket_bytes and (size + n) * dtype.itemsize > bucket_bytes:
                buckets.append(Bucket(dtype, tuple(slots), size))
                slots, size = [], 0
            slots.append(Slot(k, shape, size, n))
            size += n
        if slots:
            buckets.append(Bucket(dtype, tuple(slots), size))
    return FlatLayout(tuple(buckets))


def flatten(tree: dict, layout: FlatLayout, xp, out: list | None = None) -> list:
    """Pack ``tree`` into one 1-D array per bucket (into ``out``'s arrays if given).

    One ``concatenate`` per bucket: a single kernel on the GPU."""
    flats = []
    for i, b in enumerate(layout.buckets):
        parts = [xp.asarray(tree[s.key]).reshape(-1) for s in b.slots]
        dst = out[i] if out is not None else xp.empty(b.size, dtype=b.dtype)
        if len(parts) == 1:
            dst[...] = parts[0]
        else:
            xp.concatenate(parts, out=dst)
        flats.append(dst)
    return flats


def unflatten(flats: list, layout: FlatLayout) -> dict:
    """The inverse of ``flatten``: a dict of **views** into ``flats`` (keys in layout order)."""
    out = {}
    for flat, b in zip(flats, layout.buckets):
        for s in b.slots:
            out[s.key] = flat[s.offset:s.offset + s.size].reshape(s.shape)
    return out


# --------------------------------------------------------------------------------------
# NCCL, one process per GPU
# --------------------------------------------------------------------------------------

NCCL_UNIQUE_ID_BYTES = 128


def encode_unique_id(uid) -> bytes:
    """NCCL's unique id as 128 raw bytes for the wire.

    ``cupy.cuda.nccl.get_unique_id()`` returns a tuple of 128 C ``char`` values as ints in
    CuPy <= 13 (negative on x86, where char is signed) and ``bytes`` from CuPy 14 on
    (cupy/cupy PR #9438, "Change nccl get_unique_id to return a bytes string")."""
    raw = bytes(uid) if isinstance(uid, (bytes, bytearray)) else bytes(int(b) & 0xFF for b in uid)
    if len(raw) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {len(raw)}")
    return raw


def unique_id_candidates(raw: bytes) -> list:
    """The forms ``NcclCommunicator(ndev, commId, rank)`` may want, most recent CuPy first:
    bytes (CuPy >= 14), a tuple of signed chars (CuPy <= 13 where char is signed, x86),
    a tuple of unsigned chars (CuPy <= 13 on ARM, where char is unsigned)."""
    return [bytes(raw), tuple(b - 256 if b > 127 else b for b in raw), tuple(raw)]


def _make_communicator(nccl, size: int, raw_uid: bytes, rank: int):
    """``NcclCommunicator(size, uid, rank)`` with the uid in whatever form this CuPy takes.

    A wrong form fails in the Python -> C conversion (TypeError for the container type,
    OverflowError for a char out of range) before NCCL is called, so trying is safe."""
    last = None
    for uid in unique_id_candidates(raw_uid):
        try:
            return nccl.NcclCommunicator(size, uid, rank)
        except (TypeError, OverflowError) as e:
            last = e
    raise RuntimeError(f"cupy.cuda.nccl.NcclCommunicator accepted no form of the unique id: {last}")


def _env_int(env, name: str, default=None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set; start the job with "
                             "`python -m minisam.launch --nproc N -- ...`")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _ptr(a) -> int:
    """Device pointer of a CuPy array (``a.data.ptr``), host pointer of a NumPy array."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


class NcclComm:
    """Data parallelism across processes, one GPU each, over NCCL (``cupy.cuda.nccl``).

    Rendezvous: rank 0 serves a ``rendezvous.TCPStore`` on ``master_addr:master_port``,
    makes the NCCL unique id (``nccl.get_unique_id()``) and stores it; the other ranks
    read it; then every rank calls ``nccl.NcclCommunicator(size, uid, rank)`` on its own
    GPU (``cupy.cuda.Device(device_id).use()``, ``device_id = local_rank`` by default).

    ``allreduce_mean(tree)``: the tree is packed (``plan_layout``: sorted keys, grouped by
    dtype, one bucket per dtype or buckets of about ``bucket_mb``) into a send buffer kept
    from call to call; each bucket is summed with ``ncclAllReduce(..., ncclSum, stream)``
    on the current CuPy stream into a fresh receive buffer, divided by ``size``, and the
    result is returned as views into that receive buffer (keys in the caller's order).
    Everything is stream-ordered: no host synchronisation, the next kernels on the stream
    see the result. The receive buffer is fresh each call (CuPy's memory pool makes that
    cheap), so results of earlier calls stay valid. NCCL's ring and tree algorithms reduce
    each element once and then distribute it, so all ranks get the same bits, but not
    the rank-order sum of ``ThreadComm``: expect float32 rounding differences between the
    two. The first call with a new layout also checks (one tiny all-reduce) that every
    rank passed the same keys, shapes and dtypes, and raises ``ValueError`` if not,
    instead of silently mixing parameters.

    One bucket is the default and, with the whole reduction issued after the backward pass
    on one stream, the fastest; ``bucket_mb`` is there to measure that
    (``benchmarks/allreduce.py --bucket-mb``) and as the place to overlap communication
    with the backward pass later.

    ``broadcast(tree, root)``: rank ``root``'s values to everyone (``ncclBcast``), e.g. the
    initial parameters so that every replica starts from the same point.
    ``barrier()``: a one-element all-reduce followed by a stream synchronisation.

    Checked against CuPy's API (docs.cupy.dev, ``cupy.cuda.nccl.NcclCommunicator``, and
    ``cupy_backends/cuda/libs/nccl.pyx``): ``NcclCommunicator(int ndev, commId, int rank)``
    (commId a tuple up to CuPy 13, bytes from 14); ``allReduce(sendbuf, recvbuf, count,
    datatype, op, stream)``, ``bcast(buff, count, datatype, root, stream)``,
    ``broadcast(sendbuff, recvbuff, count, datatype, root, stream)``, all pointers as ints;
    constants ``nccl.NCCL_FLOAT32``, ``NCCL_FLOAT64``, ``NCCL_FLOAT16``, ``NCCL_SUM``;
    ``nccl.get_version()`` (e.g. 21602 for 2.16.2) and ``nccl.available``.

    Two ranks on one GPU (tests, debugging): NCCL refuses this at init ("Multiple Ranks
    are using the same GPU/Partition", ncclInvalidUsage; ``src/init.cc``) unless the
    environment has ``NCCL_MULTI_RANK_GPU_ENABLE=1`` (NCCL User Guide, "Environment
    Variables", NCCL_MULTI_RANK_GPU_ENABLE; new in NCCL 2.30, absent from older NCCL,
    which always refuses; CuPy's own NCCL installer ships 2.16). With that variable set,
    a ``local_rank`` beyond the visible GPUs wraps around (``device_id = local_rank %
    n_gpus``) instead of raising.

    ``nccl`` and ``xp`` default to ``cupy.cuda.nccl`` and ``cupy``; tests pass stand-ins
    working on NumPy buffers to exercise everything but the GPU on a CPU."""

    def __init__(self, rank: int, size: int, local_rank: int = 0, master_addr: str = "127.0.0.1",
                 master_port: int = 29500, *, bucket_mb: float | None = None,
                 timeout: float = 300.0, device_id: int | None = None, nccl=None, xp=None):
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, world size {size}), got {rank}")
        self.rank, self.size, self.local_rank = int(rank), int(size), int(local_rank)
        self.bucket_bytes = None if not bucket_mb else int(bucket_mb * 2**20)
        if xp is None or nccl is None:
            xp, nccl = self._import_cupy_nccl()
        self.xp, self.nccl = xp, nccl
        self.device_id = self._select_device(device_id)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                        np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.float16): nccl.NCCL_FLOAT16}
        self._layouts: dict = {}      # signature -> (layout, send buffers)
        self._last_stream = None

        from .rendezvous import TCPStore
        self.store = TCPStore(master_addr, master_port, is_server=(self.rank == 0),
                              timeout=timeout)
        try:
            if self.rank == 0:
                self.store.set("nccl/unique_id", encode_unique_id(nccl.get_unique_id()))
            raw = self.store.get("nccl/unique_id")
            self.comm = _make_communicator(nccl, self.size, raw, self.rank)
        except BaseException:
            self.store.close()
            raise
        self._one = xp.zeros(1, dtype=np.float32)

    # -- setup --------------------------------------------------------------------------
    @staticmethod
    def _import_cupy_nccl():
        try:
            import cupy
            from cupy.cuda import nccl
        except Exception as e:  # ImportError or a CUDA runtime that fails to load
            raise RuntimeError("NcclComm needs CuPy with NCCL (pip install 'minisam[gpu]'); "
                               f"importing it failed: {e}") from e
        if not getattr(nccl, "available", False):
            raise RuntimeError(
                "CuPy was built without NCCL, so it cannot talk across GPUs; install NCCL "
                "for CuPy (see the CuPy installation guide, 'Additional CUDA Libraries', e.g. "
                "`python -m cupyx.tools.install_library --cuda 12.x --library nccl`)")
        return cupy, nccl

    def _select_device(self, device_id):
        xp = self.xp
        if not hasattr(xp, "cuda"):
            return None                                  # NumPy stand-in (tests)
        n = xp.cuda.runtime.getDeviceCount()
        if device_id is None:
            device_id = self.local_rank
            if device_id >= n and os.environ.get("NCCL_MULTI_RANK_GPU_ENABLE") == "1":
                device_id %= n
        if not 0 <= device_id < n:
            raise ValueError(
                f"local rank {self.local_rank} wants GPU {device_id} but {n} GPU(s) are "
                "visible; start at most one process per GPU (--nproc <= number of GPUs), or "
                "set NCCL_MULTI_RANK_GPU_ENABLE=1 (NCCL >= 2.30) to share GPUs for testing")
        xp.cuda.Device(device_id).use()
        return device_id

    @classmethod
    def from_env(cls, env=None, **kwargs) -> "NcclComm":
        """Build from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (set by
        ``minisam.launch``, torchrun or a scheduler script)."""
        env = os.environ if env is None else env
        return cls(rank=_env_int(env, "RANK"), size=_env_int(env, "WORLD_SIZE"),
                   local_rank=_env_int(env, "LOCAL_RANK", 0),
                   master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
                   master_port=_env_int(env, "MASTER_PORT"), **kwargs)

    # -- helpers ------------------------------------------------------------------------
    def _stream_ptr(self) -> int:
        """The current CuPy stream's handle (0, the legacy default stream, for NumPy).

        If the caller switched streams since the last call, wait for the old one, since the
        send buffers are reused and NCCL may still be reading them there."""
        xp = self.xp
        if not hasattr(xp, "cuda"):
            return 0
        stream = xp.cuda.get_current_stream()
        if self._last_stream is not None and self._last_stream.ptr != stream.ptr:
            self._last_stream.synchronize()
        self._last_stream = stream
        return stream.ptr

    def _nccl_dtype(self, dtype) -> int:
        try:
            return self._dtypes[np.dtype(dtype)]
        except KeyError:
            raise TypeError(f"NcclComm reduces float16/float32/float64 arrays, got {dtype}; "
                            "cast first (e.g. .astype('float32'))") from None

    def _layout(self, tree: dict):
        sig = layout_signature(tree, self.bucket_bytes)
        entry = self._layouts.get(sig)
        if entry is None:
            layout = plan_layout(tree, self.bucket_bytes)
            for b in layout.buckets:
                self._nccl_dtype(b.dtype)
            self._check_same_layout(layout)
            send = [self.xp.empty(b.size, dtype=b.dtype) for b in layout.buckets]
            entry = self._layouts[sig] = (layout, send)
        return entry

    def _check_same_layout(self, layout: FlatLayout):
        """All ranks must pack the same layout: compare a hash with one tiny all-reduce.

        With d_r the hash on rank r, sum(d)^2 == n sum(d^2) exactly when all d_r agree
        (Cauchy-Schwarz); 20-bit hashes keep the float64 sums exact."""
        if self.size == 1:
            return
        d = float(layout.digest())
        buf = self.xp.asarray(np.array([d, d * d], dtype=np.float64))
        self.comm.allReduce(_ptr(buf), _ptr(buf), 2, self.nccl.NCCL_FLOAT64,
                            self.nccl.NCCL_SUM, self._stream_ptr())
        s, s2 = (float(v) for v in to_numpy(buf))
        if s * s != self.size * s2:
            raise ValueError(
                "ranks passed different trees to the same collective (keys, shapes or dtypes "
                "differ between ranks); every rank must call allreduce_mean/broadcast with the "
                f"same dict structure. This rank's keys: {layout.keys[:5]}...")

    # -- collectives --------------------------------------------------------------------
    def allreduce_mean(self, tree: dict) -> dict:
        """Mean over ranks of every array in ``tree`` (sam_jax's ``lax.pmean(tree, 'batch')``)."""
        if not tree:
            return {}
        xp, nccl = self.xp, self.nccl
        layout, send = self._layout(tree)
        flatten(tree, layout, xp, out=send)
        stream = self._stream_ptr()
        recv = []
        for buf, b in zip(send, layout.buckets):
            out = xp.empty(b.size, dtype=b.dtype)
            self.comm.allReduce(_ptr(buf), _ptr(out), b.size, self._nccl_dtype(b.dtype),
                                nccl.NCCL_SUM, stream)
            out /= self.size
            recv.append(out)
        views = unflatten(recv, layout)
        return {k: views[k] for k in tree}

    def broadcast(self, tree: dict, root: int = 0) -> dict:
        """Rank ``root``'s arrays, on every rank. Other ranks' values are ignored, but their
        trees must have the same keys, shapes and dtypes (they give the buffer layout)."""
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root must be in [0, {self.size}), got {root}")
        if not tree:
            return {}
        xp = self.xp
        layout, _ = self._layout(tree)
        if self.rank == root:
            bufs = flatten(tree, layout, xp)
        else:
            bufs = [xp.empty(b.size, dtype=b.dtype) for b in layout.buckets]
        stream = self._stream_ptr()
        for buf, b in zip(bufs, layout.buckets):
            self.comm.bcast(_ptr(buf), b.size, self._nccl_dtype(b.dtype), root, stream)
        views = unflatten(bufs, layout)
        return {k: views[k] for k in tree}

    def barrier(self):
        """Return once every rank has reached here and this GPU's queued work is done."""
        self.comm.allReduce(_ptr(self._one), _ptr(self._one), 1, self.nccl.NCCL_FLOAT32,
                            self.nccl.NCCL_SUM, self._stream_ptr())
        if self._last_stream is not None:
            self._last_stream.synchronize()

    def close(self):
        """Free the NCCL communicator and stop the rendezvous store (rank 0)."""
        comm, self.comm = getattr(self, "comm", None), None
        if comm is not None:
            if self._last_stream is not None:
                self._last_stream.synchronize()
            comm.destroy()
        store, self.store = getattr(self, "store", None), None
        if store is not None:
            store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def comm_from_env(device: str = "gpu", nccl: bool | None = None, env=None, **kwargs):
    """The communicator for this process.

    ``nccl=None`` (auto): ``NcclComm.from_env`` when the environment says ``WORLD_SIZE > 1``
    (as set by ``python -m minisam.launch``), else ``LocalComm()``. ``nccl=True`` forces an
    NcclComm (even for one process), ``nccl=False`` forces ``LocalComm``. Multi-process
    runs need ``device='gpu'``: on the CPU, use thread replicas (``run_replicas``)."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    use_nccl = world > 1 if nccl is None else bool(nccl)
    if not use_nccl:
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} but NCCL was turned off; one process cannot "
                             "stand for several ranks")
        return LocalComm()
    if device != "gpu":
        raise ValueError(f"multi-process data parallelism (WORLD_SIZE={world}) runs on GPUs "
                         "with NCCL; use --device gpu, or thread replicas on the CPU")
    if "RANK" not in env and world == 1:   # forced NCCL for a lone process: fill in defaults
        from .rendezvous import free_port
        env = dict(env, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_PORT=env.get("MASTER_PORT") or str(free_port()))
    return NcclComm.from_env(env, **kwargs)
