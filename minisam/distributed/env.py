"""The environment a launcher gives each rank: the variable names, read in one place.

``minisam.distributed.launch`` (and torchrun, or a scheduler script) sets, for every process:

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


def world_size(env=None) -> int:
    """WORLD_SIZE, 1 when unset: how many processes this job has."""
    return env_int(os.environ if env is None else env, WORLD_SIZE, 1)


def rank_info(env) -> dict:
    """The keyword arguments of ``NcclComm`` that the environment decides."""
    return dict(rank=env_int(env, RANK), size=env_int(env, WORLD_SIZE),
                local_rank=env_int(env, LOCAL_RANK, 0),
                master_addr=env.get(MASTER_ADDR) or "127.0.0.1",
                master_port=env_int(env, MASTER_PORT))
