"""The GPU code path: host synchronisations, replica threads' device and stream, TF32,
peak live memory, a trainer on the GPU with exact resume, and the refusals that keep
NumPy and CuPy arrays apart.

The ``gpu`` tests run on a real GPU, and in ``make test`` under the strict CuPy stand-in
(tests/standin), which also counts host syncs. Which counts are exact where: a stand-in
counts every ``float()``, ``.item()``, ``asnumpy``...; on a real GPU,
``cupyx.allow_synchronize(False)`` raises on any synchronisation CuPy starts.
"""
import contextlib
import os
import sys

import numpy as np
import pytest

from minisam import cli
from minisam.backend import gpu_available, set_tf32, tf32_enabled, to_device, to_numpy
from minisam.config import TrainConfig
from minisam.data import synthetic
from minisam.distributed.local import ReplicaThreads, ThreadComm
from minisam.distributed.rendezvous import free_port
from minisam.models import WideResnet
from minisam.optim import nesterov_init
from minisam.sam import SAMConfig, train_step
from minisam.train import Trainer

def cupy():
    import cupy as cp
    return cp


def standin():
    """The stand-in's counters, or None on a real CuPy."""
    return getattr(cupy(), "standin", None)


@contextlib.contextmanager
def counting_syncs():
    """Yields a dict whose "n" is the number of host syncs inside the block (stand-in), or
    makes any sync an error (real CuPy, this thread only)."""
    counts = {"n": None}
    s = standin()
    if s is None:
        import cupyx
        with cupyx.allow_synchronize(False):
            yield counts
        counts["n"] = 0
        return
    before = s.host_syncs()
    yield counts
    counts["n"] = s.host_syncs() - before
    counts["kinds"] = sorted({k for k, _ in s.syncs[before:]})


