"""Time the gradient all-reduce of WRN-16-8 and WRN-28-10 over NCCL; print JSON.

Measure (GPUs, one process per GPU, through the launcher):

    python -m minisam.launch --nproc 8 --raw -- python benchmarks/allreduce.py
    python benchmarks/allreduce.py                 # one GPU: the copy/flatten baseline

For each model it builds gradient-shaped CuPy arrays (the model's parameter dict: same
keys, shapes, float32), checks one ``NcclComm.allreduce_mean`` against the expected mean,
then times, after a barrier, ``--iters`` back-to-back calls and divides (like
nccl-tests), ``--repeats`` times:

* ``nccl_ms``: ``ncclAllReduce`` of the flat float32 buffer alone;
* ``allreduce_mean_ms``: what the train step pays: pack the dict, all-reduce, divide by
  N, unpack (``NcclComm.allreduce_mean``).

and reports algorithm bandwidth ``algbw = bytes / t`` and bus bandwidth
``busbw = algbw * 2 (N - 1) / N`` (nccl-tests' convention; comparable with the link
bandwidth; null for one GPU, where nothing crosses a link). Only rank 0 prints.

Model (no GPU needed, nothing measured): ``--estimate`` prints the ring all-reduce time
``t = 2 (N - 1) / N * bytes / bus_bandwidth + latency`` for the given GPU counts and an
assumed bus bandwidth, labelled as an estimate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minisam.backend import gpu_available  # noqa: E402
from minisam.models import wide_resnet  # noqa: E402

MODELS = ("wrn16_8", "wrn28_10")


def param_shapes(name: str) -> dict:
    """{key: shape} of a model's parameters (= its gradients)."""
    return {k: v.shape for k, v in wide_resnet(name).get_params().items()}


def ring_allreduce_seconds(nbytes: int, n: int, bus_gbps: float, latency_us: float) -> float:
    """Ring all-reduce model: each GPU sends and receives 2 (N-1)/N of the buffer."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bus_gbps * 1e9) + latency_us * 1e-6


def estimate(args) -> dict:
    rows = []
    for name in args.models:
        shapes = param_shapes(name)
        count = sum(int(_prod(s)) for s in shapes.values())
        nbytes = 4 * count
        for n in args.gpus:
            t = ring_allreduce_seconds(nbytes, n, args.bus_gbps, args.latency_us)
            rows.append({"model": name, "params": count, "bytes": nbytes, "gpus": n,
                         "allreduce_ms_per_call": round(t * 1e3, 4),
                         "allreduces_per_sam_step": 1,
                         "allreduces_per_sam_step_sync_perturbations": 2})
    return {"kind": "ESTIMATE (bandwidth model, not a measurement)",
            "formula": "t = 2 (N-1)/N * bytes / bus_bandwidth + latency",
            "bus_bandwidth_GBps": args.bus_gbps, "latency_us": args.latency_us,
            "rows": rows}


def _prod(shape):
    out = 1
    for s in shape:
        out *= int(s)
    return out


def measure(args) -> dict | None:
    import cupy as cp
    from minisam.distributed import comm_from_env
    from minisam.distributed.nccl import _ptr

    comm = comm_from_env("gpu", nccl=True, bucket_mb=args.bucket_mb)
    nccl = comm.nccl
    n = comm.size
    stream = cp.cuda.get_current_stream()

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        per_call = []
        for _ in range(args.repeats):
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                fn()
            stream.synchronize()
            per_call.append((time.perf_counter() - t0) / args.iters)
        return per_call

    def one_model(name):
        shapes = param_shapes(name)
        grads = {k: cp.full(s, comm.rank + 1, dtype=cp.float32) for k, s in shapes.items()}
        count = sum(int(g.size) for g in grads.values())
        nbytes = 4 * count
        mean = comm.allreduce_mean(grads)                      # correctness first
        expected = (n + 1) / 2
        worst = max(float(cp.abs(v - expected).max()) for v in mean.values())
        if worst > 1e-5 * expected:
            raise RuntimeError(f"{name}: allreduce_mean is off by {worst} (expected {expected})")

        flat = cp.ones(count, dtype=cp.float32)
        out = cp.empty_like(flat)

        def raw():
            comm.comm.allReduce(_ptr(flat), _ptr(out), count, nccl.NCCL_FLOAT32,
                                nccl.NCCL_SUM, stream.ptr)

        t_raw = timed(raw)
        t_full = timed(lambda: comm.allreduce_mean(grads))
        med = statistics.median(t_raw)
        algbw = nbytes / med / 1e9
        return {"model": name, "params": count, "arrays": len(grads), "bytes": nbytes,
                "nccl_ms": {"median": med * 1e3, "min": min(t_raw) * 1e3},
                "allreduce_mean_ms": {"median": statistics.median(t_full) * 1e3,
                                      "min": min(t_full) * 1e3},
                "algbw_GBps": algbw,
                "busbw_GBps": algbw * 2 * (n - 1) / n if n > 1 else None}

    results = []
    for name in args.models:
        results.append(one_model(name))
        cp.get_default_memory_pool().free_all_blocks()

    report = None
    if comm.rank == 0:
        dev = cp.cuda.runtime.getDeviceProperties(comm.device_id)
        name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
        report = {"kind": "MEASURED", "device": name, "world_size": n,
                  "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                  "nccl_version": nccl.get_version(), "cupy_version": cp.__version__,
                  "host": platform.node(), "bucket_mb": args.bucket_mb,
                  "iters": args.iters, "repeats": args.repeats, "results": results}
    comm.barrier()
    comm.close()
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="WRN presets (%(default)s)")
    p.add_argument("--iters", type=int, default=20, help="calls per timing (%(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timings per case (%(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (%(default)s)")
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="NcclComm bucket size in MiB (default: one buffer)")
    p.add_argument("--estimate", action="store_true",
                   help="print the bandwidth-model estimate instead of measuring (no GPU)")
    p.add_argument("--gpus", type=int, nargs="+", default=[2, 4, 8],
                   help="GPU counts for --estimate (%(default)s)")
    p.add_argument("--bus-gbps", type=float, default=450.0,
                   help="assumed bus bandwidth in GB/s for --estimate (%(default)s: NVLink 4 "
                        "per direction on H100 SXM; PCIe Gen5 x16 is about 64)")
    p.add_argument("--latency-us", type=float, default=10.0,
                   help="assumed per-call latency in microseconds for --estimate (%(default)s)")
    args = p.parse_args(argv)

    if args.estimate:
        print(json.dumps(estimate(args), indent=2))
        return 0
    if not gpu_available():
        print("benchmarks/allreduce.py: no usable CuPy GPU found; this benchmark times NCCL "
              "all-reduce on GPUs, so nothing was measured. Run it on a GPU machine (with "
              "`pip install 'minisam[gpu-cuda12]'` or `[gpu-cuda13]`), or use --estimate for "
              "the bandwidth model.",
              file=sys.stderr)
        return 1
    try:
        report = measure(args)
    except RuntimeError as e:
        print(f"benchmarks/allreduce.py: {e}", file=sys.stderr)
        return 1
    if report is not None:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
