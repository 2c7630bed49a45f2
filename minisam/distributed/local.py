"""Replicas inside one process: ``LocalComm`` (one replica) and ``ThreadComm`` (N threads).

``ThreadComm`` runs N replicas as N threads of one process, meeting at a barrier. On the
CPU NumPy releases the GIL in its heavy kernels, so the threads overlap; on a GPU they
all queue work on the caller's device and stream, which simulates N replicas (their own
BN statistics and perturbations) without N GPUs, at no speed-up. Tests use
it to check per-replica BN statistics and per-replica perturbations against the
two-replica JAX reference without any GPU, and the trainer uses it for ``--replicas R``.

``ReplicaThreads`` keeps the N threads alive between calls (one ``run(fn)`` per training
step): starting threads every step costs time, and on a GPU it would also throw away
CuPy's per-thread cuBLAS handles, whose destruction synchronises the device.
"""
from __future__ import annotations

import queue
import threading

from ..backend import thread_context
from ..tree import FlatTree, mean_in_rank_order, same_layout


class LocalComm:
    """One replica: every collective is the identity."""
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

    def abort(self):
        """Wake every thread waiting in a collective with ``threading.BrokenBarrierError``."""
        self._barrier.abort()

    def reset(self):
        """Make the group usable again after ``abort``."""
        self._barrier.reset()
        self._slots = [None] * self.size


class _ThreadRank:
    def __init__(self, group: ThreadComm, rank: int):
        self.group, self.rank, self.size = group, rank, group.size
        self.local_rank = rank

    def barrier(self):
        self.group._barrier.wait()

    def _exchange(self, tree: dict) -> list:
        """Post ``tree``, wait for everyone's, return them all by rank."""
        g = self.group
        g._slots[self.rank] = tree
        self.barrier()                     # every replica has posted its tree
        return list(g._slots)

    def allreduce_mean(self, tree: dict) -> dict:
        """Mean over replicas, summed in rank order so that every replica gets the same bits."""
        trees = self._exchange(tree)
        if same_layout(tree, *trees):      # one buffer each: sum the buffers
            out = FlatTree.over(mean_in_rank_order(trees).flat, tree)
        else:
            out = mean_in_rank_order([{k: t[k] for k in tree} for t in trees])
        self.barrier()                     # nobody overwrites a slot still being read
        return out

    def broadcast(self, tree: dict, root: int = 0) -> dict:
        """Every replica gets a copy of ``root``'s tree (same keys as its own)."""
        src = self._exchange(tree)[root]
        out = {k: src[k].copy() for k in tree}
        self.barrier()
        return out

    def close(self):
        pass


class ReplicaThreads:
    """``size`` replicas that live as long as this object: rank 0 runs in the caller's
    thread, ranks 1.. in threads started once.

    ``run(fn)`` calls ``fn(rank, comm)`` on every replica (``comm`` its ``ThreadComm``
    handle) and returns the results by rank. On a GPU every replica runs on the caller's
    device and current stream (``backend.thread_context``). An exception in any replica (a
    ``KeyboardInterrupt`` in the caller's thread included) aborts the group's barrier so no
    thread hangs, waits for every replica to stop, and is re-raised in the caller."""

    def __init__(self, size: int):
        self.group = ThreadComm(size)
        self.size = size
        self.comms = [self.group.for_rank(r) for r in range(size)]
        self._jobs = [queue.SimpleQueue() for _ in range(size)]
        self._done = [queue.SimpleQueue() for _ in range(size)]
        self._threads = [threading.Thread(target=self._serve, args=(r,), daemon=True,
                                          name=f"minisam-replica-{r}") for r in range(1, size)]
        for t in self._threads:
            t.start()

    def _serve(self, rank: int):
        while (job := self._jobs[rank].get()) is not None:
            fn, context = job
            try:
                with context():
                    self._done[rank].put((fn(rank, self.comms[rank]), None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self.group.abort()
                self._done[rank].put((None, e))

    def run(self, fn) -> list:
        if not self._threads and self.size > 1:
            raise RuntimeError("these replica threads were closed")
        context = thread_context()     # the caller's GPU and stream, in every replica
        for r in range(1, self.size):
            self._jobs[r].put((fn, context))
        results, errors = [None] * self.size, [None] * self.size
        try:
            results[0] = fn(0, self.comms[0])
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others stop
            errors[0] = e
            self.group.abort()
        for r in range(1, self.size):
            while True:
                try:
                    results[r], errors[r] = self._done[r].get()
                    break
                except BaseException as e:  # noqa: BLE001 - Ctrl-C while waiting: stop the
                    errors[0] = errors[0] or e  # others at their next collective, keep waiting
                    self.group.abort()
        if any(e is not None for e in errors):
            self.group.reset()
            broken = threading.BrokenBarrierError
            raise next((e for e in errors if e is not None and not isinstance(e, broken)),
                       next(e for e in errors if e is not None))
        return results

    def close(self):
        self.group.abort()             # a replica stuck in a collective gets out of it
        for r in range(1, self.size):
            self._jobs[r].put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_replicas(size: int, fn) -> list:
    """Run ``fn(rank, comm)`` on ``size`` thread replicas sharing a ThreadComm; results by rank."""
    with ReplicaThreads(size) as replicas:
        return replicas.run(fn)
