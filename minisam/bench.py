"""``minisam bench``: time one SGD step and one SAM step of a WideResnet preset.

Method (the same as benchmarks/peers/*): a fixed synthetic batch already on the device,
``warmup`` untimed steps, then ``steps`` timed steps, each synchronised with the device
before the clock stops; we report the median. SGD is ``train_step`` with rho = 0 (one
forward and backward), SAM the same function with rho > 0 (two of each), so their ratio
shows the price of sharpness-awareness (ideally about 2). Peak memory is the most bytes
live at once in CuPy's pool on a GPU (``peak_live_hook``: what PyTorch's
``max_memory_allocated`` reports; the pool's size, cached blocks included, is ``pool_mb``)
and the process's peak RSS on a CPU.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

from . import __version__
from .backend import set_tf32, to_device, xp_for
from .models import wide_resnet
from .optim import nesterov_init
from .sam import SAMConfig, train_step
from .tree import flat_tree


def device_name(device: str) -> str:
    """A human-readable device name: the GPU's, or the CPU model and core count."""
    if device == "gpu":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _sync(device):
    if device == "gpu":
        import cupy
        cupy.cuda.Device().synchronize()


def _time_steps(run, device, warmup, steps):
    for _ in range(warmup):
        run()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _NoPeak:
    peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def peak_live_hook(xp):
    """A context manager whose ``peak`` is the most bytes live at once in CuPy's default
    pool while it is active: a ``cupy.cuda.MemoryHook`` reading ``used_bytes()`` after
    every allocation. That is what ``torch.cuda.max_memory_allocated`` measures; the pool's
    ``total_bytes()`` also counts cached free blocks. Memory hooks are per thread in CuPy.
    A no-op (peak 0) for NumPy."""
    if xp is np:
        return _NoPeak()
    pool = xp.get_default_memory_pool()

    class PeakLive(xp.cuda.MemoryHook):
        name = "minisam_bench_peak_live"

        def __init__(self):
            self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, pool.used_bytes())
    return PeakLive()


# forward-backward passes per step, by variant (LookSAM: one full step in every k)
LOOKSAM_K, MICRO_BATCH, GSAM_ALPHA = 5, 8, 0.4
VARIANT_PASSES = {"gsam": 2.0, "looksam": (2 + (LOOKSAM_K - 1)) / LOOKSAM_K,
                  "m-sam": 2.0}


def _variant_runners(net, params, state, momentum, x, y, cfg):
    """{name: (run, steps each run takes)} for GSAM, LookSAM (k steps a run, so that one in
    k is a full SAM step) and micro-batch m-SAM, from the same weights every time."""
    from .variants import gsam_step, looksam_step, microbatch_step

    def gsam():
        gsam_step(net, params, state, momentum, x, y, 0.1, cfg, GSAM_ALPHA)

    def looksam():
        g_v = None
        for step in range(LOOKSAM_K):
            g_v = looksam_step(net, params, state, momentum, x, y, 0.1, cfg, step, LOOKSAM_K,
                               0.7, g_v)[4]

    def msam():
        microbatch_step(net, params, state, momentum, x, y, 0.1, cfg, MICRO_BATCH)
    runs = {"gsam": (gsam, 1), "looksam": (looksam, LOOKSAM_K)}
    if x.shape[0] % MICRO_BATCH == 0:
        runs["m-sam"] = (msam, 1)
    return runs


