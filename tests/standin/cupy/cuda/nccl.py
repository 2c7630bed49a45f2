"""``cupy.cuda.nccl`` of the stand-in: collectives through files, so that ranks may be
threads of one process or processes started by the launcher.

The unique id names a fresh folder; call n of rank r writes ``n.r.npy`` (atomically),
waits for every rank's file, and reduces them in rank order, so every rank gets the same
bits. Buffers are read and written by address, as NCCL does with device pointers.
Once a rank sees every file of call n, every rank has finished call n - 1, so each rank
then deletes its own file of call n - 1.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
import time

import numpy as np

available = True
NCCL_SUM = 0
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
_DTYPES = {NCCL_FLOAT16: np.float16, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
TIMEOUT = float(os.environ.get("MINISAM_STANDIN_NCCL_TIMEOUT", "60"))
PREFIX = b"minisam-standin-nccl:"
FOLDER_ENV = "MINISAM_STANDIN_NCCL_DIR"   # where the folders go (tests/conftest.py: a temp dir)


def get_version() -> int:
    return 23006


def get_build_version() -> int:
    return 23006


def get_unique_id() -> bytes:
    folder = tempfile.mkdtemp(prefix="minisam-nccl-", dir=os.environ.get(FOLDER_ENV) or None)
    raw = PREFIX + folder.encode()
    if len(raw) > 128:
        raise RuntimeError(f"temporary folder name too long for a unique id: {folder}")
    return raw + b"\0" * (128 - len(raw))


class NcclError(RuntimeError):
    pass


class NcclCommunicator:
    def __init__(self, ndev: int, commId, rank: int):
        if not isinstance(commId, bytes):   # CuPy 14 takes the id as bytes
            raise TypeError(f"commId must be bytes, got {type(commId).__name__}")
        if not commId.startswith(PREFIX):
            raise NcclError("ncclInvalidArgument: not a unique id of this NCCL stand-in")
        self.folder = commId[len(PREFIX):].rstrip(b"\0").decode()
        self.ndev, self.rank, self.seq = int(ndev), int(rank), 0
        if not 0 <= self.rank < self.ndev:
            raise NcclError(f"ncclInvalidArgument: rank {rank} of {ndev}")
        self._exchange(np.zeros(1, np.float32))      # ncclCommInitRank waits for everyone

    def _exchange(self, mine: np.ndarray | None) -> list:
        n, self.seq = self.seq, self.seq + 1
        path = os.path.join(self.folder, f"{n}.{self.rank}.npy")
        if mine is not None:
            with open(path + ".tmp", "wb") as f:
                np.save(f, mine)
            os.replace(path + ".tmp", path)
        else:
            open(path, "wb").close()                 # "here", with nothing to give
        files = [os.path.join(self.folder, f"{n}.{r}.npy") for r in range(self.ndev)]
        deadline = time.monotonic() + TIMEOUT
        while not all(os.path.exists(f) for f in files):
            if time.monotonic() > deadline:
                raise NcclError(f"NCCL stand-in: rank {self.rank} waited {TIMEOUT:.0f} s for "
                                f"call {n} of the other ranks")
            time.sleep(0.0005)
        out = [np.load(f) if os.path.getsize(f) else None for f in files]
        if n > 0:
            try:
                os.remove(os.path.join(self.folder, f"{n - 1}.{self.rank}.npy"))
            except FileNotFoundError:
                pass
        return out

    @staticmethod
    def _view(ptr, count, datatype):
        dt = np.dtype(_DTYPES[datatype])
        return np.frombuffer((ctypes.c_char * (count * dt.itemsize)).from_address(ptr), dt)

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        if op != NCCL_SUM:
            raise NcclError("the stand-in only sums")
        parts = self._exchange(self._view(sendbuf, count, datatype).copy())
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        self._view(recvbuf, count, datatype)[:] = total

    def bcast(self, buff, count, datatype, root, stream):
        mine = self._view(buff, count, datatype).copy() if self.rank == root else None
        parts = self._exchange(mine)
        self._view(buff, count, datatype)[:] = parts[root]

    def destroy(self):
        pass

    def rank_id(self):
        return self.rank

    def size(self):
        return self.ndev
