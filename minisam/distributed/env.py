"""The environment a launcher gives each rank: the variable names, read in one place.

``minisam.distributed.launch`` (and torchrun) sets, for every process (mpirun's and
srun's own variables are translated to these by ``launcher_env``):

    RANK           global rank, node_rank * nproc + local_rank
    WORLD_SIZE     number of processes (one per GPU)
    LOCAL_RANK     rank on this node = the GPU it uses
    LOCAL_WORLD_SIZE, NODE_RANK
    MASTER_ADDR, MASTER_PORT   where rank 0 serves the rendezvous store
    MINISAM_LAUNCHED  "1": a launched child must not launch again
"""
from __future__ import annotations

import os

RANK, WORLD_SIZE, LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"
LOCAL_WORLD_SIZE, NODE_RANK = "LOCAL_WORLD_SIZE", "NODE_RANK"
MASTER_ADDR, MASTER_PORT = "MASTER_ADDR", "MASTER_PORT"
LAUNCHED = "MINISAM_LAUNCHED"


def env_int(env, name: str, default=None) -> int:
    """The integer in ``env[name]``; ``default`` if unset (ValueError if there is none)."""
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


# What other launchers set: Open MPI's mpirun and Slurm's srun.
OMPI_RANK, OMPI_SIZE = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"
OMPI_LOCAL_RANK, OMPI_LOCAL_SIZE = "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"
SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS = (
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS")
SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_JOB_ID = (
    "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
DEFAULT_PORT = 29500


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[07-09,12],cpu3`` -> ``gpu07``."""
    head, depth = "", 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    if "[" not in head:
        return head
    i = head.index("[")
    j = head.index("]", i)
    first = head[i + 1:j].split(",")[0].split("-")[0]
    return head[:i] + first + first_host(head[j + 1:])


def launcher_env(env) -> dict:
    """``env`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT filled in.

    Precedence: minisam's launcher or torchrun (RANK/WORLD_SIZE given: used as they are,
    even inside a Slurm allocation), then Open MPI's mpirun (OMPI_COMM_WORLD_*), then a
    Slurm job step started by srun (SLURM_STEP_NUM_TASKS, which srun sets and a batch
    script outside srun does not have, though it has SLURM_NTASKS). The master is
    MASTER_ADDR if set, else the first node of the step (Slurm) or this host (mpirun on one
    node); the port MASTER_PORT, else 29500 + SLURM_JOB_ID % 20000 under Slurm (so two jobs
    on one node do not collide), else 29500: every rank computes the same without talking."""
    env = dict(env)
    if env.get(WORLD_SIZE) or env.get(RANK):
        return env
    if env.get(OMPI_SIZE):
        size = env_int(env, OMPI_SIZE)
        out = {RANK: env.get(OMPI_RANK, "0"), WORLD_SIZE: str(size),
               LOCAL_RANK: env.get(OMPI_LOCAL_RANK, "0")}
        if not env.get(MASTER_ADDR):
            if env_int(env, OMPI_LOCAL_SIZE, size) != size:
                raise ValueError("mpirun across several nodes: export MASTER_ADDR (an address "
                                 "of rank 0's node, e.g. mpirun -x MASTER_ADDR=node0 ...)")
            out[MASTER_ADDR] = "127.0.0.1"
        out.setdefault(MASTER_PORT, env.get(MASTER_PORT) or str(DEFAULT_PORT))
        return {**env, **out}
    if env.get(SLURM_STEP_NUM_TASKS):
        nodes = env.get(SLURM_STEP_NODELIST) or env.get(SLURM_JOB_NODELIST) or "127.0.0.1"
        port = env.get(MASTER_PORT) or str(DEFAULT_PORT + env_int(env, SLURM_JOB_ID, 0) % 20000)
        return {**env, RANK: env.get(SLURM_PROCID, "0"), WORLD_SIZE: env[SLURM_STEP_NUM_TASKS],
                LOCAL_RANK: env.get(SLURM_LOCALID, "0"),
                MASTER_ADDR: env.get(MASTER_ADDR) or first_host(nodes), MASTER_PORT: port}
    return env


def world_size(env=None) -> int:
    """How many processes this job has (1 when no launcher says otherwise)."""
    return env_int(launcher_env(os.environ if env is None else env), WORLD_SIZE, 1)


def rank_info(env) -> dict:
    """The keyword arguments of ``NcclComm`` that the environment decides."""
    env = launcher_env(env)
    return dict(rank=env_int(env, RANK), size=env_int(env, WORLD_SIZE),
                local_rank=env_int(env, LOCAL_RANK, 0),
                master_addr=env.get(MASTER_ADDR) or "127.0.0.1",
                master_port=env_int(env, MASTER_PORT))
