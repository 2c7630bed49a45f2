"""Data parallelism: how replicas of the per-replica train step talk to each other.

The train step is SPMD, like the JAX code under ``jax.pmap(axis_name='batch')``: every
replica runs the same function on its slice of the batch and calls
``comm.allreduce_mean(tree)`` where the JAX code calls ``jax.lax.pmean(tree, 'batch')``.
A tree is a flat dict of arrays (parameters, gradients, BN state).

* ``local``: ``LocalComm`` (one replica), ``ThreadComm`` (N replicas as threads of one
  process, on the CPU), ``ReplicaThreads`` / ``run_replicas`` (run a function on them);
* ``nccl``: ``NcclComm``, one process per GPU over NCCL;
* ``rendezvous``: the TCP store through which the processes of a job find each other;
* ``launch``: ``python -m minisam.launch``, one process per GPU;
* ``replicas``: ``Replicas``, the topology of one training run as the trainer sees it;
* ``env``: which launcher started this process (minisam.launch/torchrun, mpirun, srun) and
  the variables it sets (RANK, WORLD_SIZE, ...), read in one place.

Importing this package (or ``local``) loads no NCCL and no socket code: ``sam.py`` sees a
communicator only through the contract below.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from .env import LOCAL_RANK, MASTER_PORT, RANK, WORLD_SIZE, world_size


@runtime_checkable
class Communicator(Protocol):
    """What the train step and the trainer ask of a communicator.

    ``rank`` in [0, size). Collectives must be called by every rank, in the same order,
    with trees of the same keys, shapes and dtypes; results have the caller's keys in the
    caller's order."""

    rank: int
    size: int
    # optional: ``device`` ("cpu" or "gpu") where its arrays must live (NcclComm: "gpu");
    # the Trainer refuses a run on another device

    def allreduce_mean(self, tree: dict) -> dict:
        """The mean over ranks of every array (``lax.pmean(tree, 'batch')``)."""

    def broadcast(self, tree: dict, root: int = 0) -> dict:
        """Rank ``root``'s arrays, on every rank."""

    def barrier(self) -> None:
        """Return once every rank has reached here."""

    def close(self) -> None:
        """Release what the communicator holds."""


def group_mean(comm, tree: dict, group_size: int = 0) -> dict:
    """The mean of ``tree`` over this rank's group of ``group_size`` consecutive ranks
    (0 or >= size: over every rank), with nothing asked of the communicator beyond
    ``allreduce_mean``: each rank posts its tree in its group's slot of a tree with one
    slot per group (zeros elsewhere), and rescales its slot of the mean. That costs
    size / group_size times the traffic, which is fine for a semantics tool. The JAX
    code's ``--inner_group_size`` (``local_replica_groups``) groups replicas by TPU
    topology; here a group is ranks [j G, (j + 1) G)."""
    if not group_size or group_size >= comm.size:
        return comm.allreduce_mean(tree)
    if group_size == 1:
        return tree
    if comm.size % group_size:
        raise ValueError(f"inner group size {group_size} does not divide the {comm.size} "
                         "replicas")
    groups, mine = comm.size // group_size, comm.rank // group_size
    slots = {f"group{j}/{k}": v if j == mine else v * 0 for j in range(groups)
             for k, v in tree.items()}
    mean = comm.allreduce_mean(slots)
    return {k: mean[f"group{mine}/{k}"] * (comm.size / group_size) for k in tree}


def comm_from_env(device: str = "gpu", nccl: bool | None = None, env=None, **kwargs):
    """The communicator for this process.

    ``nccl=None`` (auto): an ``NcclComm`` built from the environment when it says there
    is more than one process (``python -m minisam.launch`` or torchrun: WORLD_SIZE; Open
    MPI's mpirun; Slurm's srun: ``env.launcher_env``), else ``LocalComm()``.
    ``nccl=True`` forces an NcclComm (even for one process), ``nccl=False`` forces
    ``LocalComm``. Multi-process runs need ``device='gpu'``: on the CPU, use thread
    replicas. ``kwargs`` go to ``NcclComm``."""
    from .env import launcher_env
    from .local import LocalComm
    env = launcher_env(os.environ if env is None else env)   # torchrun, mpirun or srun
    world = world_size(env)
    use_nccl = world > 1 if nccl is None else bool(nccl)
    if not use_nccl:
        if world > 1:
            raise ValueError(f"the environment says {world} processes but NCCL was turned off; "
                             "one process cannot stand for several ranks")
        return LocalComm()
    if device != "gpu":
        raise ValueError(f"multi-process data parallelism ({world} processes) runs on GPUs "
                         "with NCCL; use --device gpu, or thread replicas on the CPU")
    from .nccl import NcclComm
    if RANK not in env and world == 1:   # forced NCCL for a lone process: fill in defaults
        from .rendezvous import free_port
        env = dict(env, **{RANK: "0", WORLD_SIZE: "1", LOCAL_RANK: "0",
                           MASTER_PORT: env.get(MASTER_PORT) or str(free_port())})
    return NcclComm.from_env(env, **kwargs)
