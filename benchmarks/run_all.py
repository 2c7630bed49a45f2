"""Run minisam and its peers (PyTorch eager / torch.compile, JAX jit) on one device, one
after another, each in its own subprocess, and compare them.

For each model it runs

* minisam: ``python -m minisam bench --model M --batch-size B --device D --warmup W
  --steps S --json OUT`` (a failure is recorded as an error row, and the run goes on);
* ``benchmarks/peers/torch_step.py`` (rows ``pytorch-eager`` and ``pytorch-compile``);
* ``benchmarks/peers/jax_step.py`` (row ``jax-jit``);

prints a table with, for every peer row, minisam's SAM images/s divided by the peer's
(> 1: minisam is faster), the SAM/SGD time ratios, and minisam's peak memory divided by
the peer's (> 1: minisam uses more), then writes every row and the host description to
``benchmarks/results/<device-slug>-<YYYY-MM-DD>.json``.

Example::

    python benchmarks/run_all.py --device cpu --models wrn16_4 --batch-size 32 \
        --warmup 2 --steps 10 --threads 2

Peak memory on GPU is peak live bytes (minisam: CuPy's pool in use, from a memory hook;
PyTorch: ``max_memory_allocated``), the pools' sizes apart. On CPU it is the peak RSS of
the whole process (interpreter, framework and compiler included), so CPU memory ratios
compare whole processes, not just tensors.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "peers"))
import common

FRAMEWORKS = ["minisam", "pytorch", "jax"]
# names accepted by --skip
SKIP_NAMES = {"minisam": "minisam", "pytorch": "pytorch", "torch": "pytorch",
              "pytorch-eager": "pytorch-eager", "pytorch-compile": "pytorch-compile",
              "compile": "pytorch-compile", "jax": "jax", "jax-jit": "jax"}


def command(framework: str, args, model: str, out: str, skip: set):
    common_args = ["--model", model, "--batch-size", str(args.batch_size),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--json", out]
    if framework == "minisam":
        return [sys.executable, "-m", "minisam", "bench", "--device", args.device] + common_args
    threads = ["--threads", str(args.threads)] if args.threads else []
    if framework == "pytorch":
        mode = ("eager" if "pytorch-compile" in skip else
                "compile" if "pytorch-eager" in skip else "both")
        return ([sys.executable, os.path.join(HERE, "peers", "torch_step.py"),
                 "--device", args.device, "--mode", mode,
                 "--compile-timeout", str(args.compile_timeout)] + common_args + threads)
    if framework == "jax":
        return ([sys.executable, os.path.join(HERE, "peers", "jax_step.py"),
                 "--device", args.device] + common_args + threads)
    raise ValueError(framework)


def error_row(framework: str, args, model: str, msg: str) -> dict:
    ns = argparse.Namespace(model=model, batch_size=args.batch_size, warmup=args.warmup,
                            steps=args.steps)
    name = {"pytorch": "pytorch-eager", "jax": "jax-jit"}.get(framework, framework)
    return common.make_row(name, "", ns, None, None, None, {}, error=msg)


def run_with_retries(framework: str, args, model: str, skip: set, env: dict):
    """run_one, repeated (up to --retries more times) while other processes used more
    than --max-other-load of the machine during the timed steps; keeps the cleanest run."""
    best = None
    for attempt in range(1 + args.retries):
        rows = run_one(framework, args, model, skip, env)
        loads = [other_load(r) for r in rows if not r.get("error")]
        worst = max((v for v in loads if v is not None), default=0.0)
        for r in rows:
            r["attempt"] = attempt + 1
        if best is None or worst < best[0]:
            best = (worst, rows)
        if not loads or worst <= args.max_other_load:
            break
        print(f"  other processes used {worst:.0%} of the CPUs during the timed steps; "
              f"{'retrying' if attempt < args.retries else 'keeping the cleanest run'}",
              flush=True)
    return best[1]


def run_one(framework: str, args, model: str, skip: set, env: dict):
    """Run one framework in a subprocess; returns its rows (error rows on failure)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        cmd = command(framework, args, model, out, skip)
        idle = wait_for_idle(args.wait_idle) if args.wait_idle else common.cpu_idle_fraction(1.0)
        print(f"$ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return [error_row(framework, args, model, f"timed out after {args.timeout} s")]
        wall = time.perf_counter() - t0
        rows = None
        if os.path.exists(out):
            with open(out) as f:
                data = json.load(f)
            rows = data if isinstance(data, list) else [data]
        if p.returncode != 0 or not rows:
            tail = (p.stderr or p.stdout or "").strip().splitlines()[-12:]
            msg = f"exit code {p.returncode}: " + " | ".join(tail)[-2000:]
            print(f"  failed ({wall:.0f} s): {msg[:300]}", flush=True)
            if rows and any(r.get("error") for r in rows):
                return rows
            return [error_row(framework, args, model, msg)]
        print(f"  done in {wall:.0f} s", flush=True)
        for r in rows:
            r["cpu_idle_before"] = None if idle is None else round(idle, 3)
        return rows


def fmt(v, spec):
    """Format a number, or a right-aligned '-' of the same width for a missing one."""
    if v is None:
        width = re.match(r"\d*", spec).group(0)
        return format("-", ">" + width)
    return format(v, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def compare(rows):
    """Per model: minisam vs each peer row."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ms = next((r for r in rows if r["model"] == model and r["framework"] == "minisam"
                   and not r.get("error")), None)
        for r in rows:
            if r["model"] != model or r["framework"] == "minisam":
                continue
            out.append({
                "model": model, "peer": r["framework"],
                "minisam_over_peer_sam_images_per_s": ratio(
                    ms and ms["sam_images_per_s"], r["sam_images_per_s"]),
                "minisam_over_peer_sgd_images_per_s": ratio(
                    ms and ms["sgd_images_per_s"], r["sgd_images_per_s"]),
                "minisam_sam_sgd_ratio": ms and ms["sam_sgd_ratio"],
                "peer_sam_sgd_ratio": r["sam_sgd_ratio"],
                "minisam_over_peer_peak_memory": ratio(
                    ms and ms["peak_memory_mb"], r["peak_memory_mb"]),
            })
    return out


def other_load(row):
    """Largest share of the machine's CPU time used by other processes while this row's
    timed steps ran (None where unknown)."""
    vals = [row.get(k) for k in ("sgd_other_cpu_load", "sam_other_cpu_load")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def print_table(rows, comparisons):
    print()
    hdr = (f"{'model':9s} {'framework':16s} {'SGD ms':>9s} {'SAM ms':>9s} {'SGD img/s':>10s} "
           f"{'SAM img/s':>10s} {'SAM/SGD':>8s} {'peak MB':>9s} {'others':>7s}  error")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:9s} {r['framework']:16s} {fmt(r['sgd_ms'], '9.1f')} "
              f"{fmt(r['sam_ms'], '9.1f')} {fmt(r['sgd_images_per_s'], '10.1f')} "
              f"{fmt(r['sam_images_per_s'], '10.1f')} {fmt(r['sam_sgd_ratio'], '8.2f')} "
              f"{fmt(r['peak_memory_mb'], '9.0f')} {fmt(other_load(r), '7.0%')}  "
              f"{(r.get('error') or '')[:60]}")
    if comparisons:
        print()
        hdr = (f"{'model':9s} {'minisam vs':16s} {'SAM img/s ratio':>16s} "
               f"{'SGD img/s ratio':>16s} {'SAM/SGD minisam':>16s} {'SAM/SGD peer':>13s} "
               f"{'memory ratio':>13s}")
        print(hdr)
        print("-" * len(hdr))
        for c in comparisons:
            print(f"{c['model']:9s} {c['peer']:16s} "
                  f"{fmt(c['minisam_over_peer_sam_images_per_s'], '16.2f')} "
                  f"{fmt(c['minisam_over_peer_sgd_images_per_s'], '16.2f')} "
                  f"{fmt(c['minisam_sam_sgd_ratio'], '16.2f')} "
                  f"{fmt(c['peer_sam_sgd_ratio'], '13.2f')} "
                  f"{fmt(c['minisam_over_peer_peak_memory'], '13.2f')}")
        print("(ratios: minisam / peer; images/s > 1 = minisam faster; memory > 1 = "
              "minisam uses more)")
    print("('others': share of the machine's CPU time other processes used during the "
          "timed steps)")


def wait_for_idle(max_wait: float, threshold: float = 0.85) -> float:
    """Wait (up to max_wait s) until the CPUs are at least `threshold` idle over 2 s;
    returns the last idle fraction seen (None where /proc/stat is unreadable)."""
    deadline = time.monotonic() + max_wait
    while True:
        idle = common.cpu_idle_fraction(2.0)
        if idle is None or idle >= threshold or time.monotonic() >= deadline:
            return idle
        print(f"  waiting for idle CPUs (idle {idle:.0%})", flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--models", nargs="+", default=["wrn16_4"], choices=sorted(common.MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every framework (also sets OMP/MKL/OpenBLAS env)")
    p.add_argument("--skip", nargs="*", default=[], choices=sorted(SKIP_NAMES),
                   help="frameworks or rows to leave out")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds allowed to each framework's subprocess")
    p.add_argument("--compile-timeout", type=float, default=300.0,
                   help="seconds allowed to torch.compile (see torch_step.py)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each framework, wait up to this long for the CPUs to be "
                        ">= 85%% idle (for shared machines); 0: don't wait")
    p.add_argument("--retries", type=int, default=0,
                   help="re-run a framework up to this many times when other processes "
                        "used more than --max-other-load of the CPUs during its timed steps")
    p.add_argument("--max-other-load", type=float, default=0.05,
                   help="share of the machine's CPU time other processes may use during "
                        "the timed steps before a retry (default 0.05)")
    p.add_argument("--out", default=None,
                   help="results file (default benchmarks/results/<device>-<date>.json)")
    args = p.parse_args(argv)
    skip = {SKIP_NAMES[s] for s in args.skip}

    env = dict(os.environ)
    if args.threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(args.threads)
    host = common.host_info()
    host["loadavg_1m_start"] = round(os.getloadavg()[0], 2)

    rows = []
    started = datetime.datetime.now()
    for model in args.models:
        for fw in FRAMEWORKS:
            if fw in skip or (fw == "pytorch" and {"pytorch-eager", "pytorch-compile"} <= skip):
                continue
            rows.extend(run_with_retries(fw, args, model, skip, env))
    host["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    comparisons = compare(rows)
    print_table(rows, comparisons)

    device = next((r["device"] for r in rows if r.get("device")),
                  host["cpu"] if args.device == "cpu" else "gpu")
    path = args.out or os.path.join(
        HERE, "results", f"{slug(device)}-{started.strftime('%Y-%m-%d')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "settings": {"device": args.device, "models": args.models,
                     "batch_size": args.batch_size, "warmup": args.warmup,
                     "steps": args.steps, "threads": args.threads, "skip": sorted(skip)},
        "device": device,
        "host": host,
        "rows": rows,
        "comparisons": comparisons,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
