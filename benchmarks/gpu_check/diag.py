"""gpu_check step diag (optional): where minisam's GPU step time goes.

    diag.py OUT [section,section,...]   run the sections (default all), one line per
                                        measurement, everything also into OUT/diag.json
    diag.py --summary OUT/diag.json     the DIAG lines of the run's summary (no CuPy needed)

Sections: bn_reduction, conv_pieces, bn_fused, step_split, hidden_syncs, graph_capture.
Each is independent: a failure prints its error and the next section runs; diag.json is
rewritten after every section, so a time-out keeps what finished. Measurements only: the
prototypes here (two-stage reductions, implicit GEMM, fused BN+ReLU, CUDA graphs) are not
minisam code paths."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

cp = None          # cupy, imported by run() (the summary needs no GPU)
SECTIONS = ("bn_reduction", "conv_pieces", "bn_fused", "step_split", "hidden_syncs",
            "graph_capture")


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


def make(name, batch=128):
    from minisam.models import wide_resnet
    from minisam.optim import nesterov_init
    from minisam.tree import flat_tree
    net = wide_resnet(name)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((batch, 32, 32, 3)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    params = flat_tree({k: cp.asarray(v) for k, v in net.get_params().items()})  # as the trainer
    state = {k: cp.asarray(v) for k, v in net.get_state().items()}
    net.set_params(params)
    net.set_state(state)
    return net, params, state, nesterov_init(params), x, y


def bn_reduction():
    """BatchNorm's per-channel statistics, x.mean(axis=(0, 1, 2)) on NHWC, against a
    two-stage reduction and a GEMV (is CuPy's leading-axis reduction the slow part?)."""
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
                ("x.mean(axis=(0,1,2))          [BatchNorm as written]",
                 lambda: x.mean(axis=(0, 1, 2))),
                ("(x*x).mean(axis=(0,1,2))      [BatchNorm as written]",
                 lambda: (x * x).mean(axis=(0, 1, 2))),
                ("x.reshape(128,-1,C).sum(1).sum(0)   [two-stage]",
                 lambda: x2.reshape(g, -1, c).sum(axis=1).sum(axis=0)),
                ("sum of squares ReductionKernel, two-stage",
                 lambda: sumsq(x2.reshape(g, -1, c), axis=1).sum(axis=0)),
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
    from minisam.backend import set_tf32
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

    set_tf32(False)
    rec("cupy.pad (SAME, 1 px) of x[128,32,32,160]", gpu_ms(lambda: _pad_same(x, 3, 3, 1)),
        key="pad")
    rec("im2col: 9 strided copies into cols[128,32,32,3,3,160]",
        gpu_ms(lambda: im2col(xpad, 3, 3, 1, oh, ow, cols)), key="im2col")
    rec("forward GEMM cols[M,1440] @ K[1440,160], fp32", gpu_ms(lambda: c2 @ k2), flops,
        "gemm_fp32")
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
    set_tf32(True)          # minisam's own switch (what --tf32 does)
    try:
        rec("forward GEMM, TF32 (CUBLAS_COMPUTE_32F_FAST_TF32)", gpu_ms(lambda: c2 @ k2), flops,
            "gemm_tf32")
        rec("dW GEMM, TF32", gpu_ms(lambda: c2.T @ dy), flops, "dw_tf32")
        t = c2 @ k2
        out["tf32_rel_err"] = float(cp.abs(t.reshape(ref.shape) - ref).max() / cp.abs(ref).max())
        print(f"  TF32 forward GEMM rel err vs fp32: {out['tf32_rel_err']:.1e} "
              "(verify's tolerance is 1e-5)")
    finally:
        set_tf32(False)
    return out


def bn_fused():
    """BatchNorm + ReLU forward of one [128,32,32,160] activation: as written (about ten
    kernels, two slow reductions) vs two-stage statistics + one fused ElementwiseKernel."""
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
    say(f"BN+ReLU forward fused (two-stage stats + 1 kernel; max diff {err:.1e})",
        out["fused_fwd_ms"])
    return out


def step_split():
    """Host (Python + launch) time vs GPU time of one train_step, SGD and SAM, batch 128, and
    the peak of live bytes in CuPy's pool during one SAM step (minisam.bench's MemoryHook);
    then the SAM step again with every conv keeping its im2col matrix (``keep_cols``; the
    GPU default rebuilds it in the backward, ``nn.conv.KEEP_COLS``): time and memory of
    both, to choose the default from."""
    from cupyx.profiler import benchmark
    from minisam.bench import peak_live_hook
    from minisam.nn import Conv
    from minisam.sam import SAMConfig, train_step
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
        with peak_live_hook(cp) as hook:
            train_step(net, p, s, mo, x, y, 0.1, cfg)
            sync()
        out[f"{name}/sam_peak_live_MiB"] = round(hook.peak / 2**20, 1)
        out[f"{name}/live_between_steps_MiB"] = round(before / 2**20, 1)
        out[f"{name}/pool_total_MiB"] = round(pool.total_bytes() / 2**20, 1)
        print(f"  {name}: peak live {hook.peak / 2**20:9.0f} MiB during a SAM step; "
              f"{before / 2**20:9.0f} MiB live between steps (params, im2col buffers, ...); "
              f"pool holds {pool.total_bytes() / 2**20:9.0f} MiB", flush=True)
        for layer in (lay for _, lay in net.named_layers() if isinstance(lay, Conv)):
            layer.keep_cols = True
        cfg = SAMConfig(rho=0.05, gradient_clipping=0.0)
        r = benchmark(train_step, (net, p, s, mo, x, y, 0.1, cfg), n_repeat=3, n_warmup=1)
        with peak_live_hook(cp) as hook:
            train_step(net, p, s, mo, x, y, 0.1, cfg)
            sync()
        kept = {"gpu_ms": round(float(np.median(r.gpu_times)) * 1e3, 2),
                "peak_live_MiB": round(hook.peak / 2**20, 1)}
        out[f"{name}/sam_keep_cols"] = kept
        say(f"{name} SAM step keeping every conv's im2col matrix (keep_cols=True)",
            kept["gpu_ms"], f"peak live {kept['peak_live_MiB']:9.0f} MiB")
        del net, p, s, mo, x, y
        pool.free_all_blocks()
    return out


def hidden_syncs():
    """Does train_step (with clipping, as in training) synchronise with the host anywhere?
    cupyx.allow_synchronize(False) raises on CuPy-initiated device synchronisations (it is
    deprecated since CuPy 10; where it is gone, the stand-in's sync count in the tests is
    what there is)."""
    import cupyx
    from minisam.sam import SAMConfig, train_step
    if not hasattr(cupyx, "allow_synchronize"):
        print("  cupyx.allow_synchronize is not in this CuPy: not checked here", flush=True)
        return {"syncs": "not checked (no cupyx.allow_synchronize)"}
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
    """Capture one SAM step of WRN-16-8 (batch 128) in a CUDA graph on a non-blocking stream
    and replay it: the gap to eager is the Python/launch overhead a graph removes. Timing
    only (the replayed step reuses the captured inputs)."""
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


def run(out_dir: str, only=None) -> int:
    global cp
    import cupy
    cp = cupy
    res = {}
    for name in SECTIONS:
        if only and name not in only:
            continue
        t0 = time.time()
        print(f"--- {name}", flush=True)
        try:
            res[name] = globals()[name]()
            print(f"--- {name}: done in {time.time() - t0:.1f} s", flush=True)
        except Exception as ex:  # noqa: BLE001 (report and go on)
            traceback.print_exc()
            res[name] = {"error": f"{type(ex).__name__}: {ex}"}
            print(f"--- {name}: FAILED ({type(ex).__name__}: {ex})", flush=True)
        with open(os.path.join(out_dir, "diag.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
        cp.get_default_memory_pool().free_all_blocks()
    bad = [k for k, v in res.items() if isinstance(v, dict) and "error" in v]
    print(f"diag: {len(res) - len(bad)} sections ok, {len(bad)} failed {bad}")
    return 0


def summary_lines(d: dict) -> list:
    """The few numbers of diag.json worth a line in summary.txt."""
    lines = []
    split = d.get("step_split") if isinstance(d.get("step_split"), dict) else {}
    for k in ("wrn16_8/sam", "wrn28_10/sam"):
        v = split.get(k)
        if isinstance(v, dict):
            lines.append(f"DIAG {k}: GPU {v.get('gpu_ms')} ms, host {v.get('host_ms')} ms per step")
    for k in ("wrn28_10/sam_peak_live_MiB", "wrn28_10/live_between_steps_MiB",
              "wrn28_10/pool_total_MiB"):
        if split.get(k) is not None:
            lines.append(f"DIAG {k}: {split[k]}")
    kept = split.get("wrn28_10/sam_keep_cols")
    if isinstance(kept, dict):
        lines.append(f"DIAG wrn28_10/sam with keep_cols=True: GPU {kept.get('gpu_ms')} ms, "
                     f"peak live {kept.get('peak_live_MiB')} MiB")
    rows = d.get("bn_reduction")
    if isinstance(rows, list):
        for r in rows:
            if r.get("shape") == [128, 32, 32, 160]:
                lines.append(f"DIAG BN stat {r['op']}: {r['ms']} ms ({r['GB_per_s']} GB/s)")
    conv = d.get("conv_pieces") if isinstance(d.get("conv_pieces"), dict) else {}
    for k in ("gemm_fp32", "gemm_tf32", "implicit_gemm_fp32", "im2col", "pad"):
        v = conv.get(k)
        if isinstance(v, dict):
            lines.append(f"DIAG conv {k}: {v['ms']} ms"
                         + (f", {v['TFLOPS']} TFLOP/s" if v.get("TFLOPS") else ""))
    g = d.get("graph_capture") if isinstance(d.get("graph_capture"), dict) else {}
    if "eager_ms" in g and "graph_ms" in g:
        lines.append(f"DIAG CUDA graph WRN-16-8 SAM: eager {g['eager_ms']:.1f} ms, "
                     f"graph {g['graph_ms']:.1f} ms")
    elif "error" in g:
        lines.append(f"DIAG CUDA graph capture failed: {g['error'][:120]}")
    if "hidden_syncs" in d:
        h = d["hidden_syncs"]
        lines.append(f"DIAG hidden syncs: {h.get('syncs', h) if isinstance(h, dict) else h}")
    failed = [k for k, v in d.items() if isinstance(v, dict) and "error" in v]
    if failed:
        lines.append(f"DIAG sections failed: {', '.join(failed)}")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--summary":
        try:
            with open(argv[1]) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            print(f"DIAG: no diagnostics ({e})")
            return 1
        for line in summary_lines(d):
            print(line)
        return 0
    if not 1 <= len(argv) <= 2 or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    only = set(argv[1].split(",")) - {""} if len(argv) == 2 else None
    unknown = sorted((only or set()) - set(SECTIONS))
    if unknown:
        print(f"diag.py: unknown section(s) {unknown}; choose from {list(SECTIONS)}",
              file=sys.stderr)
        return 2
    return run(argv[0], only)


if __name__ == "__main__":
    sys.exit(main())
