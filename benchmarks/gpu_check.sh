#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the first real-GPU run of minisam, in one script, under 8 minutes.
#
# Run from the project's root on a fresh CUDA machine (written for one H200, CUDA 13,
# python3 with cupy-cuda13x 14.2, torch and jax already installed, no network):
#
#     bash benchmarks/gpu_check.sh      # logs, JSON and summary.txt go to $OUT (default ./gpu_check_out)
#
# Adapted from the prepared ../shared/gpu_check.sh to the package as it is now (minisam.distributed,
# --tf32 flags, bench's peak live memory). Its CPU-side logic (step runner, budget, ratios,
# NCCL comparison) is tested by tests/test_gpu_check.py; GPU_CHECK_HELPERS_ONLY=1 only writes the
# helper files to $OUT/helpers and exits (what those tests use).
#
# Steps (each time-boxed with `timeout`, logged to $OUT/<step>.log, a failure never stops the run):
#   env      versions, GPU, NCCL, a CuPy smoke test               -> env.json
#   a        pip install -e . --no-deps (offline), else PYTHONPATH=.
#   b        python3 -m pytest -m gpu -q -x, with a per-test timeout (pytest-timeout if present,
#            else a tiny SIGALRM/faulthandler plugin); a pytest-free fallback if pytest is missing
#   c        python3 -m minisam verify reference_results/*.npz --device gpu
#   d        minisam bench (SGD + SAM) vs the PyTorch eager peer, wrn16_8 and wrn28_10, batch 128,
#            through benchmarks/run_all.py, fp32 on both sides          -> bench_*.json, ratios
#   e        NCCL: NcclComm world size 1 and 2 ranks on the GPU(s) vs ThreadComm, 2 SAM steps each,
#            both perturbation modes; plus benchmarks/allreduce.py on one GPU
#   f        minisam train --device gpu on synthetic data: --max-steps, --resume, eval,
#            and --replicas 2 (thread replicas on the GPU)
# then, with whatever time is left (optional, skipped when the budget is spent):
#   diag     where the step time goes: BN reductions, pad/im2col/GEMM, implicit GEMM, TF32 GEMM,
#            fused BN+ReLU, host vs GPU time per step, peak live memory, hidden syncs, CUDA graph
#   tf32     minisam bench --tf32 vs PyTorch --tf32 (wrn28_10, wrn16_8)
#   f2       minisam train --gpus 2 (NCCL through the CLI, 2 ranks; NCCL_MULTI_RANK_GPU_ENABLE=1
#            when there is one GPU)
#
# Environment knobs: OUT (output folder), PY (python, default python3), GPU_CHECK_ONLY
# (comma-separated step names to run, e.g. "env,d_bench,diag"; default all), GPU_CHECK_DIAG
# (comma-separated diag sections, default all), GPU_CHECK_BUDGET
# (seconds for the whole script, default 395; each step may overrun by a 5 s kill grace,
# so the worst case stays under 8 minutes).

ROOT=$(pwd)
if [ ! -f "$ROOT/pyproject.toml" ] || [ ! -d "$ROOT/minisam" ]; then
    echo "gpu_check.sh: run me from minisam's root (the folder with pyproject.toml and minisam/)" >&2
    exit 2
fi
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET:-395}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
HELP=$WORK/helpers
mkdir -p "$HELP"
export ROOT OUT PY WORK HELP
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # minisam importable even if pip fails
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
unset CUPY_TF32            # minisam sets TF32 itself (--tf32, default off); keep the env clean
export MINISAM_DEBUG=1     # tracebacks instead of one-line CLI errors

# =====================================================================================
# helper files
# =====================================================================================

cat > "$HELP/env.py" <<'PYEOF'
"""gpu_check: describe the machine (versions, GPU, NCCL) and smoke-test CuPy."""
import importlib.metadata as md
import json, os, platform, subprocess, sys

out_dir = sys.argv[1]
info = {"python": sys.version.split()[0], "platform": platform.platform()}
names = ["pip", "setuptools", "wheel", "numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy",
         "cuda-pathfinder", "nvidia-nccl-cu13", "nvidia-nccl-cu12", "cutensor-cu13",
         "nvidia-cudnn-cu13", "nvidia-cudnn-frontend", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime",
         "torch", "triton", "jax", "jaxlib", "pytest", "pytest-timeout", "tqdm", "minisam"]
pk = {}
for n in names:
    try:
        pk[n] = md.version(n)
    except md.PackageNotFoundError:
        pass
info["packages"] = pk
print("packages:", ", ".join(f"{k} {v}" for k, v in pk.items()))
cupys = sorted(n for n in pk if n.startswith("cupy"))
if len(cupys) > 1:
    print(f"WARNING: several CuPy distributions are installed ({cupys}); CuPy warns about this "
          "at import and may misbehave (install exactly one of minisam's extras gpu-cuda12 / gpu-cuda13)")
info["env"] = {k: v for k, v in os.environ.items()
               if k.startswith(("CUPY_", "NCCL_", "CUDA_", "NVIDIA_TF32"))}
print("env:", info["env"])
cache = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
n_cached = sum(len(f) for _, _, f in os.walk(cache)) if os.path.isdir(cache) else 0
info["cupy_kernel_cache_files"] = n_cached
print(f"CuPy kernel cache {cache}: {n_cached} files "
      f"({'cold: first calls of every kernel compile with NVRTC' if n_cached < 20 else 'warm'})")
ok = True
try:
    import cupy as cp
    rt = cp.cuda.runtime
    info["cupy"] = cp.__version__
    info["cuda_runtime"] = rt.runtimeGetVersion()
    info["cuda_driver"] = rt.driverGetVersion()
    gpus = []
    for i in range(rt.getDeviceCount()):
        p = rt.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
        gpus.append({"id": i, "name": name, "cc": f"{p['major']}.{p['minor']}",
                     "sms": p["multiProcessorCount"],
                     "mem_gib": round(p["totalGlobalMem"] / 2**30, 1)})
    info["gpus"] = gpus
    print("cupy", cp.__version__, "CUDA runtime", info["cuda_runtime"], "driver", info["cuda_driver"])
    for g in gpus:
        print("GPU", g)
    a = cp.arange(6, dtype=cp.float32).reshape(2, 3)
    s = float((a @ a.T).sum())          # cuBLAS
    e = float(cp.exp(a).sum())          # an NVRTC-compiled elementwise kernel
    assert s == 83.0, f"GEMM smoke test gave {s}, expected 83"
    info["cupy_smoke"] = "ok"
    print(f"CuPy smoke test (cuBLAS GEMM, NVRTC kernel): ok ({s}, {e:.3f})")
    from cupy.cuda import nccl
    info["nccl_available"] = bool(nccl.available)
    if nccl.available:
        info["nccl_version"] = nccl.get_version()
        info["nccl_build_version"] = nccl.get_build_version()
    print("NCCL available:", nccl.available, "runtime", info.get("nccl_version"),
          "build", info.get("nccl_build_version"),
          "(2 ranks on one GPU need runtime >= 23000, NCCL_MULTI_RANK_GPU_ENABLE)")
    print("CUPY_ACCELERATORS:", os.environ.get("CUPY_ACCELERATORS", "<unset: CuPy 14 default 'cub'>"))
    try:
        cp.show_config(_full=True)
    except TypeError:
        cp.show_config()
