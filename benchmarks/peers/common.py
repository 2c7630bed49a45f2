"""Shared pieces of the peer benchmarks (PyTorch and JAX): CLI, synthetic data, timing,
memory and host description, and the JSON row schema.

Both peer scripts import this file by path (``sys.path`` holds the script's folder), so
it must stay free of any framework import.

JSON row schema (one object per framework row; a script writing several rows writes a
list)::

    {"framework": "pytorch-eager" | "pytorch-compile" | "jax-jit" | "minisam",
     "device": "human-readable device name", "model": "wrn16_4", "batch_size": 32,
     "sgd_ms": median ms, "sam_ms": median ms,
     "sgd_images_per_s": ..., "sam_images_per_s": ..., "sam_sgd_ratio": sam_ms / sgd_ms,
     "peak_memory_mb": ..., "warmup": 3, "steps": 10, "dtype": "float32",
     "versions": {...}, "error": null | "why there is no number"}

Extra keys (``num_params``, per-step times, ``memory_kind``...) are informative only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

# Hyper-parameters of the step, as in google-research/sam's CIFAR runs
# (sam_jax/training_utils/flax_training.py: train_step, with a constant learning rate).
LEARNING_RATE = 0.1
MOMENTUM = 0.9          # flax.optim.Momentum(beta=0.9, nesterov=True)
WEIGHT_DECAY = 5e-4     # l2_reg: loss += 0.5 * l2_reg * sum_i ||w_i||^2 (all params)
RHO = 0.05              # FLAGS.sam_rho
BN_MOMENTUM = 0.9       # sam_jax/models/utils.py: _BATCHNORM_MOMENTUM
BN_EPSILON = 1e-5       # sam_jax/models/utils.py: _BATCHNORM_EPSILON
IMAGE_SHAPE = (32, 32, 3)  # CIFAR, NHWC
SEED = 0

# 1-minute load average when this process started (the row reports it with the one at
# the end; this process itself adds about its thread count, so more means other load).
START_LOADAVG = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

# name -> (blocks_per_group, channel_multiplier); blocks_per_group = (depth - 4) // 6
MODELS = {
    "wrn16_4": (2, 4),
    "wrn16_8": (2, 8),
    "wrn28_10": (4, 10),
}


def parse_args(description: str, argv=None, extra: Callable | None = None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="wrn16_4", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "cuda"],
                   help="'gpu' and 'cuda' are the same thing")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (of each kind)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    p.add_argument("--json", default=None, help="write the row(s) to this file")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: what the framework picks)")
    p.add_argument("--check-steps", type=int, default=0,
                   help="correctness check instead of timing: print the parameter count and "
                        "the loss over N SAM steps on one fixed batch")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.device == "cuda":
        args.device = "gpu"
    return args


def synthetic_batch(batch_size: int, num_classes: int, seed: int = SEED):
    """A fixed random CIFAR-shaped batch: float32 NHWC images ~ N(0, 1), int labels."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size,) + IMAGE_SHAPE, dtype=np.float32)
    y = rng.integers(0, num_classes, size=(batch_size,), dtype=np.int64)
    return x, y


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (with family/model numbers, which tell a generic
    'AMD EPYC' apart, and AVX-512 if present) plus the number of cores this process may use."""
    model, fields, flags = platform.processor() or platform.machine(), {}, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # first processor only
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
        model = fields.get("model name", model)
        flags = fields.get("flags", "")
    except OSError:
        pass
    extra = []
    if "cpu family" in fields and "model" in fields:
        extra.append(f"family {fields['cpu family']} model {fields['model']}")
    if "avx512f" in flags.split():
        extra.append("AVX-512")
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count()
    extra.append(f"{n} cores")
    return f"{model} ({', '.join(extra)})"


def host_info() -> dict:
    info = {"cpu": cpu_name(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory_gb"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def cpu_idle_fraction(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent idle over `interval` seconds (from /proc/stat)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        i0, t0 = read()
        time.sleep(interval)
        i1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / max(t1 - t0, 1)


def _machine_busy_s() -> float | None:
    """CPU-seconds all CPUs have spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """Peak resident set size of this whole process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(step: Callable[[], None], sync: Callable[[], None],
               warmup: int, steps: int) -> dict:
    """Run `warmup` untimed steps, then `steps` timed ones, each bracketed by `sync`.

    Returns the per-step wall times in ms, the median, and the duration of the first
    warm-up step (where jit / torch.compile compile).
    """
    first_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        sync()
        if i == 0:
            first_s = time.perf_counter() - t0
    times = []
    busy0, own0, wall0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    other = None
    busy1 = _machine_busy_s()
    if busy0 is not None and busy1 is not None:
        ncpu = os.cpu_count() or 1
        other = max(0.0, (busy1 - busy0) - (_own_cpu_s() - own0)) / (
            ncpu * (time.perf_counter() - wall0))
    return {"median_ms": statistics.median(times), "times_ms": [round(t, 3) for t in times],
            "first_step_s": first_s, "other_load": other}


def make_row(framework: str, device: str, args, sgd: dict | None, sam: dict | None,
             peak_memory_mb: float | None, versions: dict, error: str | None = None,
             **extra) -> dict:
    def ips(t):
        return None if t is None else args.batch_size / (t["median_ms"] / 1e3)
    row = {
        "framework": framework,
        "device": device,
        "model": args.model,
        "batch_size": args.batch_size,
        "sgd_ms": None if sgd is None else round(sgd["median_ms"], 3),
        "sam_ms": None if sam is None else round(sam["median_ms"], 3),
        "sgd_images_per_s": None if sgd is None else round(ips(sgd), 2),
        "sam_images_per_s": None if sam is None else round(ips(sam), 2),
        "sam_sgd_ratio": (None if sgd is None or sam is None
                          else round(sam["median_ms"] / sgd["median_ms"], 3)),
        "peak_memory_mb": None if peak_memory_mb is None else round(peak_memory_mb, 1),
        "warmup": args.warmup,
        "steps": args.steps,
        "dtype": "float32",
        "versions": versions,
        "error": error,
    }
    if START_LOADAVG is not None:
        row["loadavg_1m_start"] = round(START_LOADAVG, 2)
        row["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    # Share of the machine's CPU time that other processes used while the timed steps ran
    # (0 = nothing else ran; on a shared machine, numbers with a high share are suspect).
    for name, t in (("sgd", sgd), ("sam", sam)):
        if t is not None and t.get("other_load") is not None:
            row[f"{name}_other_cpu_load"] = round(t["other_load"], 3)
    if sgd is not None:
        extra.setdefault("sgd_times_ms", sgd["times_ms"])
        extra.setdefault("sgd_first_step_s", round(sgd["first_step_s"] or 0.0, 3))
    if sam is not None:
        extra.setdefault("sam_times_ms", sam["times_ms"])
        extra.setdefault("sam_first_step_s", round(sam["first_step_s"] or 0.0, 3))
    row.update(extra)
    return row


def emit(rows, path: str | None):
    """Print the row(s) and write them to `path` (one object, or a list if several)."""
    out = rows[0] if len(rows) == 1 else rows
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


def restrict_cpus(threads: int | None):
    """Pin this process to the first `threads` CPUs it may use (for XLA, whose CPU thread
    pool follows the affinity mask). Must run before the framework is imported."""
    if not threads:
        return
    try:
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError) as e:  # not Linux, or not allowed
        print(f"warning: could not pin to {threads} CPUs: {e}", file=sys.stderr)


def print_check(framework: str, num_params: int, losses: list[float]):
    print(f"[{framework}] parameters: {num_params:,}")
    print(f"[{framework}] SAM loss on one fixed batch: "
          + " ".join(f"{l:.4f}" for l in losses))
    ok = losses[-1] < losses[0]
    print(f"[{framework}] loss went {'down' if ok else 'UP (check failed)'}")
    return ok
