"""gpu_check step b_pytest when pytest is missing: what tests/test_gpu.py (layers),
test_augment and test_loader check on the GPU (CuPy == NumPy), plus an in-process NcclComm
of world size 1. Reference cases, bench and the launcher are covered by steps c, d and e.

    python benchmarks/gpu_check/fallback_tests.py      exit 1 if any check fails"""
import sys
import traceback

import numpy as np


def both(make, x, train):
    """The layer's forward and backward on the CPU and on the GPU, from the same init."""
    from minisam.backend import to_device, to_numpy
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


def layer_check(make, train=True, dense=False):
    def f():
        x = np.random.default_rng(0).standard_normal((4, 8, 8, 6)).astype(np.float32)
        if dense:
            x = x[:, 0, 0, :]
        cpu, gpu = both(make, x, train)
        assert len(cpu) == len(gpu)
        for a, b in zip(cpu, gpu):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return f


def augment():
    import cupy as cp
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
    import cupy as cp
    from minisam.data import Augment, Dataset, Loader
    images = np.broadcast_to(np.arange(64, dtype=np.float32)[:, None, None, None],
                             (64, 6, 6, 3)).copy()
    ds = Dataset(images, np.arange(64) % 5, 5, "toy")
    aug = Augment(crop_pad=2, flip=True, cutout=3)
    cpu = Loader(ds, 16, seed=5, augment=aug, replicas=2)
    gpu = Loader(ds, 16, seed=5, augment=aug, replicas=2, device="gpu")
    for (xc, yc), (xg, yg) in zip(cpu.batch(1, 2), gpu.batch(1, 2)):
        assert isinstance(xg, cp.ndarray) and isinstance(yg, cp.ndarray)
        np.testing.assert_array_equal(cp.asnumpy(xg), xc)
        np.testing.assert_array_equal(cp.asnumpy(yg), yc)


def nccl_world_one():
    import cupy as cp
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


def checks():
    from minisam.nn import AvgPool, BatchNorm, Conv, Dense, GlobalAvgPool, ReLU, Shortcut
    rng = np.random.default_rng
    return [
        ("layer conv1 cupy == numpy", layer_check(lambda: Conv(6, 5, 3, 1, rng(1)))),
        ("layer conv2 cupy == numpy", layer_check(lambda: Conv(6, 5, 3, 2, rng(1)))),
        ("layer bn_train cupy == numpy", layer_check(lambda: BatchNorm(6))),
        ("layer bn_eval cupy == numpy", layer_check(lambda: BatchNorm(6), train=False)),
        ("layer relu cupy == numpy", layer_check(ReLU)),
        ("layer pool cupy == numpy", layer_check(lambda: AvgPool(2))),
        ("layer shortcut cupy == numpy", layer_check(lambda: Shortcut(2, 9))),
        ("layer gap cupy == numpy", layer_check(GlobalAvgPool)),
        ("layer dense cupy == numpy", layer_check(lambda: Dense(6, 3, rng(1)), dense=True)),
        ("augment gpu == cpu", augment),
        ("loader gpu == cpu", loader),
        ("NcclComm world size 1 in-process", nccl_world_one),
    ]


def main() -> int:
    passed = failed = 0
    for name, fn in checks():
        try:
            fn()
            passed += 1
            print(f"PASS {name}", flush=True)
        except Exception as e:  # noqa: BLE001 (report and go on)
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    print(f"fallback: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