def problem(device, n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = to_device(rng.standard_normal((n, 8, 8, 3)).astype(np.float32), device)
    y = to_device(rng.integers(0, 4, n).astype(np.int32), device)
    model = WideResnet(1, 1, 4, seed=0)
    params = {k: to_device(v, device) for k, v in model.get_params().items()}
    state = {k: to_device(v, device) for k, v in model.get_state().items()}
    return model, params, state, x, y


def data(n_train=256, n_test=64):
    return (synthetic(n_train, (8, 8, 3), 4, seed=0),
            synthetic(n_test, (8, 8, 3), 4, seed=1, split="test"))


# ----------------------------------------------------------------------------- host syncs
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_train_step_never_synchronises_with_the_host(sync, clip):
    model, params, state, x, y = problem("gpu")
    cfg = SAMConfig(rho=0.05, gradient_clipping=clip, sync_perturbations=sync)
    mom = nesterov_init(params)
    train_step(model, params, state, mom, x, y, 0.1, cfg)           # warm up
    with counting_syncs() as c:
        p, s, m, metrics = train_step(model, params, state, mom, x, y, 0.1, cfg)
    assert c["n"] == 0, f"train_step synchronised {c['n']} times: {c.get('kinds')}"
    assert all(type(v).__module__.startswith("cupy") for v in metrics.values())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("variant", ["gsam", "looksam_full", "looksam_reuse", "micro",
                                     "micro_sync", "semantics"])
def test_variants_and_switches_never_synchronise_with_the_host(variant):
    """GSAM, LookSAM (both kinds of step), micro-batch m-SAM and the davda54/ASAM switches
    keep the step on the device, like train_step."""
    from minisam import variants
    model, params, state, x, y = problem("gpu")
    cfg = SAMConfig(rho=0.05, sync_perturbations=variant == "micro_sync")
    mom = nesterov_init(params)
    g_v = variants.looksam_step(model, params, state, mom, x, y, 0.1, cfg, 0, 2, 0.7)[4]
    run = {
        "gsam": lambda: variants.gsam_step(model, params, state, mom, x, y, 0.1, cfg, 0.4),
        "looksam_full": lambda: variants.looksam_step(model, params, state, mom, x, y, 0.1, cfg,
                                                      0, 2, 0.7, g_v),
        "looksam_reuse": lambda: variants.looksam_step(model, params, state, mom, x, y, 0.1,
                                                       cfg, 1, 2, 0.7, g_v),
        "micro": lambda: variants.microbatch_step(model, params, state, mom, x, y, 0.1, cfg, 2),
        "micro_sync": lambda: variants.microbatch_step(model, params, state, mom, x, y, 0.1,
                                                       cfg, 2),
        "semantics": lambda: train_step(model, params, state, mom, x, y, 0.1, SAMConfig(
            rho=0.5, adaptive="asam", norm_eps=1e-16, weight_decay_in="optimizer",
            perturbed_bn_stats="update", restore="subtract", nesterov=False)),
    }[variant]
    run()                                                           # warm up
    with counting_syncs() as c:
        metrics = run()[3]
    assert c["n"] == 0, f"{variant} synchronised {c['n']} times: {c.get('kinds')}"
    assert all(type(v).__module__.startswith("cupy") for v in metrics.values())


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_two_thread_replicas_step_without_host_syncs():
    if standin() is None:
        pytest.skip("counting syncs in several threads needs the stand-in's counter")
    model, params, state, x, y = problem("gpu")
    models = [model, WideResnet(1, 1, 4, seed=0)]
    cfg = SAMConfig(rho=0.05)
    mom = nesterov_init(params)
    with ReplicaThreads(2) as replicas:
        def replica(r, comm):
            return train_step(models[r], params, state, mom, x[4 * r:4 * r + 4],
                              y[4 * r:4 * r + 4], 0.1, cfg, comm)
        replicas.run(replica)
        with counting_syncs() as c:
            replicas.run(replica)
    assert c["n"] == 0, c.get("kinds")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("replicas", [1, 2])
def test_trainer_synchronises_once_per_step(replicas):
    if standin() is None:
        pytest.skip("an exact count needs the stand-in's counter")
    cfg = TrainConfig(dataset="synthetic", model="wrn10_1", epochs=1, batch_size=16,
                      replicas=replicas, device="gpu")
    trainer = Trainer(cfg, None, max_steps=5, progress=False, data=data())
    assert trainer.steps_per_epoch > 5
    with counting_syncs() as c:
        rec = trainer.fit()
    assert rec["stopped_at_step"] == 5
    assert c["n"] == 5, f"{c['n']} host syncs in 5 steps: {c.get('kinds')}"


# ----------------------------------------------------------------------------- threads
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_replica_threads_run_on_the_callers_device_and_stream():
    cp = cupy()
    device = cp.cuda.runtime.getDeviceCount() - 1   # not device 0 where there are two
    with cp.cuda.Device(device):
        stream = cp.cuda.Stream(non_blocking=True)
        with stream, ReplicaThreads(3) as replicas:
            seen = replicas.run(lambda r, comm: (cp.cuda.Device().id,
                                                 cp.cuda.get_current_stream().ptr))
    assert seen == [(device, stream.ptr)] * 3


# ----------------------------------------------------------------------------- trainer
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_trainer_on_the_gpu_resumes_exactly(tmp_path):
    cfg = TrainConfig(dataset="synthetic", model="wrn10_1", epochs=2, batch_size=32,
                      device="gpu", replicas=2)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    Trainer(cfg, full, progress=False, data=data()).fit()
    assert Trainer(cfg, part, progress=False, max_steps=11, data=data()).fit()[
        "stopped_at_step"] == 11
    Trainer(None, part, resume=True, progress=False, data=data()).fit()
    from minisam.rundir import load_checkpoint
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a.meta["step"] == b.meta["step"] == 16
    exact = standin() is not None      # a real GPU may reorder float32 sums
    for part_name in ("params", "state", "momentum"):
        x, y = getattr(a, part_name), getattr(b, part_name)
        for k in x:
            if exact:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{part_name}/{k}")
            else:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- TF32
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_tf32_is_off_unless_asked_for_and_verify_runs_float32(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "1")   # what a user may have exported: not our switch
    cfg = TrainConfig(dataset="synthetic", model="wrn10_1", epochs=1, batch_size=16,
                      device="gpu")
    Trainer(cfg, None, max_steps=0, progress=False, data=data())
    assert not tf32_enabled()
    Trainer(TrainConfig(**{**cfg.__dict__, "tf32": True}), None, max_steps=0,
            progress=False, data=data())
    assert tf32_enabled()
    from minisam.verify import verify_case
    seen = []
    import minisam.verify as verify_mod
    monkeypatch.setattr(verify_mod, "_verify_case",
                        lambda *a, **k: seen.append(tf32_enabled()) or "report")
    assert verify_case("case.npz", "gpu") == "report"
    assert seen == [False] and tf32_enabled()        # float32 inside, restored after
    set_tf32(False)


def test_tf32_needs_the_gpu():
    with pytest.raises(ValueError, match="tf32 .*needs device 'gpu'"):
        TrainConfig(dataset="digits", tf32=True)
    with pytest.raises(ValueError, match="tf32"):
        TrainConfig(dataset="digits", device="gpu", tf32=1)
    from minisam.bench import bench
    with pytest.raises(ValueError, match="--tf32 needs --device gpu"):
        bench("wrn10_1", 2, "cpu", tf32=True)


# ----------------------------------------------------------------------------- memory
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
def test_peak_live_memory_counts_live_bytes_not_the_pool():
    cp = cupy()
    from minisam.bench import bench, peak_live_hook
    pool = cp.get_default_memory_pool()
    mib = 2 ** 20
    base = pool.used_bytes()
    with peak_live_hook(cp) as hook:
        a = cp.empty(2 * mib, dtype=cp.uint8)
        b = cp.empty(mib, dtype=cp.uint8)
        del a, b                                  # 3 MiB live at the peak, then none
        c = cp.empty(mib // 2, dtype=cp.uint8)
    assert 3 * mib <= hook.peak - base < 3 * mib + 4096
    assert pool.used_bytes() - base < mib and pool.total_bytes() >= base + 3 * mib
    del c
    r = bench("wrn10_1", 4, "gpu", warmup=1, steps=1)
    params_mb = WideResnet(1, 1, 10, seed=0).num_params() * 4 / mib
    assert params_mb < r["sam_peak_memory_mb"] <= r["pool_mb"] + 1e-9
    assert r["peak_memory_mb"] == max(r["sgd_peak_memory_mb"], r["sam_peak_memory_mb"])
    assert r["tf32"] is False and "live" in r["peak_memory_kind"]


# ----------------------------------------------------------------------------- refusals
class _GpuComm(ThreadComm):
    """A one-rank communicator that says its arrays live on the GPU (as NcclComm does)."""
    device, rank = "gpu", 0

    def allreduce_mean(self, tree):
        return tree

    broadcast = allreduce_mean


def test_a_communicator_on_another_device_is_refused():
    cfg = TrainConfig(dataset="synthetic", model="wrn10_1", epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="communicator's arrays live on 'gpu'.*device is 'cpu'"):
        Trainer(cfg, None, comm=_GpuComm(1), progress=False, data=data())


@pytest.mark.parametrize("resume", [False, True])
def test_launched_ranks_without_device_gpu_are_refused_in_one_line(tmp_path, monkeypatch,
                                                                   capsys, resume):
    out = str(tmp_path / "run")
    if resume:   # a CPU run to resume: its saved device decides
        cli.main(["train", "--dataset", "synthetic", "--model", "wrn10_1", "--epochs", "1",
                  "--batch-size", "64", "--max-steps", "1", "--no-progress", "--out", out])
        capsys.readouterr()
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    argv = (["train", "--resume", "--out", out] if resume else
            ["train", "--dataset", "synthetic", "--epochs", "1", "--out", out])
    assert cli.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs on GPUs" in err[0] and "--device gpu" in err[0], err
