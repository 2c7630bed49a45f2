"""The environment a launcher gives each rank: the variable names, read in one place.

``minisam.distributed.launch`` (and torchrun) sets, for every process (mpirun's and
srun's own variables are translated to these by ``launcher_env``):

    RANK           global rank, node_rank * nproc + local_rank
    WORLD_SIZE     number of processes (one per GPU)
    LOCAL_RANK     rank on this node = the GPU it uses
    LOCAL_WORLD_SIZE, NODE_RANK
    MASTER_ADDR, MASTER_PORT   where rank 0 serves the rendezvous store
    MINISAM_LAUNCHED  "1": a launched child must not launch again

Open MPI's mpirun sets OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK and _LOCAL_SIZE; a Slurm
job step started by srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
SLURM_STEP_NODELIST (with SLURM_JOB_NODELIST and SLURM_JOB_ID from the job).
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
                             "`python -m minisam.launch --nproc N -- ...`, srun or mpirun")
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
DEFAULT_PORT = 29500      # MASTER_PORT when nothing else decides (torchrun's default too)
JOB_PORTS = 20000         # under srun: DEFAULT_PORT + SLURM_JOB_ID % JOB_PORTS


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[07-09,12],cpu3`` -> ``gpu07``.

    Slurm writes node lists compressed, as in its ``src/common/hostlist.c``: hosts separated
    by commas (or blanks), each ``prefix[ranges]suffix`` with zero-padded ranges, several
    brackets in one host allowed (``rack[1-2]-n[08-09]`` -> ``rack1-n08``). The first host
    takes the first number of every bracket."""
    s = nodelist.strip(", \t\n")
    head, depth = "", 0
    for ch in s:
        if ch in ", \t\n" and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    host, rest = "", head
    while "[" in rest:
        prefix, _, rest = rest.partition("[")
        inside, closed, rest = rest.partition("]")
        first = inside.split(",")[0].split("-")[0].strip()
        if not closed or not first.isdigit():
            rest = "]"                                   # malformed: refused below
            break
        host += prefix + first
    host += rest
    if not host or any(c in host for c in "[]{}"):
        raise ValueError(f"cannot read the first host of the Slurm node list {nodelist!r}; "
                         "export MASTER_ADDR=<the first node's address> in the job script")
    return host


def launcher_env(env) -> dict:
    """``env`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT filled in.

    Precedence: minisam's launcher or torchrun (RANK/WORLD_SIZE given: used as they are,
    even inside a Slurm allocation), then Open MPI's mpirun (OMPI_COMM_WORLD_*; before
    Slurm because mpirun inside a Slurm job starts its daemons with srun, whose SLURM_STEP_*
    its ranks may inherit), then a Slurm job step started by srun. The master is
    MASTER_ADDR if set, else the first node of the step (Slurm) or this host (mpirun on one
    node); the port MASTER_PORT, else DEFAULT_PORT + SLURM_JOB_ID % JOB_PORTS under srun (so
    two jobs on one node do not collide), else DEFAULT_PORT: every rank computes the same
    without talking.

    Sources. Open MPI "Environment variables set for MPI applications"
    (https://docs.open-mpi.org/en/v5.0.6/tuning-apps/environment-var.html). Slurm's man
    pages, OUTPUT ENVIRONMENT VARIABLES: srun(1) (https://slurm.schedmd.com/srun.html)
    gives each task SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_ID, SLURM_STEP_NODELIST and
    SLURM_STEP_NUM_TASKS, "number of processes in the job step"; sbatch(1)
    (https://slurm.schedmd.com/sbatch.html) gives the batch script SLURM_PROCID,
    SLURM_LOCALID and SLURM_NTASKS (the job's task count, though the script is a single
    process) and no SLURM_STEP_* (nor does salloc(1)). Hence SLURM_STEP_NUM_TASKS, never
    SLURM_NTASKS, says how many ranks there are, and a batch script without srun is one."""
    env = dict(env)
    if env.get(WORLD_SIZE) or env.get(RANK):
        return env
    if env.get(OMPI_SIZE):
        out = _ranks(env, OMPI_RANK, OMPI_SIZE, OMPI_LOCAL_RANK)
        if not env.get(MASTER_ADDR):
            if env_int(env, OMPI_LOCAL_SIZE, 0) != int(out[WORLD_SIZE]):  # unknown: several
                raise ValueError("mpirun across several nodes: export MASTER_ADDR (an address "
                                 "of rank 0's node, e.g. mpirun -x MASTER_ADDR=node0 ...)")
            out[MASTER_ADDR] = "127.0.0.1"
        out[MASTER_PORT] = env.get(MASTER_PORT) or str(DEFAULT_PORT)
        return {**env, **out}
    if env.get(SLURM_STEP_NUM_TASKS):
        nodes = env.get(SLURM_STEP_NODELIST) or env.get(SLURM_JOB_NODELIST) or "127.0.0.1"
        job = env_int(env, SLURM_JOB_ID, 0)
        port = env.get(MASTER_PORT) or str(DEFAULT_PORT + job % JOB_PORTS)
        return {**env, **_ranks(env, SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID),
                MASTER_ADDR: env.get(MASTER_ADDR) or first_host(nodes), MASTER_PORT: port}
    return env


def _ranks(env, rank: str, size: str, local_rank: str) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK from a scheduler's names, read here so that a bad value
    is reported under the name the scheduler (or the user) set."""
    return {RANK: str(env_int(env, rank, 0)), WORLD_SIZE: str(env_int(env, size)),
            LOCAL_RANK: str(env_int(env, local_rank, 0))}


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
