"""Flat buffers: where each array of a tree lives inside a few contiguous buffers.

Two users. ``tree.FlatTree`` keeps parameters, gradients and momentum as views into one
buffer (``plan_layout`` with no bucket size), so the optimizer's elementwise maths is one
array operation per step instead of one per array. ``distributed.nccl`` all-reduces a tree
with one NCCL call per bucket instead of one per array: a WRN-28-10 has ~100 parameter
arrays, and one all-reduce each would pay NCCL's launch latency ~100 times (a FlatTree is
sent as it is, with no packing). The packing is pure array code (``xp`` is NumPy or CuPy),
so it is tested on the CPU.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


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
