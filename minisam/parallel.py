"""Communicators: how replicas of the per-replica train step talk to each other.

The train step is SPMD, like the JAX code under ``jax.pmap(axis_name='batch')``: every
replica runs the same function on its slice of the batch and calls
``comm.allreduce_mean(tree)`` where the JAX code calls ``jax.lax.pmean(tree, 'batch')``.

* ``LocalComm``: one replica; the mean is the identity.
* ``ThreadComm``: N replicas as N threads of one process on the CPU, meeting at a barrier.
  NumPy releases the GIL in its heavy kernels, so the threads do overlap. Tests use it to
  check per-replica BN statistics and per-replica perturbations against the two-replica
  JAX reference without any GPU.
"""
from __future__ import annotations

import threading


class LocalComm:
    rank, size = 0, 1

    def allreduce_mean(self, tree: dict) -> dict:
        return tree

    def barrier(self):
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
