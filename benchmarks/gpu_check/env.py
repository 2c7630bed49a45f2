"""gpu_check step `env`: describe the machine (packages, GPU, CUDA, NCCL, torch) and
smoke-test CuPy (one cuBLAS GEMM, one NVRTC-compiled kernel).

    python benchmarks/gpu_check/env.py OUT      writes OUT/env.json; exit 1 if CuPy fails

Informational: the runner does not count it as mandatory, but every later GPU step needs
what it checks, so its log is the first place to look when they all fail."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys

PACKAGES = ["pip", "setuptools", "wheel", "numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy",
            "cuda-pathfinder", "nvidia-nccl-cu13", "nvidia-nccl-cu12", "cutensor-cu13",
            "nvidia-cudnn-cu13", "nvidia-cudnn-frontend", "nvidia-cuda-nvrtc",
            "nvidia-cuda-runtime", "torch", "triton", "jax", "jaxlib", "pytest",
            "pytest-timeout", "tqdm", "minisam"]


def packages() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def cupy_warning(pk: dict) -> str | None:
    """Two CuPy distributions side by side conflict (CuPy warns at import)."""
    cupys = sorted(n for n in pk if n.startswith("cupy"))
    if len(cupys) < 2:
        return None
    return (f"WARNING: several CuPy distributions are installed ({', '.join(cupys)}); CuPy "
            "warns about this at import and may misbehave. Keep exactly one: minisam's extra "
            "gpu-cuda12 installs cupy-cuda12x, gpu-cuda13 installs cupy-cuda13x (pick the "
            "CUDA major of the driver, nvidia-smi's 'CUDA Version')")


def describe_cupy(info: dict) -> bool:
    """CuPy, CUDA, the GPUs, a smoke test and NCCL into `info`; False if any of it fails."""
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
        print("cupy", cp.__version__, "CUDA runtime", info["cuda_runtime"],
              "driver", info["cuda_driver"])
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
              "(2 ranks on one GPU need runtime >= 23000 and NCCL_MULTI_RANK_GPU_ENABLE=1)")
        print("CUPY_ACCELERATORS:",
              os.environ.get("CUPY_ACCELERATORS", "<unset: CuPy 14 default 'cub'>"))
        try:
            cp.show_config(_full=True)
        except TypeError:
            cp.show_config()
        return True
    except Exception as ex:  # noqa: BLE001 (any failure here is the finding)
        info["cupy_error"] = f"{type(ex).__name__}: {ex}"
        print("CuPy PROBLEM:", info["cupy_error"])
        return False


def describe_torch(info: dict):
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
        info["torch_cuda_version"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if info["torch_cuda"] else None
        print("torch", torch.__version__, "cuda", torch.version.cuda,
              "available", info["torch_cuda"], "cudnn", info["cudnn"])
    except Exception as ex:  # noqa: BLE001
        info["torch_error"] = f"{type(ex).__name__}: {ex}"
        print("torch:", info["torch_error"])


def describe_smi(info: dict):
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                            "memory.used,clocks.max.sm,power.limit,compute_mode,mig.mode.current",
                            "--format=csv"], capture_output=True, text=True, timeout=20)
        print(r.stdout.strip() or r.stderr.strip())
        info["nvidia_smi"] = r.stdout.strip()
    except Exception as ex:  # noqa: BLE001
        print("nvidia-smi:", ex)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: env.py OUT_DIR", file=sys.stderr)
        return 2
    out_dir = argv[0]
    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    info["packages"] = pk = packages()
    print("packages:", ", ".join(f"{k} {v}" for k, v in pk.items()))
    warning = cupy_warning(pk)
    if warning:
        print(warning)
        info["warning"] = warning
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("CUPY_", "NCCL_", "CUDA_", "NVIDIA_TF32"))}
    print("env:", info["env"])
    cache = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
    n_cached = sum(len(f) for _, _, f in os.walk(cache)) if os.path.isdir(cache) else 0
    info["cupy_kernel_cache_files"] = n_cached
    print(f"CuPy kernel cache {cache}: {n_cached} files ("
          f"{'cold: first calls of every kernel compile with NVRTC' if n_cached < 20 else 'warm'})")
    ok = describe_cupy(info)
    describe_torch(info)
    describe_smi(info)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "env.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