except Exception as ex:  # noqa: BLE001
    ok = False
    info["cupy_error"] = f"{type(ex).__name__}: {ex}"
    print("CuPy PROBLEM:", info["cupy_error"])
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.cuda.is_available()
    info["torch_cuda_version"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if info["torch_cuda"] else None
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", info["torch_cuda"],
          "cudnn", info["cudnn"])
except Exception as ex:  # noqa: BLE001
    info["torch_error"] = f"{type(ex).__name__}: {ex}"
    print("torch:", info["torch_error"])
try:
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used,"
                        "clocks.max.sm,power.limit,compute_mode,mig.mode.current",
                        "--format=csv"], capture_output=True, text=True, timeout=20)
    print(r.stdout.strip() or r.stderr.strip())
    info["nvidia_smi"] = r.stdout.strip()
except Exception as ex:  # noqa: BLE001
    print("nvidia-smi:", ex)
with open(os.path.join(out_dir, "env.json"), "w") as f:
    json.dump(info, f, indent=1, default=str)
sys.exit(0 if ok else 1)
PYEOF

cat > "$HELP/gpucheck_timeout.py" <<'PYEOF'
"""Per-test timeout for pytest when pytest-timeout is missing: SIGALRM fails the test after
GPUCHECK_TEST_TIMEOUT seconds; if the test is stuck inside C code (an NCCL init, a kernel),
faulthandler dumps every thread's stack and ends the run 30 s later."""
import faulthandler
import os
import signal

import pytest

_T = float(os.environ.get("GPUCHECK_TEST_TIMEOUT", "90"))