def bench(model="wrn16_4", batch_size=32, device="cpu", warmup=2, steps=10, num_classes=10,
          rho=0.05, seed=0, tf32=False, variants=False) -> dict:
    """Time SGD and SAM steps; return a dict in the schema shared with benchmarks/peers."""
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, "
                         f"{steps}, {warmup}")
    if tf32 and device != "gpu":
        raise ValueError("--tf32 needs --device gpu (NumPy has no TF32)")
    xp = xp_for(device)
    set_tf32(tf32)
    net = wide_resnet(model, num_outputs=num_classes, seed=seed)
    rng = np.random.default_rng(seed)
    x = to_device(rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32), device)
    y = to_device(rng.integers(0, num_classes, batch_size).astype(np.int32), device)
    params = flat_tree({k: to_device(v, device) for k, v in net.get_params().items()})
    state = {k: to_device(v, device) for k, v in net.get_state().items()}
    net.set_params(params)
    net.set_state(state)
    momentum = nesterov_init(params)
    if device == "gpu":
        xp.get_default_memory_pool().free_all_blocks()

    def runner(cfg):
        def run():
            # the step's outputs are discarded: every timed step starts from the same weights
            train_step(net, params, state, momentum, x, y, 0.1, cfg)
        return run

    peaks = {}
    for name, r in (("sgd", 0.0), ("sam", rho)):
        with peak_live_hook(xp) as hook:
            peaks[name] = _time_steps(runner(SAMConfig(rho=r, gradient_clipping=0.0)), device,
                                      warmup, steps), hook.peak / 2**20
    (sgd, sgd_mb), (sam, sam_mb) = peaks["sgd"], peaks["sam"]
    rows = {"sgd": {"passes_per_step": 1.0, "ms": sgd * 1e3},
            "sam": {"passes_per_step": 2.0, "ms": sam * 1e3}}
    if variants:
        cfg = SAMConfig(rho=rho, gradient_clipping=0.0)
        for name, (run, k) in _variant_runners(net, params, state, momentum, x, y, cfg).items():
            t = _time_steps(run, device, warmup, steps) / k
            rows[name] = {"passes_per_step": VARIANT_PASSES[name], "ms": t * 1e3}
    for r in rows.values():
        r["vs_sgd"] = r["ms"] / (sgd * 1e3)
    pool_mb = None
    if device == "gpu":
        peak_mb = max(sgd_mb, sam_mb)
        pool_mb = xp.get_default_memory_pool().total_bytes() / 2**20
    else:  # ru_maxrss is in KiB on Linux: the process-wide high-water mark
        peak_mb = sgd_mb = sam_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    versions = {"minisam": __version__, "numpy": np.__version__, "python": sys.version.split()[0]}
    if device == "gpu":
        import cupy
        versions["cupy"] = cupy.__version__
    return {"framework": "minisam", "device": device_name(device), "device_kind": device,
            "model": model, "batch_size": batch_size,
            "sgd_ms": sgd * 1e3, "sam_ms": sam * 1e3,
            "sgd_images_per_s": batch_size / sgd, "sam_images_per_s": batch_size / sam,
            "sam_sgd_ratio": sam / sgd, "peak_memory_mb": peak_mb,
            "sgd_peak_memory_mb": sgd_mb, "sam_peak_memory_mb": sam_mb, "pool_mb": pool_mb,
            "peak_memory_kind": ("peak live bytes in the CuPy pool (MemoryHook)"
                                 if device == "gpu" else "process peak RSS"),
            "tf32": bool(tf32), "warmup": warmup, "steps": steps, "variants": rows,
            "dtype": "tf32 GEMMs" if tf32 else "float32", "versions": versions, "error": None}


def format_result(r: dict) -> str:
    return (f"{r['model']} batch {r['batch_size']} on {r['device']}\n"
            f"  SGD step {r['sgd_ms']:9.1f} ms  {r['sgd_images_per_s']:9.1f} images/s\n"
            f"  SAM step {r['sam_ms']:9.1f} ms  {r['sam_images_per_s']:9.1f} images/s\n"
            f"  SAM/SGD  {r['sam_sgd_ratio']:9.2f}\n"
            f"  peak memory {r['peak_memory_mb']:.0f} MiB ({r['peak_memory_kind']})"
            + (f"; CuPy pool {r['pool_mb']:.0f} MiB" if r.get("pool_mb") is not None else "")
            + ("\n  TF32 GEMMs (not plain float32)" if r.get("tf32") else "")
            + "".join(f"\n  {name:8s} {v['ms']:9.1f} ms  {v['passes_per_step']:4.1f} passes per "
                      f"step  {v['vs_sgd']:5.2f}x SGD" for name, v in r.get("variants", {}).items()
                      if name not in ("sgd", "sam")))
