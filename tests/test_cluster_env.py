"""Ranks started by other launchers: torchrun-style variables, Open MPI's mpirun, Slurm's
srun (``distributed.env.launcher_env``), down to an all-reduce over the NCCL stand-in."""
import threading

import numpy as np
import pytest

from minisam.distributed import comm_from_env
from minisam.distributed.env import first_host, launcher_env, rank_info, world_size
from minisam.distributed.local import LocalComm
from minisam.distributed.nccl import NcclComm
from minisam.distributed.rendezvous import free_port
from tests.test_parallel import FakeNccl


@pytest.mark.parametrize("nodelist, host", [
    ("node12", "node12"), ("gpu[01-04,07],cpu3", "gpu01"), ("gpu[07],x", "gpu07"),
    ("a[3-5]b", "a3b"), ("rack[1-2]-n[08-09]", "rack1-n08"), ("x,y[1-2]", "x")])
def test_first_host_of_a_slurm_hostlist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist, host", [("gpu[7] cpu3", "gpu7"), (" ,n[010-012]", "n010")])
def test_first_host_blank_separators_and_padding(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu[01-04", "gpu[a-b]", "gpu]3", "n{1..4}"])
def test_an_unreadable_hostlist_is_one_line_naming_master_addr(nodelist):
    with pytest.raises(ValueError, match="export MASTER_ADDR") as e:
        first_host(nodelist)
    assert "\n" not in str(e.value)


def slurm(rank, ntasks=4, **kw):
    return {"SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2),
            "SLURM_STEP_NODELIST": "gpu[03-04]", "SLURM_JOB_NODELIST": "gpu[03-04]",
            "SLURM_JOB_ID": "4242", **kw}


def ompi(rank, size=2, local_size=None, **kw):
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(size if local_size is None else local_size), **kw}


def test_srun_step_ranks():
    info = rank_info(slurm(3))
    assert info == dict(rank=3, size=4, local_rank=1, master_addr="gpu03",
                        master_port=29500 + 4242)
    assert rank_info(slurm(3, MASTER_PORT="31000", MASTER_ADDR="10.0.0.1"))[
        "master_addr"] == "10.0.0.1"


def test_srun_master_from_the_step_then_the_job_node_list():
    assert rank_info(slurm(1, SLURM_STEP_NODELIST="n[5-6]"))["master_addr"] == "n5"
    job_only = {k: v for k, v in slurm(1).items() if k != "SLURM_STEP_NODELIST"}
    assert rank_info({**job_only, "SLURM_JOB_NODELIST": "a7,b1"})["master_addr"] == "a7"
    assert rank_info(slurm(0, MASTER_PORT="31000"))["master_port"] == 31000


def test_a_batch_script_outside_srun_is_one_process():
    env = {k: v for k, v in slurm(0).items() if k != "SLURM_STEP_NUM_TASKS"}
    assert world_size(env) == 1
    assert world_size({}) == 1
    assert isinstance(comm_from_env("cpu", env=env), LocalComm)   # not refused on the CPU


def test_a_bad_scheduler_variable_is_one_line_naming_it():
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS must be an integer") as e:
        world_size(slurm(0, ntasks="four"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK must be an integer"):
        rank_info(ompi(0, OMPI_COMM_WORLD_RANK="zero"))


def test_mpirun_on_one_node_and_on_several():
    assert rank_info(ompi(1)) == dict(rank=1, size=2, local_rank=1, master_addr="127.0.0.1",
                                      master_port=29500)
    with pytest.raises(ValueError, match="export MASTER_ADDR") as e:
        rank_info(ompi(1, size=4, local_size=2))
    assert "mpirun -x MASTER_ADDR=" in str(e.value) and "\n" not in str(e.value)
    unknown = {k: v for k, v in ompi(1, size=4).items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"}
    with pytest.raises(ValueError, match="export MASTER_ADDR"):
        rank_info(unknown)                           # cannot tell: not assumed one node
    assert rank_info(ompi(1, size=4, local_size=2, MASTER_ADDR="n0"))["master_addr"] == "n0"


def test_explicit_rank_variables_come_first():
    # minisam.launch inside a Slurm allocation: its children's RANK/WORLD_SIZE win
    env = {**slurm(0, ntasks=1), **ompi(0, size=3), "RANK": "1", "WORLD_SIZE": "2",
           "LOCAL_RANK": "1", "MASTER_PORT": "29999"}
    assert rank_info(env) == dict(rank=1, size=2, local_rank=1, master_addr="127.0.0.1",
                                  master_port=29999)
    assert launcher_env(env)["WORLD_SIZE"] == "2"
    both = {**slurm(2), **ompi(1, size=3)}          # mpirun is checked before Slurm
    assert rank_info(both)["size"] == 3


@pytest.mark.parametrize("kind", ["torchrun", "mpirun", "srun"])
def test_two_ranks_reduce_through_nccl_in_each_environment(kind, monkeypatch):
    port = str(free_port())
    envs = {"torchrun": [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in (0, 1)],
            "mpirun": [ompi(r, MASTER_PORT=port) for r in (0, 1)],
            "srun": [slurm(r, ntasks=2, SLURM_STEP_NODELIST="localhost", MASTER_PORT=port)
                     for r in (0, 1)]}[kind]
    nccl, results, errors = FakeNccl(), [None, None], [None, None]
    monkeypatch.setattr(NcclComm, "_import_cupy_nccl", staticmethod(lambda: (np, nccl)))

    def rank(r):
        try:
            comm = comm_from_env("gpu", env=envs[r], timeout=20)   # NCCL: the stand-in
            with comm:
                results[r] = (comm.rank, comm.size,
                              comm.allreduce_mean({"g": np.full(3, r + 1.0, np.float32)})["g"])
        except BaseException as e:  # noqa: BLE001
            errors[r] = e

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [None, None]
    for r, (got_rank, size, g) in enumerate(results):
        assert (got_rank, size) == (r, 2)
        np.testing.assert_array_equal(g, np.full(3, 1.5, np.float32))