def _alarm(signum, frame):
    raise TimeoutError(f"test ran longer than {_T:.0f} s (gpu_check per-test timeout)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(_T + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, _T)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
PYEOF

cat > "$HELP/fallback_tests.py" <<'PYEOF'
"""gpu_check fallback when pytest is missing: what tests/test_gpu.py (layers), test_augment and
test_loader (GPU == CPU) check, plus an in-process NcclComm of world size 1. Reference cases,
bench and the launcher are covered by the script's steps c, d and e."""
import sys
import traceback

import numpy as np
import cupy as cp

from minisam.backend import to_device, to_numpy
from minisam.nn import AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, ReLU, Shortcut

failed = passed = 0


def check(name, fn):
    global failed, passed
    try:
        fn()
        passed += 1
        print(f"PASS {name}", flush=True)
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()


def both(make, x, train):
    out = []
    for device in ("cpu", "gpu"):
        layer = make()
        layer.params = {k: to_device(v, device) for k, v in layer.params.items()}
        layer.state = {k: to_device(v, device) for k, v in layer.state.items()}
        y = layer.forward(to_device(x, device), train)
        dy = to_device(np.random.default_rng(0).standard_normal(y.shape).astype(y.dtype), device)
        dx = layer.backward(dy)
        out.append([to_numpy(y), to_numpy(dx)]
                   + [to_numpy(layer.grads[k]) for k in sorted(layer.grads)]
                   + [to_numpy(layer.state[k]) for k in sorted(layer.state)])
    return out


def layer(name, make, train=True, dense=False):
    def f():
        x = np.random.default_rng(0).standard_normal((4, 8, 8, 6)).astype(np.float32)
        if dense:
            x = x[:, 0, 0, :]
        cpu, gpu = both(make, x, train)
        for a, b in zip(cpu, gpu):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    check(f"layer {name} cupy == numpy", f)


layer("conv1", lambda: Conv(6, 5, 3, 1, np.random.default_rng(1)))
layer("conv2", lambda: Conv(6, 5, 3, 2, np.random.default_rng(1)))
layer("bn_train", lambda: BatchNorm(6))
layer("bn_eval", lambda: BatchNorm(6), train=False)
layer("relu", ReLU)
layer("pool", lambda: AvgPool(2))
layer("shortcut", lambda: Shortcut(2, 9))
layer("gap", GlobalAvgPool)
layer("dense", lambda: Dense(6, 3, np.random.default_rng(1)), dense=True)


def augment():
    from minisam.data import Augment, symmetric_label_noise
    x = np.random.default_rng(0).uniform(1, 2, (16, 32, 32, 3)).astype(np.float32)
    a = Augment(crop_pad=4, flip=True, cutout=16, cutout_per_image=True)
    np.testing.assert_array_equal(cp.asnumpy(a(cp.asarray(x), np.random.default_rng(4))),
                                  a(x, np.random.default_rng(4)))
    y = np.arange(1000) % 10
    np.testing.assert_array_equal(
        cp.asnumpy(symmetric_label_noise(cp.asarray(y), 0.3, 10, np.random.default_rng(2))),
        symmetric_label_noise(y, 0.3, 10, np.random.default_rng(2)))


def loader():
    from minisam.data import Augment, Dataset, Loader
    images = np.broadcast_to(np.arange(64, dtype=np.float32)[:, None, None, None], (64, 6, 6, 3)).copy()
    ds = Dataset(images, np.arange(64) % 5, 5, "toy")
    aug = Augment(crop_pad=2, flip=True, cutout=3)
    cpu = Loader(ds, 16, seed=5, augment=aug, replicas=2)
    gpu = Loader(ds, 16, seed=5, augment=aug, replicas=2, device="gpu")
    for (xc, yc), (xg, yg) in zip(cpu.batch(1, 2), gpu.batch(1, 2)):
        assert isinstance(xg, cp.ndarray) and isinstance(yg, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(xg), xc)
        np.testing.assert_array_equal(cp.asnumpy(yg), yc)


def nccl_world_one():
    from minisam.distributed.nccl import NcclComm
    from minisam.distributed.rendezvous import free_port
    rng = np.random.default_rng(0)
    t = {"conv/kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32),
         "a_bias": rng.standard_normal(5).astype(np.float32)}
    with NcclComm(0, 1, 0, "127.0.0.1", free_port(), timeout=30) as comm:
        out = comm.allreduce_mean({k: cp.asarray(v) for k, v in t.items()})
        bc = comm.broadcast({k: cp.asarray(v) for k, v in t.items()})
        comm.barrier()
    for k in t:
        np.testing.assert_array_equal(cp.asnumpy(out[k]), t[k])
        np.testing.assert_array_equal(cp.asnumpy(bc[k]), t[k])


check("augment gpu == cpu", augment)
check("loader gpu == cpu", loader)
check("NcclComm world size 1 in-process", nccl_world_one)
print(f"fallback: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PYEOF

cat > "$HELP/ratios.py" <<'PYEOF'
"""gpu_check: read OUT/bench_*.json, print minisam vs PyTorch per model and precision, write
OUT/bench_summary.json. Exit 1 if an fp32 minisam row is missing or has an error."""
import glob
import json
import os
import re
import sys

out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    if path.endswith("bench_summary.json"):
        continue
    try:
        with open(path) as f:
            data = json.load(f)
    except Exception as e:  # noqa: BLE001
        print(f"{os.path.basename(path)}: unreadable ({e})")
        continue
    got = data["rows"] if isinstance(data, dict) and "rows" in data else (data if isinstance(data, list) else [data])
    prec = "tf32" if "tf32" in os.path.basename(path) else "fp32"
    for r in got:
        r = dict(r)
        r["precision"] = ("tf32" if r["tf32"] else "fp32") if "tf32" in r else prec
        r["file"] = os.path.basename(path)
        rows.append(r)


def f(v, spec):
    if v is None:
        return format("-", ">" + (re.match(r"\d*", spec).group(0) or "1"))
    return format(v, spec)


print(f"{'model':9s} {'prec':5s} {'framework':15s} {'SGD ms':>9s} {'SAM ms':>9s} {'SAM img/s':>10s} "
      f"{'SAM/SGD':>8s} {'peak MiB':>9s}  error")
for r in rows:
    print(f"{r.get('model', '?'):9s} {r['precision']:5s} {r.get('framework', '?'):15s} "
          f"{f(r.get('sgd_ms'), '9.1f')} {f(r.get('sam_ms'), '9.1f')} "
          f"{f(r.get('sam_images_per_s'), '10.1f')} {f(r.get('sam_sgd_ratio'), '8.2f')} "
          f"{f(r.get('peak_memory_mb'), '9.0f')}  {(r.get('error') or '')[:70]}")
summary, bad = [], False
for model in sorted({r.get("model") for r in rows if r.get("model")}):
    for prec in ("fp32", "tf32"):
        ms = next((r for r in rows if r.get("model") == model and r["precision"] == prec
                   and r.get("framework") == "minisam"), None)
        pt = next((r for r in rows if r.get("model") == model and r["precision"] == prec
                   and r.get("framework") == "pytorch-eager"), None)
        if ms is None and pt is None:
            continue
        if prec == "fp32" and (ms is None or ms.get("error")):
            bad = True
        s = {"model": model, "precision": prec,
             "minisam_sam_ms": ms and ms.get("sam_ms"), "torch_sam_ms": pt and pt.get("sam_ms"),
             "minisam_sgd_ms": ms and ms.get("sgd_ms"), "torch_sgd_ms": pt and pt.get("sgd_ms")}
        a, b = ms and ms.get("sam_images_per_s"), pt and pt.get("sam_images_per_s")
        s["sam_throughput_ratio_minisam_over_torch"] = (a / b) if a and b else None
        a, b = ms and ms.get("sgd_images_per_s"), pt and pt.get("sgd_images_per_s")
        s["sgd_throughput_ratio_minisam_over_torch"] = (a / b) if a and b else None
        a, b = ms and ms.get("peak_memory_mb"), pt and pt.get("peak_memory_mb")
        s["peak_memory_ratio_live_over_torch_allocated"] = (a / b) if a and b else None
        s["minisam_pool_mb"] = ms and ms.get("pool_mb")
        summary.append(s)
        print(f"RATIO {model} {prec}: SAM throughput minisam/torch = "
              f"{f(s['sam_throughput_ratio_minisam_over_torch'], '.2f')} "
              f"(SAM {f(s['minisam_sam_ms'], '.1f')} ms vs {f(s['torch_sam_ms'], '.1f')} ms), "
              f"SGD {f(s['sgd_throughput_ratio_minisam_over_torch'], '.2f')}, "
              f"memory (peak live vs torch max allocated) "
              f"{f(s['peak_memory_ratio_live_over_torch_allocated'], '.2f')}"
              + (f", CuPy pool {s['minisam_pool_mb']:.0f} MiB" if s["minisam_pool_mb"] else ""))
with open(os.path.join(out, "bench_summary.json"), "w") as fh:
    json.dump({"rows": rows, "summary": summary}, fh, indent=1)
sys.exit(1 if bad or not rows else 0)
PYEOF

cat > "$HELP/nccl_check.py" <<'PYEOF'
"""gpu_check: NcclComm against ThreadComm on the same two SAM steps of a WRN-10-2.

    nccl_check.py threads DIR   ThreadComm (threads on the GPU), R = 1 and 2, both sync modes
    nccl_check.py child DIR     one rank of an NcclComm job (start it with python -m minisam.launch)
    nccl_check.py compare DIR   DIR/n1 (world 1) and DIR/n2 (2 ranks) against DIR/threads

Every rank starts from rank 0's parameters (comm.broadcast) and takes its shard of one fixed
global batch of 16 images (16x16x3). With 2 ranks the NCCL sum a + b is exactly the ThreadComm
sum, so the results should agree to the last bit (tolerance: 1e-5 relative)."""
import os
import sys

import numpy as np

TOL = 1e-5


def problem():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
            rng.integers(0, 10, 16).astype(np.int32))


def run(rank, size, comm, sync, steps=2):
    import cupy as cp
    from minisam.backend import to_numpy
    from minisam.models import wide_resnet
    from minisam.optim import nesterov_init
    from minisam.sam import SAMConfig, train_step
    x, y = problem()
    b = len(x) // size
    xs, ys = cp.asarray(x[rank * b:(rank + 1) * b]), cp.asarray(y[rank * b:(rank + 1) * b])
    model = wide_resnet("wrn10_2", num_outputs=10, in_channels=3, seed=0)
    params = comm.broadcast({k: cp.asarray(v) for k, v in model.get_params().items()}, 0)
    state = {k: cp.asarray(v) for k, v in model.get_state().items()}
    mom = nesterov_init(params)
    cfg = SAMConfig(rho=0.05, sync_perturbations=sync)
    for _ in range(steps):
        params, state, mom, met = train_step(model, params, state, mom, xs, ys, 0.1, cfg, comm)
    out = {"params/" + k: to_numpy(v) for k, v in params.items()}
    out.update({"momentum/" + k: to_numpy(v) for k, v in mom.items()})
    out.update({"state/" + k: to_numpy(v) for k, v in state.items()})
    out.update({"metrics/" + k: to_numpy(v) for k, v in met.items()})
    return out


def save(d, size, sync, rank, res):
    os.makedirs(d, exist_ok=True)
    np.savez(os.path.join(d, f"R{size}_sync{int(sync)}_rank{rank}.npz"), **res)


def diff(a, b):
    worst_abs = worst_rel = 0.0
    ndiff = 0
    for k in a.files:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        e = float(np.max(np.abs(x - y))) if x.size else 0.0
        s = float(np.max(np.abs(x))) if x.size else 0.0
        worst_abs = max(worst_abs, e)
        worst_rel = max(worst_rel, e / s if s else e)
        ndiff += int(e > 0)
    return worst_abs, worst_rel, ndiff, len(a.files)


def main():
    mode, d = sys.argv[1], sys.argv[2]
    if mode == "threads":
        from minisam.distributed.local import run_replicas
        for size in (1, 2):
            for sync in (False, True):
                results = run_replicas(size, lambda r, c: run(r, size, c, sync))
                for r, res in enumerate(results):
                    save(d, size, sync, r, res)
                print(f"threads: R={size} sync={sync}: done", flush=True)
        return 0
    if mode == "child":
        from minisam.distributed import comm_from_env
        comm = comm_from_env("gpu", nccl=True, timeout=60)
        print(f"rank {comm.rank}/{comm.size} on GPU {comm.device_id}", flush=True)
        for sync in (False, True):
            save(d, comm.size, sync, comm.rank, run(comm.rank, comm.size, comm, sync))
        comm.barrier()
        comm.close()
        print(f"rank {comm.rank}: done", flush=True)
        return 0
    if mode == "compare":
        bad = 0
        for size, sub in ((1, "n1"), (2, "n2")):
            if os.path.exists(os.path.join(d, sub + ".skipped")):
                print(f"NCCL R={size}: not run ({open(os.path.join(d, sub + '.skipped')).read().strip()})")
                continue
            for sync in (0, 1):
                ranks = []
                for r in range(size):
                    ft = os.path.join(d, "threads", f"R{size}_sync{sync}_rank{r}.npz")
                    fn = os.path.join(d, sub, f"R{size}_sync{sync}_rank{r}.npz")
                    if not (os.path.exists(ft) and os.path.exists(fn)):
                        print(f"NCCL R={size} sync={sync} rank {r}: MISSING "
                              f"({'threads' if not os.path.exists(ft) else sub} result absent)")
                        bad += 1
                        continue
                    a, b = np.load(ft), np.load(fn)
                    if sorted(a.files) != sorted(b.files):
                        print(f"NCCL R={size} sync={sync} rank {r}: different keys")
                        bad += 1
                        continue
                    ea, er, nd, n = diff(a, b)
                    ok = er <= TOL
                    bad += not ok
                    ranks.append(b)
                    print(f"NCCL vs ThreadComm R={size} sync_perturbations={bool(sync)} rank {r}: "
                          f"max abs {ea:.2e}, max rel {er:.2e}, {nd}/{n} arrays differ -> "
                          f"{'ok' if ok else 'FAIL'}{' (bitwise equal)' if nd == 0 else ''}")
                if len(ranks) == 2:
                    same = all(np.array_equal(ranks[0][k], ranks[1][k])
                               for k in ranks[0].files if k.startswith("params/"))
                    print(f"NCCL R=2 sync={bool(sync)}: parameters identical on both ranks: {same}")
                    bad += not same
        print(f"compare: {'PASS' if not bad else f'FAIL ({bad} problem(s))'}")
        return 1 if bad else 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
PYEOF

cat > "$HELP/diag.py" <<'PYEOF'
"""gpu_check diagnostics: where minisam's GPU step time goes. One line per measurement;
everything also goes to OUT/diag.json. Each section is independent: a failure prints its
error and the next section runs. Usage: diag.py OUT [section,section,...]"""
import json
import os
import sys
import time
import traceback

import numpy as np
import cupy as cp

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
ONLY = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else None
RES = {}


def sync():
    cp.cuda.Device().synchronize()


def gpu_ms(f, n=10, warm=2):
    """Mean GPU time of f() in ms (CUDA events around n back-to-back calls)."""
    for _ in range(warm):
        f()
    sync()
    s, e = cp.cuda.Event(), cp.cuda.Event()
    s.record()
    for _ in range(n):
        f()
    e.record()
    e.synchronize()
    return cp.cuda.get_elapsed_time(s, e) / n


def say(label, ms, extra=""):
    print(f"  {label:64s} {ms:9.3f} ms  {extra}", flush=True)


def section(name, fn):
    if ONLY and name not in ONLY:
        return
    t0 = time.time()
    print(f"--- {name}", flush=True)
    try:
        RES[name] = fn()
        print(f"--- {name}: done in {time.time() - t0:.1f} s", flush=True)
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc()
        RES[name] = {"error": f"{type(ex).__name__}: {ex}"}
        print(f"--- {name}: FAILED ({type(ex).__name__}: {ex})", flush=True)
    with open(os.path.join(OUT, "diag.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)
    cp.get_default_memory_pool().free_all_blocks()


def make(name, batch=128):
    from minisam.models import wide_resnet
    from minisam.optim import nesterov_init
    net = wide_resnet(name)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((batch, 32, 32, 3)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    params = {k: cp.asarray(v) for k, v in net.get_params().items()}
    state = {k: cp.asarray(v) for k, v in net.get_state().items()}
    net.set_params(params)
    net.set_state(state)
    return net, params, state, nesterov_init(params), x, y


def bn_reduction():
    """BatchNorm's per-channel statistics, x.mean(axis=(0, 1, 2)) on NHWC, go to CuPy's generic
    reduction kernel with ceil(C / 32) thread blocks (CUB is not used for leading-axis
    reductions of C-contiguous arrays); compare with a two-stage reduction and a GEMV."""
    sumsq = cp.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "gpucheck_sumsq")
    rows = []
    for shape in [(128, 32, 32, 16), (128, 32, 32, 160), (128, 16, 16, 320), (128, 8, 8, 640)]:
        n, h, w, c = shape
        m = n * h * w
        x = cp.random.standard_normal(shape, dtype=cp.float32)
        x2 = x.reshape(m, c)
        g = 128
        ones = cp.ones((1, m), cp.float32)
        ref = x.mean(axis=(0, 1, 2))
        two = x2.reshape(g, -1, c).sum(axis=1).sum(axis=0) / m
        gem = (ones @ x2)[0] / m
        err = max(float(cp.abs(two - ref).max()), float(cp.abs(gem - ref).max()))
        for label, f in [
                ("x.mean(axis=(0,1,2))          [BatchNorm as written]", lambda: x.mean(axis=(0, 1, 2))),
                ("(x*x).mean(axis=(0,1,2))      [BatchNorm as written]", lambda: (x * x).mean(axis=(0, 1, 2))),
                ("x.reshape(128,-1,C).sum(1).sum(0)   [two-stage]", lambda: x2.reshape(g, -1, c).sum(axis=1).sum(axis=0)),
                ("sum of squares ReductionKernel, two-stage", lambda: sumsq(x2.reshape(g, -1, c), axis=1).sum(axis=0)),
                ("ones[1,M] @ x[M,C]            [cuBLAS]", lambda: ones @ x2)]:
            ms = gpu_ms(f)
            gbs = x.nbytes / ms / 1e6
            rows.append({"shape": list(shape), "op": label.split("  ")[0], "ms": round(ms, 4),
                         "GB_per_s": round(gbs, 1)})
            say(f"{str(shape):18s} {label}", ms, f"{gbs:7.0f} GB/s")
        print(f"  {str(shape):18s} max |two-stage or GEMV mean - x.mean| = {err:.1e}", flush=True)
    return rows


def conv_pieces():
    """One WRN-28-10 group-0 convolution (batch 128, 32x32, 160 -> 160 channels), piece by
    piece, as minisam does it; an implicit-GEMM alternative; TF32 GEMMs."""
    import cupy.cublas as cublas_mod
    from cupy._core import _routines_linalg as linalg
    from minisam.nn.conv import _pad_same, im2col
    n, h, w, c, k = 128, 32, 32, 160, 160
    x = cp.random.standard_normal((n, h, w, c), dtype=cp.float32)
    kern = cp.random.standard_normal((3, 3, c, k), dtype=cp.float32) * 0.03
    dy = cp.random.standard_normal((n * h * w, k), dtype=cp.float32)
    xpad, _, oh, ow = _pad_same(x, 3, 3, 1)
    cols = cp.empty((n, oh, ow, 3, 3, c), cp.float32)
    im2col(xpad, 3, 3, 1, oh, ow, cols)
    c2, k2 = cols.reshape(-1, 9 * c), kern.reshape(-1, k)
    flops = 2.0 * c2.shape[0] * c2.shape[1] * k
    out = {}

    def rec(label, ms, fl=None, key=None):
        out[key or label] = {"ms": round(ms, 4), "TFLOPS": round(fl / ms / 1e9, 1) if fl else None}
        say(label, ms, f"{fl / ms / 1e9:6.1f} TFLOP/s" if fl else "")

    rec("cupy.pad (SAME, 1 px) of x[128,32,32,160]", gpu_ms(lambda: _pad_same(x, 3, 3, 1)), key="pad")
    rec("im2col: 9 strided copies into cols[128,32,32,3,3,160]",
        gpu_ms(lambda: im2col(xpad, 3, 3, 1, oh, ow, cols)), key="im2col")
    rec("forward GEMM cols[M,1440] @ K[1440,160], fp32", gpu_ms(lambda: c2 @ k2), flops, "gemm_fp32")
    rec("dW GEMM cols.T @ dy, fp32", gpu_ms(lambda: c2.T @ dy), flops, "dw_fp32")
    hp, wp = h + 2, w + 2
    xf = xpad.reshape(-1, c)
    mfull = n * hp * wp
    valid = mfull - (2 * wp + 2)
    ybuf = cp.zeros((mfull, k), cp.float32)
    yv = ybuf[:valid]

    def shifted():
        for a in range(3):
            for b in range(3):
                off = a * wp + b
                cublas_mod.gemm("N", "N", xf[off:off + valid], kern[a, b], out=yv,
                                beta=0.0 if a == b == 0 else 1.0)
    shifted()
    ref = (c2 @ k2).reshape(n, h, w, k)
    got = ybuf.reshape(n, hp, wp, k)[:, :h, :w, :]
    rel = float(cp.abs(got - ref).max() / cp.abs(ref).max())
    rec(f"implicit GEMM: 9 shifted GEMMs on the padded grid, no cols (rel err {rel:.1e})",
        gpu_ms(shifted), flops, "implicit_gemm_fp32")
    out["implicit_gemm_rel_err"] = rel
    tf32 = getattr(linalg, "COMPUTE_TYPE_TF32", 7)
    default = getattr(linalg, "COMPUTE_TYPE_DEFAULT", 1)
    cp._core.set_compute_type(cp.float32, tf32)
    try:
        rec("forward GEMM, TF32 (CUBLAS_COMPUTE_32F_FAST_TF32)", gpu_ms(lambda: c2 @ k2), flops, "gemm_tf32")
        rec("dW GEMM, TF32", gpu_ms(lambda: c2.T @ dy), flops, "dw_tf32")
        t = c2 @ k2
        out["tf32_rel_err"] = float(cp.abs(t.reshape(ref.shape) - ref).max() / cp.abs(ref).max())
        print(f"  TF32 forward GEMM rel err vs fp32: {out['tf32_rel_err']:.1e} (verify's tolerance is 1e-5)")
    finally:
        cp._core.set_compute_type(cp.float32, default)
    return out


def bn_fused():
    """BatchNorm + ReLU forward of one [128,32,32,160] activation: as written (about ten kernels,
    two slow reductions) vs two-stage statistics + one fused ElementwiseKernel."""
    from minisam.nn import BatchNorm, ReLU
    x = cp.random.standard_normal((128, 32, 32, 160), dtype=cp.float32)
    bn, relu = BatchNorm(160), ReLU()
    bn.params = {k: cp.asarray(v) for k, v in bn.params.items()}
    bn.state = {k: cp.asarray(v) for k, v in bn.state.items()}
    dy = cp.random.standard_normal(x.shape, dtype=cp.float32)

    def written():
        return relu.forward(bn.forward(x, True))

    def written_fb():
        relu.forward(bn.forward(x, True))
        return bn.backward(relu.backward(dy))
    sumsq = cp.ReductionKernel("T x", "T y", "x * x", "a + b", "y = a", "0", "gpucheck_sumsq2")
    norm_relu = cp.ElementwiseKernel(
        "T x, T mean, T a, T b", "T y, bool mask",
        "T v = (x - mean) * a + b; mask = v > (T)0; y = mask ? v : (T)0;", "gpucheck_bn_relu")
    m = x.size // 160
    x3 = x.reshape(128, -1, 160)
    scale, bias = bn.params["scale"], bn.params["bias"]

    def fused():
        mean = x3.sum(axis=1).sum(axis=0) / m
        var = sumsq(x3, axis=1).sum(axis=0) / m - mean * mean
        return norm_relu(x, mean, scale / cp.sqrt(var + 1e-5), bias)
    y_ref = written()
    y_f, _ = fused()
    err = float(cp.abs(y_f - y_ref).max())
    out = {"written_fwd_ms": gpu_ms(written, 5), "written_fwd_bwd_ms": gpu_ms(written_fb, 5),
           "fused_fwd_ms": gpu_ms(fused, 5), "max_abs_diff": err}
    say("BN+ReLU forward as written", out["written_fwd_ms"])
    say("BN+ReLU forward + backward as written", out["written_fwd_bwd_ms"])
    say(f"BN+ReLU forward fused (two-stage stats + 1 kernel; max diff {err:.1e})", out["fused_fwd_ms"])
    return out


def step_split():
    """Host (Python + launch) time vs GPU time of one train_step, SGD and SAM, batch 128, and the
    peak of live bytes in CuPy's pool during one SAM step (a MemoryHook)."""
    from cupyx.profiler import benchmark
    from cupy.cuda import memory_hook
    from minisam.sam import SAMConfig, train_step

    class Peak(memory_hook.MemoryHook):
        name = "gpucheck_peak"

        def __init__(self, pool):
            self.pool, self.peak = pool, pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            self.peak = max(self.peak, self.pool.used_bytes())

    out = {}
    pool = cp.get_default_memory_pool()
    for name in ("wrn16_8", "wrn28_10"):
        net, p, s, mo, x, y = make(name)
        for label, rho in (("sgd", 0.0), ("sam", 0.05)):
            cfg = SAMConfig(rho=rho, gradient_clipping=0.0)
            r = benchmark(train_step, (net, p, s, mo, x, y, 0.1, cfg), n_repeat=4, n_warmup=2)
            cpu = float(np.median(r.cpu_times)) * 1e3
            gpu = float(np.median(r.gpu_times)) * 1e3
            out[f"{name}/{label}"] = {"host_ms": round(cpu, 2), "gpu_ms": round(gpu, 2)}
            say(f"{name} {label.upper()} step: host (issue) time vs GPU time", gpu,
                f"host {cpu:8.1f} ms  ({'host-bound' if cpu > 0.8 * gpu else 'GPU-bound'})")
        cfg = SAMConfig(rho=0.05, gradient_clipping=5.0)
        train_step(net, p, s, mo, x, y, 0.1, cfg)
        sync()
        before = pool.used_bytes()
        with Peak(pool) as hook:
            train_step(net, p, s, mo, x, y, 0.1, cfg)
            sync()
        out[f"{name}/sam_peak_live_MiB"] = round(hook.peak / 2**20, 1)
        out[f"{name}/live_between_steps_MiB"] = round(before / 2**20, 1)
        out[f"{name}/pool_total_MiB"] = round(pool.total_bytes() / 2**20, 1)
        print(f"  {name}: peak live {hook.peak / 2**20:9.0f} MiB during a SAM step; "
              f"{before / 2**20:9.0f} MiB live between steps (params, im2col buffers, ...); "
              f"pool holds {pool.total_bytes() / 2**20:9.0f} MiB", flush=True)
        del net, p, s, mo, x, y
        pool.free_all_blocks()
    return out


def hidden_syncs():
    """Does train_step (with clipping, as in training) synchronise with the host anywhere?
    cupyx.allow_synchronize(False) raises on CuPy-initiated device synchronisations."""
    import cupyx
    from minisam.sam import SAMConfig, train_step
    net, p, s, mo, x, y = make("wrn10_2", 32)
    cfg = SAMConfig(rho=0.05, gradient_clipping=5.0)
    train_step(net, p, s, mo, x, y, 0.1, cfg)
    sync()
    try:
        with cupyx.allow_synchronize(False):
            train_step(net, p, s, mo, x, y, 0.1, cfg)
        print("  no CuPy-initiated synchronisation inside train_step", flush=True)
        return {"syncs": "none detected"}
    except cupyx.DeviceSynchronized as e:
        traceback.print_exc()
        print(f"  train_step synchronises: {e}", flush=True)
        return {"syncs": f"DeviceSynchronized: {e}"}


def graph_capture():
    """Capture one SAM step of WRN-16-8 (batch 128) in a CUDA graph on a non-blocking stream and
    replay it: the gap to eager is the Python/launch overhead a graph removes. Timing only (the
    replayed step reuses the captured inputs)."""
    from minisam.sam import SAMConfig, train_step
    net, p, s, mo, x, y = make("wrn16_8")
    cfg = SAMConfig(rho=0.05, gradient_clipping=5.0)
    st = cp.cuda.Stream(non_blocking=True)
    out = {}
    with st:
        for _ in range(2):
            train_step(net, p, s, mo, x, y, 0.1, cfg)
        st.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            train_step(net, p, s, mo, x, y, 0.1, cfg)
        st.synchronize()
        out["eager_ms"] = (time.perf_counter() - t0) / 5 * 1e3
        st.begin_capture()
        try:
            keep = train_step(net, p, s, mo, x, y, 0.1, cfg)  # noqa: F841 (outputs stay alive)
        except Exception:
            try:
                st.end_capture()
            except Exception:  # noqa: BLE001
                pass
            raise
        g = st.end_capture()
        g.launch(st)
        st.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            g.launch(st)
        st.synchronize()
        out["graph_ms"] = (time.perf_counter() - t0) / 5 * 1e3
    say("WRN-16-8 SAM step, eager on a side stream", out["eager_ms"])
    say("WRN-16-8 SAM step, replayed CUDA graph", out["graph_ms"])
    return out


for _name, _fn in [("bn_reduction", bn_reduction), ("conv_pieces", conv_pieces),
                   ("bn_fused", bn_fused), ("step_split", step_split),
                   ("hidden_syncs", hidden_syncs), ("graph_capture", graph_capture)]:
    section(_name, _fn)
bad = [k for k, v in RES.items() if isinstance(v, dict) and "error" in v]
print(f"diag: {len(RES) - len(bad)} sections ok, {len(bad)} failed {bad}")
sys.exit(0)
PYEOF

# ---- step scripts ------------------------------------------------------------------

cat > "$HELP/step_install.sh" <<'SHEOF'
"$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" || echo "setuptools: missing"
if "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT"; then
    echo "INSTALL: editable install OK"
else
    echo "INSTALL: pip install -e . failed (offline, no build backend?); using PYTHONPATH=$ROOT"
fi
(cd /tmp && "$PY" -c "import minisam, sys; print('minisam', minisam.__version__, 'from', minisam.__file__)") || exit 1
"$PY" -c "import tqdm" 2>/dev/null && echo "tqdm: present" || echo "tqdm: MISSING (fine: every train run here passes --no-progress)"
"$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: MISSING (step b falls back to a pytest-free check)"
"$PY" -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: present" || echo "pytest-timeout: missing (step b uses its own per-test timeout plugin)"
exit 0
SHEOF

cat > "$HELP/step_pytest.sh" <<'SHEOF'
if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed: running the pytest-free fallback instead"
    exec "$PY" "$HELP/fallback_tests.py"
fi
args=(-m gpu -q -x -rfEs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    args+=(--timeout=90)
else
    export PYTHONPATH="$HELP:$PYTHONPATH" GPUCHECK_TEST_TIMEOUT=90
    args+=(-p gpucheck_timeout)
fi
echo "+ $PY -m pytest ${args[*]}"
"$PY" -m pytest "${args[@]}"
SHEOF

cat > "$HELP/step_verify.sh" <<'SHEOF'
"$PY" -m minisam verify "$ROOT"/reference_results/*.npz --device gpu
SHEOF

cat > "$HELP/step_bench.sh" <<'SHEOF'
rc=0
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    for m in wrn16_8 wrn28_10; do   # one run_all per model: a timeout keeps the first model's rows
        "$PY" "$ROOT/benchmarks/run_all.py" --device gpu --models "$m" --batch-size 128 \
            --warmup 3 --steps 10 --skip pytorch-compile jax --timeout 100 \
            --out "$OUT/bench_run_all_$m.json" || rc=1
    done
else
    echo "torch with CUDA is not available: timing minisam alone"
    for m in wrn16_8 wrn28_10; do
        "$PY" -m minisam bench --model "$m" --batch-size 128 --device gpu --warmup 3 --steps 10 \
            --json "$OUT/bench_minisam_$m.json" || rc=1
    done
fi
"$PY" "$HELP/ratios.py" "$OUT" || rc=1
exit $rc
SHEOF

cat > "$HELP/step_nccl.sh" <<'SHEOF'
D=$WORK/nccl
rm -rf "$D"; mkdir -p "$D"
"$PY" - <<'EOF'
from cupy.cuda import nccl
print("nccl.available:", nccl.available)
if nccl.available:
    print("NCCL runtime", nccl.get_version(), "built against", nccl.get_build_version())
EOF
NGPU=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
NVER=$("$PY" -c "from cupy.cuda import nccl; print(nccl.get_version() if nccl.available else 0)" 2>/dev/null || echo 0)
echo "GPUs: $NGPU, NCCL: $NVER"
rc=0
echo "## ThreadComm reference (threads on the GPU)"
timeout --foreground -k 5 45 "$PY" "$HELP/nccl_check.py" threads "$D/threads" || rc=1
echo "## NcclComm, world size 1 (through the launcher)"
timeout --foreground -k 5 45 "$PY" -m minisam.launch --nproc 1 --grace 5 --raw -- \
    "$PY" "$HELP/nccl_check.py" child "$D/n1" || rc=1
echo "## NcclComm, 2 ranks"
EXTRA=()
if [ "$NGPU" -lt 2 ]; then
    if [ "$NVER" -lt 23000 ]; then
        echo "2 ranks on one GPU need NCCL >= 2.30 (NCCL_MULTI_RANK_GPU_ENABLE); this is $NVER: skipped"
        echo "NCCL $NVER < 2.30 with one GPU" > "$D/n2.skipped"
    fi
    EXTRA=(NCCL_MULTI_RANK_GPU_ENABLE=1)
fi
if [ ! -f "$D/n2.skipped" ]; then
    if ! env "${EXTRA[@]}" timeout --foreground -k 5 50 "$PY" -m minisam.launch --nproc 2 --grace 5 --raw -- \
            "$PY" "$HELP/nccl_check.py" child "$D/n2"; then
        echo "2-rank run failed; retrying once with NCCL_MAX_CTAS=1 NCCL_NVLS_ENABLE=0"
        rm -rf "$D/n2"
        env "${EXTRA[@]}" NCCL_MAX_CTAS=1 NCCL_NVLS_ENABLE=0 timeout --foreground -k 5 40 "$PY" -m minisam.launch \
            --nproc 2 --grace 5 --raw -- "$PY" "$HELP/nccl_check.py" child "$D/n2" || rc=1
    fi
fi
echo "## compare"
"$PY" "$HELP/nccl_check.py" compare "$D" || rc=1
echo "## benchmarks/allreduce.py, one GPU (pack + ncclAllReduce + divide, world size 1)"
timeout --foreground -k 5 30 "$PY" "$ROOT/benchmarks/allreduce.py" --iters 10 --repeats 3 --warmup 2 \
    > "$OUT/allreduce_1gpu.json" && cat "$OUT/allreduce_1gpu.json" || rc=1
exit $rc
SHEOF

cat > "$HELP/step_train.sh" <<'SHEOF'
D=$WORK/train
rm -rf "$D"; mkdir -p "$D" "$OUT/train"
rc=0
echo "## train 2 epochs x 16 steps, stopped at step 20 (--max-steps), on the GPU"
timeout --foreground -k 5 60 "$PY" -m minisam train --dataset synthetic --device gpu --epochs 2 --batch-size 64 \
    --no-progress --max-steps 20 --out "$D/run" || rc=1
echo "## --resume to the end"
timeout --foreground -k 5 60 "$PY" -m minisam train --resume --out "$D/run" --no-progress || rc=1
echo "## eval on the GPU"
timeout --foreground -k 5 40 "$PY" -m minisam eval "$D/run" --device gpu || rc=1
echo "## the same 2 epochs uninterrupted (is a GPU resume bitwise exact? informational)"
timeout --foreground -k 5 60 "$PY" -m minisam train --dataset synthetic --device gpu --epochs 2 --batch-size 64 \
    --no-progress --out "$D/full" || rc=1
"$PY" - "$D" <<'EOF'
import os, sys
import numpy as np
d = sys.argv[1]
try:
    a = np.load(os.path.join(d, "run", "checkpoint.npz"))
    b = np.load(os.path.join(d, "full", "checkpoint.npz"))
    keys = [k for k in a.files if k.startswith(("params/", "momentum/", "state/"))]
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in keys)
    same = all(np.array_equal(a[k], b[k]) for k in keys)
    print(f"GPU resume vs uninterrupted run: bitwise equal {same}, max abs diff {worst:.2e} "
          f"over {len(keys)} arrays")
except Exception as e:  # noqa: BLE001
    print(f"GPU resume vs uninterrupted run: not compared ({type(e).__name__}: {e})")
EOF
echo "## 2 thread replicas on the GPU"
timeout --foreground -k 5 60 "$PY" -m minisam train --dataset synthetic --device gpu --replicas 2 --epochs 1 \
    --batch-size 64 --no-progress --out "$D/run_r2" || rc=1
for r in run run_r2; do
    mkdir -p "$OUT/train/$r"
    cp "$D/$r"/*.json "$D/$r"/metrics.jsonl "$OUT/train/$r/" 2>/dev/null
done
"$PY" - "$D" <<'EOF' || rc=1
import json, math, os, sys
d = sys.argv[1]
bad = 0
for run, epochs in (("run", 2), ("run_r2", 1)):
    p = os.path.join(d, run, "metrics.jsonl")
    recs = [json.loads(l) for l in open(p)] if os.path.exists(p) else []
    vals = [v for r in recs for k, v in r.items() if isinstance(v, float)]
    ok = len(recs) == epochs and all(math.isfinite(v) for v in vals)
    bad += not ok
    last = recs[-1] if recs else {}
    print(f"{run}: {len(recs)}/{epochs} epochs, train loss {last.get('train_loss')}, "
          f"test error {last.get('test_error_rate')} -> {'ok' if ok else 'FAIL'}")
sys.exit(1 if bad else 0)
EOF
exit $rc
SHEOF

cat > "$HELP/step_tf32.sh" <<'SHEOF'
rc=0
for m in wrn28_10 wrn16_8; do
    "$PY" -m minisam bench --tf32 --model "$m" --batch-size 128 --device gpu --warmup 2 \
        --steps 5 --json "$OUT/bench_tf32_minisam_$m.json" || rc=1
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        "$PY" "$ROOT/benchmarks/peers/torch_step.py" --model "$m" --batch-size 128 --device gpu \
            --mode eager --tf32 --warmup 3 --steps 5 --json "$OUT/bench_tf32_torch_$m.json" \
            > /dev/null || rc=1
    fi
done
"$PY" "$HELP/ratios.py" "$OUT" | grep -E '^RATIO|tf32' || true
exit $rc
SHEOF

cat > "$HELP/step_train_nccl.sh" <<'SHEOF'
NGPU=$("$PY" -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
NVER=$("$PY" -c "from cupy.cuda import nccl; print(nccl.get_version() if nccl.available else 0)" 2>/dev/null || echo 0)
EXTRA=()
if [ "$NGPU" -lt 2 ]; then
    [ "$NVER" -lt 23000 ] && { echo "one GPU and NCCL $NVER < 2.30: cannot run 2 ranks; skipped"; exit 0; }
    EXTRA=(NCCL_MULTI_RANK_GPU_ENABLE=1)
fi
D=$WORK/train_nccl
rm -rf "$D"
env "${EXTRA[@]}" "$PY" -m minisam train --gpus 2 --dataset synthetic --epochs 1 --batch-size 64 \
    --no-progress --out "$D/run" || exit 1
mkdir -p "$OUT/train/run_gpus2"
cp "$D/run"/*.json "$D/run"/metrics.jsonl "$OUT/train/run_gpus2/" 2>/dev/null
cat "$D/run/metrics.jsonl"
SHEOF

if [ -n "${GPU_CHECK_HELPERS_ONLY:-}" ]; then      # tests: the helper files, nothing run
    rm -rf "$OUT/helpers"; cp -r "$HELP" "$OUT/helpers"; rm -rf "$WORK"; exit 0
fi

# =====================================================================================
# the runner
# =====================================================================================

R_NAME=(); R_STATUS=(); R_SECS=(); R_NOTE=()
MANDATORY_FAILED=0

# run_step NAME CAP MIN RESERVE SCRIPT [ARGS...]
#   CAP: the step's own limit (s); MIN: below this much time the step is skipped;
#   RESERVE: seconds kept back for the mandatory steps after this one.
run_step() {
    local name=$1 cap=$2 min=$3 reserve=$4
    shift 4
    local log="$OUT/$name.log" now left t rc t0 t1 st
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
        R_NAME+=("$name"); R_STATUS+=(-); R_SECS+=(0); R_NOTE+=("not selected (GPU_CHECK_ONLY)")
        return 0
    fi
    now=$(date +%s)
    left=$((DEADLINE - now - reserve))
    t=$cap
    if [ "$left" -lt "$t" ]; then t=$left; fi
    if [ "$t" -lt "$min" ]; then
        echo "=== [$name] SKIPPED: ${t}s left for it, needs ${min}s" | tee -a "$log"
        R_NAME+=("$name"); R_STATUS+=(SKIP); R_SECS+=(0); R_NOTE+=("budget spent (${t}s < ${min}s)")
        return 0
    fi
    echo "=== [$name] $(date -u +%H:%M:%S) (t+$((now - START))s), limit ${t}s: $*" | tee -a "$log"
    t0=$(date +%s)
    { timeout -k 5 "$t" "$@" 2>&1; echo $? > "$WORK/$name.rc"; } | tee -a "$log"
    t1=$(date +%s)
    rc=$(cat "$WORK/$name.rc" 2>/dev/null || echo 99)
    if [ "$rc" -eq 0 ]; then st=PASS
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then st=TIMEOUT
    else st=FAIL; fi
    echo "=== [$name] $st (rc $rc) in $((t1 - t0))s" | tee -a "$log"
    R_NAME+=("$name"); R_STATUS+=("$st"); R_SECS+=("$((t1 - t0))"); R_NOTE+=("rc=$rc")
}

note() {  # note TEXT: attach a one-line result to the last step
    local i=$((${#R_NOTE[@]} - 1))
    [ "${R_STATUS[$i]}" = - ] && return 0
    [ -n "$1" ] && R_NOTE[$i]="${R_NOTE[$i]}; $1"
}

mandatory() {  # count a non-PASS of the last step
    local i=$((${#R_STATUS[@]} - 1))
    case "${R_STATUS[$i]}" in PASS|-) ;; *) MANDATORY_FAILED=$((MANDATORY_FAILED + 1)) ;; esac
}

echo "gpu_check: root $ROOT, output $OUT, budget ${BUDGET}s, started $(date -u +%FT%TZ)"

# Reserves (minimum times of the mandatory steps still to come): c 30, d 60, e 40, f 30.
run_step env     30  5 200 "$PY" "$HELP/env.py" "$OUT"
note "$(grep -s -m1 -E '^GPU ' "$OUT/env.log" | cut -c1-90)"
run_step a_install 60  5 200 bash "$HELP/step_install.sh"
mandatory; note "$(grep -s -m1 '^INSTALL' "$OUT/a_install.log")"
run_step b_pytest 160 40 160 bash "$HELP/step_pytest.sh"
mandatory; note "$(grep -s -E '(passed|failed|error|skipped|no tests ran)' "$OUT/b_pytest.log" | tail -1 | cut -c1-100)"
run_step c_verify 90 30 130 bash "$HELP/step_verify.sh"
mandatory; note "$(grep -s -E '^-> ' "$OUT/c_verify.log" | awk '{print $2}' | tr -d ':' | tr '\n' ' ')"
run_step d_bench 150 60 70 bash "$HELP/step_bench.sh"
mandatory; note "$(grep -s '^RATIO' "$OUT/d_bench.log" | grep fp32 | sed 's/RATIO //; s/ (SAM.*//' | tr '\n' ';' | cut -c1-160)"
run_step e_nccl 120 40 30 bash "$HELP/step_nccl.sh"
mandatory; note "$(grep -s -E '^compare:|^NCCL R=2: not run' "$OUT/e_nccl.log" | tr '\n' ' ')"
run_step f_train 100 30 0 bash "$HELP/step_train.sh"
mandatory; note "$(grep -s -E '^run(_r2)?: ' "$OUT/f_train.log" | sed 's/, test error.*->/ ->/' | tr '\n' ' ' | cut -c1-150)"
note "$(grep -s -m1 '^GPU resume vs' "$OUT/f_train.log" | sed 's/GPU resume vs uninterrupted run: /resume /' | cut -c1-70)"
# optional extras, in order of value, with what is left
run_step diag 75 25 0 "$PY" "$HELP/diag.py" "$OUT" "${GPU_CHECK_DIAG:-}"
note "$(grep -s -E '^diag: ' "$OUT/diag.log")"
run_step tf32 70 25 0 bash "$HELP/step_tf32.sh"
note "$(grep -s '^RATIO' "$OUT/tf32.log" | grep tf32 | sed 's/RATIO //; s/ (SAM.*//' | tr '\n' ';' | cut -c1-160)"
run_step f2_train_gpus2 45 25 0 bash "$HELP/step_train_nccl.sh"

# =====================================================================================
# summary
# =====================================================================================
{
    echo
    echo "==================================== gpu_check summary ===================================="
    printf "%-16s %-8s %6s  %s\n" step status secs result
    printf "%-16s %-8s %6s  %s\n" ---- ------ ---- ------
    for i in "${!R_NAME[@]}"; do
        printf "%-16s %-8s %6s  %s\n" "${R_NAME[$i]}" "${R_STATUS[$i]}" "${R_SECS[$i]}" "${R_NOTE[$i]}"
    done
    echo
    "$PY" "$HELP/ratios.py" "$OUT" 2>/dev/null | grep '^RATIO' || echo "(no benchmark ratios)"
    if [ -f "$OUT/diag.json" ]; then
        "$PY" - "$OUT/diag.json" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("wrn16_8/sam", "wrn28_10/sam"):
    v = d.get("step_split", {}).get(k)
    if v:
        print(f"DIAG {k}: GPU {v['gpu_ms']} ms, host {v['host_ms']} ms per step")
for k in ("wrn28_10/sam_peak_live_MiB", "wrn28_10/live_between_steps_MiB"):
    v = d.get("step_split", {}).get(k)
    if v:
        print(f"DIAG {k}: {v}")
rows = d.get("bn_reduction")
if isinstance(rows, list):
    for r in rows:
        if r["shape"] == [128, 32, 32, 160]:
            print(f"DIAG BN stat {r['op']}: {r['ms']} ms ({r['GB_per_s']} GB/s)")
for k in ("gemm_fp32", "gemm_tf32", "implicit_gemm_fp32", "im2col", "pad"):
    v = d.get("conv_pieces", {}).get(k)
    if isinstance(v, dict):
        print(f"DIAG conv {k}: {v['ms']} ms" + (f", {v['TFLOPS']} TFLOP/s" if v.get("TFLOPS") else ""))
g = d.get("graph_capture", {})
if "eager_ms" in g:
    print(f"DIAG CUDA graph WRN-16-8 SAM: eager {g['eager_ms']:.1f} ms, graph {g['graph_ms']:.1f} ms")
elif "error" in g:
    print(f"DIAG CUDA graph capture failed: {g['error'][:120]}")
print(f"DIAG hidden syncs: {d.get('hidden_syncs', {}).get('syncs', d.get('hidden_syncs'))}")
EOF
    fi
    echo
    echo "total $(( $(date +%s) - START ))s of ${BUDGET}s; mandatory steps not passing: $MANDATORY_FAILED"
    echo "logs and JSON: $OUT"
    SLUG=$("$PY" -c "import json,re,sys; g=json.load(open(sys.argv[1])).get('gpus') or [{}]; print(re.sub('[^a-z0-9]+','-',g[0].get('name','gpu').lower()).strip('-'))" "$OUT/env.json" 2>/dev/null || echo gpu)
    echo "to commit the results: mkdir -p benchmarks/results/$SLUG-$(date -u +%F) && cp $OUT/summary.txt $OUT/*.json benchmarks/results/$SLUG-$(date -u +%F)/"
} | tee "$OUT/summary.txt"
rm -rf "$WORK"
[ "$MANDATORY_FAILED" -eq 0 ]
