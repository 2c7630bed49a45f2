"""``Replicas``: the data-parallel replicas of one training run, as one process sees them.

A run has ``size`` replicas, numbered 0..size-1 (the JAX code's pmap devices). This process
computes some of them: all of them as threads (``--replicas R`` on the CPU), or exactly one
(one process per GPU, with a communicator across processes), or the only one. The trainer
decides which once and then never branches on it: it asks ``run(fn)`` to run a function on
every replica computed here and ``mean(trees)`` to average per-replica results over the
whole run.
"""
from __future__ import annotations

import weakref

from ..tree import mean_in_rank_order
from .local import LocalComm, ReplicaThreads


class Replicas:
    """``threads`` replicas in this process, or one replica of ``comm`` (another process's
    communicator, e.g. NCCL: this process is replica ``comm.rank`` of ``comm.size``)."""

    def __init__(self, threads: int = 1, comm=None):
        if comm is not None and threads != 1:
            raise ValueError(f"a process with a communicator computes one replica; got "
                             f"threads={threads} with a {comm.size}-rank communicator")
        self.comm = LocalComm() if comm is None else comm   # across processes
        self.size = threads * self.comm.size
        self.ranks = [self.comm.rank * threads + i for i in range(threads)]  # computed here
        self._threads = ReplicaThreads(threads) if threads > 1 else None
        if self._threads is not None:   # stop the threads when the trainer is gone
            weakref.finalize(self, self._threads.close)

    @property
    def main(self) -> bool:
        """True in the process that writes files and shows progress (global rank 0)."""
        return self.comm.rank == 0

    @property
    def holds_all(self) -> bool:
        """True when this process computes every replica (it can save all their BN state)."""
        return len(self.ranks) == self.size

    def run(self, fn) -> list:
        """``[fn(i, comm_i) for each replica i computed here]``, replica i being global rank
        ``ranks[i]`` and ``comm_i`` what its train step talks through."""
        if self._threads is None:
            return [fn(0, self.comm)]
        return self._threads.run(fn)

    def mean(self, trees: list, collective: bool = True) -> dict:
        """The mean over every replica of the run, given this process's replicas' trees in
        order: summed in rank order here, then across processes (a collective: every process
        must call it). ``collective=False`` averages this process's replicas only."""
        local = mean_in_rank_order(trees)
        return self.comm.allreduce_mean(local) if collective else local

    def close(self):
        """Stop the replica threads (``run`` refuses afterwards)."""
        if self._threads is not None:
            self._threads.close()
