"""CuPy against NumPy on the same inputs: every layer, the SAM step, the reference cases.

Marked `gpu`; skipped cleanly where CuPy has no usable device."""
import os

import numpy as np
import pytest

from minisam.backend import gpu_available, to_device, to_numpy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="no usable CuPy GPU")]

ROOT = os.path.join(os.path.dirname(__file__), "..", "reference_results")


def _both(make_layer, x, train=True, seed=0):
    """Run forward/backward of the same layer on NumPy and on CuPy; return both results."""
    out = []
    for device in ("cpu", "gpu"):
        layer = make_layer()
        layer.params = {k: to_device(v, device) for k, v in layer.params.items()}
        layer.state = {k: to_device(v, device) for k, v in layer.state.items()}
        xd = to_device(x, device)
        y = layer.forward(xd, train)
        dy = to_device(np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype), device)
        dx = layer.backward(dy)
        out.append((to_numpy(y), to_numpy(dx), {k: to_numpy(v) for k, v in layer.grads.items()},
                    {k: to_numpy(v) for k, v in layer.state.items()}))
    return out


def _close(a, b, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["conv1", "conv2", "bn_train", "bn_eval", "relu", "pool",
                                  "shortcut", "gap", "dense"])
def test_layer_cupy_matches_numpy(name):
    from minisam.nn import AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, ReLU, Shortcut
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 6)).astype(np.float32)
    make, train = {
        "conv1": (lambda: Conv(6, 5, 3, 1, np.random.default_rng(1)), True),
        "conv2": (lambda: Conv(6, 5, 3, 2, np.random.default_rng(1)), True),
        "bn_train": (lambda: BatchNorm(6), True),
        "bn_eval": (lambda: BatchNorm(6), False),
        "relu": (ReLU, True),
        "pool": (lambda: AvgPool(2), True),
        "shortcut": (lambda: Shortcut(2, 9), True),
        "gap": (GlobalAvgPool, True),
        "dense": (lambda: Dense(6, 3, np.random.default_rng(1)), True),
    }[name]
    if name == "dense":
        x = x[:, 0, 0, :]
    cpu, gpu = _both(make, x, train)
    for a, b in zip(cpu, gpu):
        if isinstance(a, dict):
            for k in a:
                _close(a[k], b[k])
        else:
            _close(a, b)


def test_conv_on_the_gpu_rebuilds_its_cols_by_default():
    """On CuPy a Conv keeps only its input between forward and backward (nn.conv.KEEP_COLS:
    the kept im2col matrices would be most of the GPU's memory), with NumPy's values."""
    from minisam.nn import Conv
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
    cpu, gpu = _both(lambda: Conv(4, 4, 3, 1, np.random.default_rng(1)), x)
    for a, b in zip(cpu[:3], gpu[:3]):
        for k in (a if isinstance(a, dict) else {"": a}):
            _close(a[k] if k else a, b[k] if k else b)
    layer = Conv(4, 4, 3, 1, np.random.default_rng(1))
    layer.params = {k: to_device(v, "gpu") for k, v in layer.params.items()}
    layer.forward(to_device(x, "gpu"))
    assert layer.cols is None and layer.x is not None and "cols" not in layer._buffers


@pytest.mark.parametrize("case", ["wrn10x2_single", "wrn10x2_two_replicas",
                                  "wrn10x2_label_smoothing", "davda54_sam", "davda54_asam"])
def test_reference_case_on_gpu(case):
    from minisam.verify import verify
    rows, ties = verify(os.path.join(ROOT, case + ".npz"), device="gpu")
    assert all(r.ok for r in rows), [(r.group, r.max_rel) for r in rows if not r.ok]


def test_bench_runs_on_gpu():
    from minisam.bench import bench
    r = bench("wrn10_2", 8, "gpu", warmup=1, steps=2)
    assert r["sam_ms"] > 0 and r["peak_memory_mb"] > 0
