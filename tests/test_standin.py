"""The strict CuPy stand-in itself (tests/standin): if it grew lax, the gpu tests run
under it would stop catching NumPy-only calls on the GPU path. Run in a subprocess, so
that this process's ``import cupy`` is untouched."""
import os
import subprocess
import sys
import textwrap

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin")

CHECKS = textwrap.dedent("""
    import threading
    import numpy as np
    import cupy as cp

    d = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    refused = []
    for name, f in [("np.asarray", lambda: np.asarray(d)), ("d + np", lambda: d + np.ones(3)),
                    ("np + d", lambda: np.ones(3) + d), ("np.exp", lambda: np.exp(d)),
                    ("np.sum", lambda: np.sum(d)), ("cp.add(d, np)", lambda: cp.add(d, np.ones(3))),
                    ("np.concatenate", lambda: np.concatenate([d, d])),
                    ("cp.stack([d, np])", lambda: cp.stack([d, np.ones((2, 3), np.float32)]))]:
        try:
            f()
        except TypeError:
            refused.append(name)
    print("refused", len(refused), refused)
    s = d.sum()
    print("reduction", type(s).__name__, s.shape, type(d[0, 0]).__name__)
    print("scalar_ops", type(np.float32(2) * d).__name__, type(2 * d).__name__)
    n0 = cp.standin.host_syncs()
    float(s); d.item; d[0, 0].item(); cp.asnumpy(d); d.get(); int(d[0, 1]); repr(d)
    cp.cuda.Stream.null.synchronize()
    print("syncs", cp.standin.host_syncs() - n0)
    pool = cp.get_default_memory_pool()
    base = pool.used_bytes()
    a = cp.empty(1000, dtype=cp.uint8)
    v = a[10:]                             # a view: no new bytes
    print("live", pool.used_bytes() - base)
    del a, v
    print("freed", pool.used_bytes() - base)
    seen = []
    with cp.cuda.Device(1):
        s1 = cp.cuda.Stream()
        with s1:
            t = threading.Thread(target=lambda: seen.append(
                (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr)))
            t.start(); t.join()
            mine = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr == s1.ptr)
    print("threads", seen[0], mine, cp.cuda.Device().id)
""")


def test_the_standin_refuses_numpy_counts_syncs_and_keeps_devices_per_thread():
    env = dict(os.environ, PYTHONPATH=STANDIN)
    run = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    out = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert out["refused"].startswith("8 "), out["refused"]
    assert out["reduction"] == "ndarray () ndarray"          # 0-d device arrays, as CuPy
    assert out["scalar_ops"] == "ndarray ndarray"
    assert out["syncs"] == "7"      # float, item, asnumpy, get, int, repr, synchronize
    assert out["live"] == "1000" and out["freed"] == "0"
    # a new thread starts on device 0 and the null stream, as in CuPy; the caller keeps its own
    assert out["threads"] == "(0, 0) (1, True) 0"
