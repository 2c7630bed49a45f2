"""``NcclComm``: one process per GPU, talking through NCCL (``cupy.cuda.nccl``).

Started by ``python -m minisam.launch`` (or torchrun, or a scheduler), built by
``distributed.comm_from_env()`` when ``WORLD_SIZE > 1``.
"""
from __future__ import annotations

import os

import numpy as np

from ..backend import to_numpy
from ..tree import FlatTree
from .env import rank_info
from ..flat import FlatLayout, flatten, layout_signature, plan_layout, unflatten

NCCL_UNIQUE_ID_BYTES = 128


def encode_unique_id(uid) -> bytes:
    """NCCL's unique id as 128 raw bytes for the wire, whichever form this CuPy returns
    (a tuple of C chars up to CuPy 13, bytes from 14)."""
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


def _ptr(a) -> int:
    """Device pointer of a CuPy array (``a.data.ptr``), host pointer of a NumPy array."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


class NcclComm:
    """Data parallelism across processes, one GPU each, over NCCL (``cupy.cuda.nccl``).

    Rendezvous: rank 0 serves a ``rendezvous.TCPStore`` on ``master_addr:master_port``,
    makes the NCCL unique id and stores it; the other ranks read it; then every rank
    builds its ``NcclCommunicator`` on its own GPU (``device_id = local_rank`` by default;
    past the visible GPUs it wraps around only with ``NCCL_MULTI_RANK_GPU_ENABLE=1``).

    ``allreduce_mean(tree)``: the tree is packed (``flat.plan_layout``: sorted keys, grouped
    by dtype, one bucket per dtype or buckets of about ``bucket_mb``) into a send buffer
    kept from call to call; each bucket is summed by one all-reduce on the current CuPy
    stream into a fresh receive buffer, divided by ``size``, and returned as views into it
    (keys in the caller's order). Everything is stream-ordered: no host synchronisation.
    All ranks get the same bits, but not the rank-order sum of ``ThreadComm``: expect
    float32 rounding differences between the two. The first call with a new layout checks
    (one tiny all-reduce) that every rank passed the same keys, shapes and dtypes, and
    raises ``ValueError`` if not, instead of silently mixing parameters.

    ``broadcast(tree, root)``: rank ``root``'s values to everyone, e.g. the initial
    parameters. ``barrier()``: a one-element all-reduce, then a stream synchronisation.

    ``nccl`` and ``xp`` default to ``cupy.cuda.nccl`` and ``cupy``; tests pass stand-ins
    working on NumPy buffers to exercise everything but the GPU on a CPU. Which CuPy and
    NCCL versions this was checked against, and why: docs/multi_gpu.md, "NCCL and CuPy"."""

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
        self.device = "gpu" if hasattr(xp, "cuda") else "cpu"   # where its arrays must live
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
            raise RuntimeError("NcclComm needs CuPy with NCCL (pip install "
                               "'minisam[gpu-cuda12]' or 'minisam[gpu-cuda13]'); "
                               f"importing it failed: {e}") from e
        if not getattr(nccl, "available", False):
            raise RuntimeError(
                "CuPy was built without NCCL, so it cannot talk across GPUs; install NCCL "
                "for CuPy (see docs/multi_gpu.md, 'NCCL and CuPy')")
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
        return cls(**rank_info(os.environ if env is None else env), **kwargs)

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
        stream = self._stream_ptr()   # first: a switched-from stream may still read `send`
        if isinstance(tree, FlatTree) and tree.layout == layout:
            send = [tree.flat]        # already one buffer in this layout: no packing
        else:
            flatten(tree, layout, xp, out=send)
        recv = []
        for buf, b in zip(send, layout.buckets):
            out = xp.empty(b.size, dtype=b.dtype)
            self.comm.allReduce(_ptr(buf), _ptr(out), b.size, self._nccl_dtype(b.dtype),
                                nccl.NCCL_SUM, stream)
            out /= self.size
            recv.append(out)
        if isinstance(tree, FlatTree) and len(recv) == 1:
            return FlatTree.build(recv[0], layout, tree.keys())
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
