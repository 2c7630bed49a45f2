"""Multi-process data parallelism: flat buffers, the rendezvous store, NcclComm, the launcher.

Everything but the GPU runs here on the CPU: NcclComm is driven through a stand-in for
``cupy.cuda.nccl`` that reduces NumPy buffers by pointer across threads, and the launcher
starts small Python scripts instead of ``python -m minisam``. The real NCCL runs in
``TestNcclOnGpu`` (marked ``gpu``, skipped without CuPy and a GPU).
"""
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from minisam.backend import gpu_available
from minisam.distributed import comm_from_env
from minisam.flat import flatten, plan_layout, unflatten
from minisam.distributed.launch import launch, main as launch_main
from minisam.distributed.local import LocalComm, run_replicas
from minisam.distributed.nccl import (NcclComm, _make_communicator, encode_unique_id,
                                      unique_id_candidates)
from minisam.distributed.rendezvous import TCPStore, free_port

REPO = Path(__file__).resolve().parents[1]


def tree(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {"conv/kernel": rng.standard_normal((3, 3, 2, 4)).astype(dtype),
            "bn/scale": rng.standard_normal(4).astype(dtype),
            "dense/kernel": rng.standard_normal((4, 5)).astype(dtype),
            "a_bias": rng.standard_normal(5).astype(dtype)}


# --------------------------------------------------------------------- flat buffers
def test_flatten_unflatten_round_trip_sorted_keys_and_views():
    t = tree()
    layout = plan_layout(t)
    assert layout.keys == sorted(t) and len(layout.buckets) == 1
    (flat,) = flatten(t, layout, np)
    assert flat.shape == (sum(v.size for v in t.values()),) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat[:5], t["a_bias"])          # sorted: a_bias first
    back = unflatten([flat], layout)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
        assert back[k].shape == t[k].shape and np.shares_memory(back[k], flat)
    # dict order does not change the packing
    t_rev = dict(reversed(list(t.items())))
    np.testing.assert_array_equal(flatten(t_rev, plan_layout(t_rev), np)[0], flat)


def test_flatten_into_preallocated_buffer_and_noncontiguous_input():
    t = tree()
    t["dense/kernel"] = np.asfortranarray(t["dense/kernel"])
    layout = plan_layout(t)
    out = [np.empty(b.size, b.dtype) for b in layout.buckets]
    flats = flatten(t, layout, np, out=out)
    assert flats[0] is out[0]
    np.testing.assert_array_equal(unflatten(flats, layout)["dense/kernel"], t["dense/kernel"])


def test_buckets_respect_size_and_never_split_an_array():
    t = {f"p{i:02d}": np.zeros(n, np.float32) for i, n in enumerate([10, 10, 30, 5, 5, 100, 1])}
    layout = plan_layout(t, bucket_bytes=25 * 4)
    sizes = [[s.size for s in b.slots] for b in layout.buckets]
    assert sizes == [[10, 10], [30], [5, 5], [100], [1]]
    assert all(b.nbytes <= 25 * 4 or len(b.slots) == 1 for b in layout.buckets)
    assert layout.keys == sorted(t)
    flats = flatten(t, layout, np)
    assert [f.size for f in flats] == [20, 30, 10, 100, 1]
    assert plan_layout(t, bucket_bytes=0).buckets == plan_layout(t).buckets


def test_buckets_group_dtypes():
    t = dict(tree(dtype=np.float32), **{"z64": np.arange(3.0), "b64": np.ones(2)})
    layout = plan_layout(t)
    assert [str(b.dtype) for b in layout.buckets] == ["float32", "float64"]
    assert [s.key for s in layout.buckets[1].slots] == ["b64", "z64"]
    back = unflatten(flatten(t, layout, np), layout)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
        assert back[k].dtype == t[k].dtype
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_layout(t, -1)


def test_layout_digest_sees_keys_and_shapes():
    a = plan_layout(tree())
    assert a.digest() == plan_layout(tree(seed=5)).digest()          # values do not matter
    t = tree()
    t["bn/scale"] = np.zeros(5, np.float32)
    assert plan_layout(t).digest() != a.digest()
    t = tree()
    t["bn/bias"] = t.pop("bn/scale")
    assert plan_layout(t).digest() != a.digest()


# --------------------------------------------------------------------- unique id
def test_unique_id_wire_format_and_cupy_forms():
    raw = bytes(range(256))[::2]                      # 128 bytes, half of them > 127
    signed = tuple(b - 256 if b > 127 else b for b in raw)   # CuPy <= 13 on x86
    assert encode_unique_id(signed) == raw
    assert encode_unique_id(raw) == raw                # CuPy >= 14
    assert encode_unique_id(tuple(raw)) == raw         # CuPy <= 13 on ARM
    assert unique_id_candidates(raw) == [raw, signed, tuple(raw)]
    with pytest.raises(ValueError, match="128"):
        encode_unique_id(b"short")


@pytest.mark.parametrize("wants", ["bytes", "signed", "unsigned"])
def test_make_communicator_finds_the_form_this_cupy_takes(wants):
    raw = bytes(range(128, 256))

    class Nccl:
        @staticmethod
        def NcclCommunicator(ndev, uid, rank):
            if wants == "bytes" and not isinstance(uid, bytes):
                raise TypeError("expected bytes")
            if wants != "bytes" and not isinstance(uid, tuple):
                raise TypeError("expected tuple")
            lo, hi = (-128, 127) if wants == "signed" else (0, 255)
            if wants != "bytes" and not all(lo <= v <= hi for v in uid):
                raise OverflowError("value too large to convert to char")
            return (ndev, encode_unique_id(uid), rank)

    assert _make_communicator(Nccl, 4, raw, 2) == (4, raw, 2)


# --------------------------------------------------------------------- rendezvous store
def test_store_set_get_add_barrier_between_threads():
    port = free_port()
    server = TCPStore("127.0.0.1", port, is_server=True, timeout=10)
    got, errors = {}, []

    def client(r):
        try:
            with TCPStore("127.0.0.1", port, timeout=10) as s:
                got[r] = s.get("uid")                  # blocks until rank 0 sets it
                s.add("count", 1)
                s.barrier("b0", 3)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    uid = os.urandom(128)
    server.set("uid", uid)
    server.barrier("b0", 3)
    for t in threads:
        t.join(10)
    server_count = server.add("count", 0)
    server.close()
    assert not errors and got == {1: uid, 2: uid} and server_count == 2


def test_store_get_times_out_with_a_clear_message():
    with TCPStore("127.0.0.1", free_port(), is_server=True, timeout=5) as s:
        with pytest.raises(TimeoutError, match="no rank set 'never'"):
            s.get("never", timeout=0.2)
        s.set("k", b"")                            # empty values are fine
        assert s.get("k") == b""


def test_store_client_waits_for_a_late_server_and_fails_clearly_without_one():
    port = free_port()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("c", TCPStore("127.0.0.1", port,
                                                                      timeout=10)))
    t.start()
    time.sleep(0.3)                                # the client is retrying meanwhile
    server = TCPStore("127.0.0.1", port, is_server=True, timeout=10)
    t.join(10)
    server.set("x", b"1")
    assert box["c"].get("x") == b"1"
    box["c"].close()
    server.close()
    with pytest.raises(TimeoutError, match="could not reach the rendezvous store"):
        TCPStore("127.0.0.1", free_port(), timeout=0.3)


def test_store_rejects_a_port_that_is_not_a_store():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]

        def answer():
            conn, _ = srv.accept()
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()
        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(ConnectionError, match="not a minisam rendezvous store"):
            TCPStore("127.0.0.1", port, timeout=5)      # the hello is the first request


def test_store_server_port_in_use_is_a_clear_error():
    with TCPStore("127.0.0.1", free_port(), is_server=True, timeout=5) as s:
        with pytest.raises(RuntimeError, match="MASTER_PORT"):
            TCPStore("127.0.0.1", s.port, is_server=True, timeout=5)


STORE_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from minisam.distributed.rendezvous import TCPStore
    rank, world, port = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = TCPStore("127.0.0.1", port, is_server=(rank == 0), timeout=20)
    if rank == 0:
        store.set("nccl/unique_id", bytes(range(256))[::2])
    uid = store.get("nccl/unique_id")
    store.barrier("done", world)
    sys.stdout.write(uid.hex())
    sys.stdout.flush()
    store.barrier("exit", world)   # rank 0 keeps serving until everyone has its answer
    store.close()
""")


def test_store_exchanges_a_unique_id_between_three_processes(tmp_path):
    script = tmp_path / "store_child.py"
    script.write_text(STORE_CHILD)
    port = free_port()
    # start the clients first: they must wait for rank 0's server
    procs = [subprocess.Popen([sys.executable, str(script), str(REPO), str(r), "3", str(port)],
                              stdout=subprocess.PIPE) for r in (2, 1, 0)]
    outs = [p.communicate(timeout=60)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outs == [bytes(range(256))[::2].hex()] * 3


# --------------------------------------------------------------------- NcclComm, NCCL stand-in
class FakeNccl:
    """Enough of ``cupy.cuda.nccl`` to run NcclComm on NumPy buffers in threads of one process.

    Collectives read and write the buffers by address, as NCCL does with device pointers."""
    NCCL_SUM = 0
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
    available = True
    _dtypes = {6: np.float16, 7: np.float32, 8: np.float64}

    def __init__(self, uid_style="signed"):
        self.uid_style, self.groups, self.lock = uid_style, {}, threading.Lock()
        self.calls = []

    def get_unique_id(self):
        raw = os.urandom(128)
        return raw if self.uid_style == "bytes" else tuple(b - 256 if b > 127 else b for b in raw)

    def NcclCommunicator(self, ndev, uid, rank):
        if self.uid_style == "bytes" and not isinstance(uid, bytes):
            raise TypeError("bytes expected")
        if self.uid_style == "signed":
            if not isinstance(uid, tuple):
                raise TypeError("tuple expected")
            if any(v > 127 for v in uid):
                raise OverflowError("char")
        with self.lock:
            group = self.groups.setdefault(encode_unique_id(uid), _FakeGroup(ndev))
        group.barrier.wait(timeout=20)                 # ncclCommInitRank waits for all ranks
        return _FakeComm(self, group, rank)


class _FakeGroup:
    def __init__(self, n):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n


class _FakeComm:
    def __init__(self, nccl, group, rank):
        self.nccl, self.group, self.rank = nccl, group, rank

    def _view(self, ptr, count, dtype):
        dt = np.dtype(FakeNccl._dtypes[dtype])
        buf = (ctypes.c_char * (count * dt.itemsize)).from_address(ptr)
        return np.frombuffer(buf, dtype=dt)

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        assert op == FakeNccl.NCCL_SUM and isinstance(stream, int)
        g = self.group
        if self.rank == 0:
            self.nccl.calls.append(("allReduce", count, datatype))
        g.slots[self.rank] = self._view(sendbuf, count, datatype).copy()
        g.barrier.wait(timeout=20)
        total = g.slots[0].copy()
        for s in g.slots[1:]:
            total += s
        g.barrier.wait(timeout=20)
        self._view(recvbuf, count, datatype)[:] = total

    def bcast(self, buff, count, datatype, root, stream):
        g = self.group
        if self.rank == root:
            g.slots[root] = self._view(buff, count, datatype).copy()
        g.barrier.wait(timeout=20)
        self._view(buff, count, datatype)[:] = g.slots[root]
        g.barrier.wait(timeout=20)

    def destroy(self):
        pass


def run_nccl_ranks(size, fn, nccl=None, **kwargs):
    """Run ``fn(rank, NcclComm)`` in ``size`` threads on one FakeNccl; results by rank."""
    nccl = nccl or FakeNccl()
    port = free_port()
    results, errors = [None] * size, [None] * size

    def target(r):
        comm = None
        try:
            comm = NcclComm(r, size, r, "127.0.0.1", port, nccl=nccl, xp=np, timeout=20, **kwargs)
            results[r] = fn(r, comm)
        except BaseException as e:  # noqa: BLE001
            errors[r] = e
        finally:
            if comm is not None:
                comm.barrier() if errors[r] is None else None
                comm.close()

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results, errors


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("uid_style", ["signed", "bytes"])
def test_nccl_comm_allreduce_mean_matches_numpy(size, uid_style):
    trees = [tree(seed=r) for r in range(size)]

    def fn(r, comm):
        assert (comm.rank, comm.size, comm.local_rank) == (r, size, r)
        return comm.allreduce_mean(trees[r])

    results, errors = run_nccl_ranks(size, fn, nccl=FakeNccl(uid_style))
    assert errors == [None] * size
    for k in trees[0]:
        expected = sum(t[k] for t in trees) / size
        for out in results:
            np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-7)
            assert out[k].dtype == np.float32 and out[k].shape == trees[0][k].shape
    for out in results:
        assert list(out) == list(trees[0])              # the caller's key order
    np.testing.assert_array_equal(results[0]["conv/kernel"], results[-1]["conv/kernel"])


def test_nccl_comm_one_call_per_bucket_results_survive_later_calls():
    nccl = FakeNccl()
    t0, t1 = tree(0), tree(1)
    big = dict(t0, zz_big=np.ones(1000, np.float32))   # sorted last

    def fn(r, comm):
        first = comm.allreduce_mean(t0 if r == 0 else t1)
        again = comm.allreduce_mean(t1 if r == 0 else t0)      # same layout, reused buffer
        n_before = len(nccl.calls)
        comm.allreduce_mean(big)
        return first, again, len(nccl.calls) - n_before

    results, errors = run_nccl_ranks(2, fn, nccl=nccl, bucket_mb=1000 * 4 / 2**20)
    assert errors == [None, None]
    (first, again, n_calls), _ = results
    for k in t0:
        np.testing.assert_allclose(first[k], (t0[k] + t1[k]) / 2, rtol=1e-6)
        np.testing.assert_allclose(again[k], first[k], rtol=1e-6)
    # layout check (1 call, first use of this layout) + 2 buckets: the 1000-element
    # array alone, and the small arrays together
    assert n_calls == 3
    sizes = [c[1] for c in nccl.calls if c[2] == FakeNccl.NCCL_FLOAT32]
    assert sizes[:2] == [sum(v.size for v in t0.values())] * 2   # one call per tree


def test_nccl_comm_broadcast_and_mixed_dtypes():
    trees = [dict(tree(seed=r), step=np.array([float(r)])) for r in range(3)]

    def fn(r, comm):
        return comm.broadcast(trees[r], root=1), comm.allreduce_mean(trees[r])

    results, errors = run_nccl_ranks(3, fn)
    assert errors == [None] * 3
    for bc, mean in results:
        for k in trees[1]:
            np.testing.assert_array_equal(bc[k], trees[1][k])
        assert mean["step"].dtype == np.float64 and mean["step"][0] == 1.0


def test_nccl_comm_averages_scalar_metrics():
    def fn(r, comm):
        return comm.allreduce_mean({"loss": float(r), "error": np.float32(r / 4),
                                    "norm": np.array(2.0 * r, np.float32)})

    results, errors = run_nccl_ranks(2, fn)
    assert errors == [None, None]
    for out in results:
        assert float(out["loss"]) == 0.5 and float(out["error"]) == 0.125
        assert float(out["norm"]) == 1.0 and out["norm"].dtype == np.float32


def test_nccl_comm_detects_ranks_with_different_trees():
    def fn(r, comm):
        t = tree()
        if r == 1:
            t["bn/scale"] = np.zeros(7, np.float32)
        return comm.allreduce_mean(t)

    _, errors = run_nccl_ranks(2, fn)
    assert all(isinstance(e, ValueError) and "different trees" in str(e) for e in errors)


def test_nccl_comm_rejects_integer_arrays():
    _, errors = run_nccl_ranks(1, lambda r, comm: comm.allreduce_mean({"n": np.arange(3)}))
    assert isinstance(errors[0], TypeError) and "float" in str(errors[0])


def test_nccl_comm_runs_the_sam_step_like_thread_replicas():
    from minisam.models import WideResnet
    from minisam.optim import nesterov_init
    from minisam.sam import SAMConfig, train_step

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    cfg = SAMConfig(rho=0.05)

    def replica(r, comm):
        model = WideResnet(1, 1, 4, seed=0)
        p, s = model.get_params(), model.get_state()
        p = comm.broadcast(p)
        xs, ys = x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]
        p, s, _, _ = train_step(model, p, s, nesterov_init(p), xs, ys, 0.1, cfg, comm)
        return p

    threads = run_replicas(2, replica)
    nccl, errors = run_nccl_ranks(2, replica)
    assert errors == [None, None]
    for k in threads[0]:
        np.testing.assert_allclose(nccl[0][k], threads[0][k], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(nccl[0][k], nccl[1][k])


class FakeCupy:
    """NumPy plus the bits of ``cupy.cuda`` NcclComm touches: device count and choice, streams."""

    def __init__(self, n_gpus):
        import types
        self.used, self.synced = [], []
        fake = self

        class Stream:
            def __init__(self, ptr):
                self.ptr = ptr

            def synchronize(self):
                fake.synced.append(self.ptr)

        class Device:
            def __init__(self, i):
                self.i = i

            def use(self):
                fake.used.append(self.i)

        self.current = Stream(0)
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: n_gpus), Device=Device,
            get_current_stream=lambda: fake.current, Stream=Stream)

    def __getattr__(self, name):
        return getattr(np, name)


def test_nccl_comm_device_choice_and_stream_switch(monkeypatch):
    monkeypatch.delenv("NCCL_MULTI_RANK_GPU_ENABLE", raising=False)
    xp = FakeCupy(n_gpus=1)
    with pytest.raises(ValueError, match="wants GPU 1 but 1 GPU"):
        NcclComm(0, 2, 1, "127.0.0.1", free_port(), nccl=FakeNccl(), xp=xp)
    monkeypatch.setenv("NCCL_MULTI_RANK_GPU_ENABLE", "1")
    xp = FakeCupy(n_gpus=2)
    with NcclComm(0, 1, 3, "127.0.0.1", free_port(), nccl=FakeNccl(), xp=xp) as comm:
        assert comm.device_id == 1 and xp.used == [1]            # 3 % 2: shared GPUs
        xp.current = xp.cuda.Stream(0)
        comm._stream_ptr()
        xp.current = xp.cuda.Stream(7)                            # the caller switched streams
        assert comm._stream_ptr() == 7 and xp.synced == [0]       # the old one was drained
        assert comm._stream_ptr() == 7 and xp.synced == [0]


def test_nccl_comm_drains_a_switched_from_stream_before_refilling_its_send_buffer(monkeypatch):
    """The packed send buffers are kept from call to call and NCCL may still be reading them
    on the previous call's stream: after a stream switch, that stream is drained first."""
    import minisam.distributed.nccl as nccl_mod
    events = []
    flatten_ = nccl_mod.flatten
    monkeypatch.setattr(nccl_mod, "flatten",
                        lambda *a, **k: events.append("fill send buffer") or flatten_(*a, **k))
    xp = FakeCupy(n_gpus=1)
    streams = [xp.cuda.Stream(0), xp.cuda.Stream(7)]
    for s in streams:
        s.synchronize = (lambda p: lambda: events.append(f"drain stream {p}"))(s.ptr)
    with NcclComm(0, 1, 0, "127.0.0.1", free_port(), nccl=FakeNccl(), xp=xp) as comm:
        assert comm.device == "gpu"                 # its arrays are CuPy's (here: pretend)
        for s in streams:
            xp.current = s
            out = comm.allreduce_mean(tree())
        assert events == ["fill send buffer", "drain stream 0", "fill send buffer"]
    np.testing.assert_array_equal(out["bn/scale"], tree()["bn/scale"])


def test_comm_from_env():
    assert isinstance(comm_from_env(env={}), LocalComm)
    assert isinstance(comm_from_env(env={"WORLD_SIZE": "1"}), LocalComm)
    with pytest.raises(ValueError, match="runs on GPUs"):
        comm_from_env("cpu", env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="NCCL was turned off"):
        comm_from_env(nccl=False, env={"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        comm_from_env(env={"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK is not set"):
        NcclComm.from_env({"WORLD_SIZE": "2"}, nccl=FakeNccl(), xp=np)


def test_local_and_thread_comms_broadcast():
    t = tree()
    assert LocalComm().broadcast(t) is t
    out = run_replicas(2, lambda r, comm: comm.broadcast(tree(seed=r), root=1))
    for o in out:
        for k in t:
            np.testing.assert_array_equal(o[k], tree(seed=1)[k])


# --------------------------------------------------------------------- launcher
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def on_signal(signum, frame):
        tmp = os.path.join(out, f"signal{rank}.tmp")
        with open(tmp, "w") as f:
            f.write(signal.Signals(signum).name)
        os.replace(tmp, os.path.join(out, f"signal{rank}"))   # readers never see it half-made
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_signal)
    keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "MINISAM_QUIET", "MINISAM_LAUNCHED",
            "MINISAM_RDZV_TOKEN"]
    info = {k: os.environ.get(k) for k in keys}
    info["pid"] = os.getpid()
    info["argv"] = sys.argv[3:]
    tmp = os.path.join(out, f"rank{rank}.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))
    if mode == "ok":
        sys.exit(0)
    if mode in ("fail", "stubborn") and rank == 1:
        while len([n for n in os.listdir(out) if n.endswith(".json")]) < world:
            time.sleep(0.01)                  # everyone is up and has its handlers
        sys.exit(3)
    time.sleep(60)
""")


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "out"
    out.mkdir()
    return [sys.executable, str(script), str(out)], out


def ranks_info(out):
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def test_launch_sets_the_environment_of_every_rank(child, capsys):
    cmd, out = child
    assert launch(3, ["ok", "--extra", "arg"], child_cmd=cmd) == 0
    info = ranks_info(out)
    assert sorted(info) == [0, 1, 2]
    ports = {i["MASTER_PORT"] for i in info.values()}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for r, i in info.items():
        assert (i["RANK"], i["WORLD_SIZE"], i["LOCAL_RANK"]) == (str(r), "3", str(r))
        assert (i["LOCAL_WORLD_SIZE"], i["NODE_RANK"], i["MASTER_ADDR"]) == ("3", "0", "127.0.0.1")
        assert i["MINISAM_QUIET"] is None      # rank 0 decides; no variable silences a rank
        assert i["MINISAM_LAUNCHED"] == "1" and i["argv"] == ["--extra", "arg"]
    tokens = {i["MINISAM_RDZV_TOKEN"] for i in info.values()}
    assert len(tokens) == 1 and len(tokens.pop()) == 32      # one random token for the job
    assert capsys.readouterr().err == ""


def test_launch_second_node_ranks(child):
    cmd, out = child
    with pytest.raises(ValueError, match="export the same MINISAM_RDZV_TOKEN on every node"):
        launch(2, ["ok"], nnodes=2, node_rank=1, master_port=29999, child_cmd=cmd,
               env={k: v for k, v in os.environ.items() if k != "MINISAM_RDZV_TOKEN"})
    env = dict(os.environ, MINISAM_RDZV_TOKEN="shared-by-both-nodes")
    assert launch(2, ["ok"], nnodes=2, node_rank=1, master_addr="127.0.0.1",
                  master_port=29999, child_cmd=cmd, env=env) == 0
    info = ranks_info(out)
    assert sorted(info) == [2, 3]
    for r, i in info.items():
        assert (i["WORLD_SIZE"], i["LOCAL_RANK"], i["NODE_RANK"]) == ("4", str(r - 2), "1")
        assert i["MASTER_PORT"] == "29999" and i["MINISAM_QUIET"] is None
        assert i["MINISAM_RDZV_TOKEN"] == "shared-by-both-nodes"


def test_launch_stops_everyone_when_one_rank_fails(child, capsys):
    cmd, out = child
    t0 = time.monotonic()
    code = launch(3, ["fail"], child_cmd=cmd, grace=20)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 3
    assert elapsed < 10, f"the sleeping ranks were not stopped promptly ({elapsed:.1f}s)"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "rank 1" in lines[0] and "exited with code 3" in lines[0]
    for r in (0, 2):                               # terminated via SIGTERM, not by the grace kill
        assert (out / f"signal{r}").read_text() == "SIGTERM"
    for i in ranks_info(out).values():
        with pytest.raises(ProcessLookupError):
            os.kill(i["pid"], 0)


def test_launch_kills_ranks_that_ignore_sigterm_after_the_grace_period(child, capsys):
    cmd, out = child
    t0 = time.monotonic()
    assert launch(2, ["stubborn"], child_cmd=cmd, grace=0.5) == 3
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "rank 1" in err and "exited with code 3" in err and "SIGKILL" in err
    assert not (out / "signal0").exists()


def test_launch_cli(child, capsys):
    cmd, out = child
    assert launch_main(["--nproc", "2", "--raw", "--"] + cmd + ["ok"]) == 0
    assert sorted(ranks_info(out)) == [0, 1]
    with pytest.raises(SystemExit) as e:
        launch_main(["--nproc", "2"])
    assert e.value.code == 2 and "nothing to run" in capsys.readouterr().err
    assert launch_main(["--nproc", "0", "--", "train"]) == 2
    assert "nproc must be" in capsys.readouterr().err
    assert launch_main(["--nproc", "1", "--nnodes", "2", "--", "train"]) == 2
    assert "master-port" in capsys.readouterr().err


def test_launch_refuses_to_nest_and_validates(child):
    cmd, _ = child
    with pytest.raises(RuntimeError, match="launched rank"):
        launch(2, ["ok"], child_cmd=cmd, env=dict(os.environ, MINISAM_LAUNCHED="1"))
    with pytest.raises(ValueError, match="node_rank"):
        launch(2, ["ok"], nnodes=2, node_rank=2, master_port=1234, child_cmd=cmd)


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_launcher_forwards_sigint_to_every_rank(child):
    cmd, out = child
    env = dict(os.environ, PYTHONPATH=str(REPO))
    launcher = subprocess.Popen([sys.executable, "-m", "minisam.launch", "--nproc", "2",
                                 "--raw", "--"] + cmd + ["sleep"], env=env,
                                stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(ranks_info(out)) == 2)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=20)
    assert launcher.returncode == 130
    assert "got SIGINT; forwarding it to 2 rank(s)" in err
    assert all((out / f"signal{r}").read_text() == "SIGINT" for r in (0, 1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_ranks_do_not_outlive_a_killed_launcher(child):
    cmd, out = child
    env = dict(os.environ, PYTHONPATH=str(REPO))
    launcher = subprocess.Popen([sys.executable, "-m", "minisam.launch", "--nproc", "2",
                                 "--raw", "--"] + cmd + ["sleep"], env=env)
    wait_for(lambda: len(ranks_info(out)) == 2)
    launcher.kill()
    launcher.wait()
    wait_for(lambda: all((out / f"signal{r}").exists() for r in (0, 1)))
    assert (out / "signal0").read_text() == "SIGTERM"


# --------------------------------------------------------------------- real NCCL on a GPU
def _nccl_version():
    try:
        from cupy.cuda import nccl
        return nccl.get_version() if nccl.available else 0
    except Exception:  # noqa: BLE001
        return 0


GPU_CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import cupy as cp
    from minisam.distributed.nccl import NcclComm
    comm = NcclComm.from_env(timeout=60)
    rng = np.random.default_rng(comm.rank)
    host = {"w": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal(7).astype(np.float32)}
    mean = comm.allreduce_mean({k: cp.asarray(v) for k, v in host.items()})
    bc = comm.broadcast({k: cp.asarray(v) for k, v in host.items()}, root=comm.size - 1)
    comm.barrier()
    np.savez(os.path.join(sys.argv[2], f"rank{comm.rank}.npz"),
             **{"mean/" + k: cp.asnumpy(v) for k, v in mean.items()},
             **{"bc/" + k: cp.asnumpy(v) for k, v in bc.items()})
    comm.close()
""")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")
class TestNcclOnGpu:
    def test_world_size_one_in_process(self):
        if not _nccl_version():
            pytest.skip("CuPy has no NCCL")
        import cupy as cp
        t = tree()
        with NcclComm(0, 1, 0, "127.0.0.1", free_port(), timeout=30) as comm:
            out = comm.allreduce_mean({k: cp.asarray(v) for k, v in t.items()})
            bc = comm.broadcast({k: cp.asarray(v) for k, v in t.items()})
            comm.barrier()
        for k in t:
            np.testing.assert_array_equal(cp.asnumpy(out[k]), t[k])
            np.testing.assert_array_equal(cp.asnumpy(bc[k]), t[k])

    @pytest.mark.parametrize("nproc", [1, 2])
    def test_processes_through_the_launcher(self, tmp_path, nproc):
        import cupy as cp
        version = _nccl_version()
        if not version:
            pytest.skip("CuPy has no NCCL")
        env = dict(os.environ)
        if nproc > cp.cuda.runtime.getDeviceCount():
            if version < 23000:
                pytest.skip(f"{nproc} ranks on fewer GPUs need NCCL >= 2.30 "
                            f"(NCCL_MULTI_RANK_GPU_ENABLE); this is {version}")
            env["NCCL_MULTI_RANK_GPU_ENABLE"] = "1"
        script = tmp_path / "gpu_child.py"
        script.write_text(GPU_CHILD)
        code = launch(nproc, [str(REPO), str(tmp_path)], child_cmd=[sys.executable, str(script)],
                      env=env, grace=5)
        assert code == 0
        outs = [np.load(tmp_path / f"rank{r}.npz") for r in range(nproc)]
        hosts = []
        for r in range(nproc):
            rng = np.random.default_rng(r)
            hosts.append({"w": rng.standard_normal((3, 5)).astype(np.float32),
                          "b": rng.standard_normal(7).astype(np.float32)})
        for k in ("w", "b"):
            expected = sum(h[k] for h in hosts) / nproc
            for o in outs:
                np.testing.assert_allclose(o["mean/" + k], expected, rtol=1e-6, atol=1e-6)
                np.testing.assert_array_equal(o["bc/" + k], hosts[-1][k])


# --------------------------------------------------------------------- benchmarks/allreduce.py
def test_allreduce_benchmark_estimate_and_no_gpu_message():
    script = str(REPO / "benchmarks" / "allreduce.py")
    run = subprocess.run([sys.executable, script, "--estimate", "--models", "wrn16_8",
                          "--gpus", "1", "4", "--bus-gbps", "100", "--latency-us", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["kind"].startswith("ESTIMATE")
    one, four = report["rows"]
    assert one["params"] == 10_795_482 and one["bytes"] == 4 * 10_795_482
    assert one["allreduce_ms_per_call"] == 0.0
    assert four["allreduce_ms_per_call"] == pytest.approx(1.5 * 4 * 10_795_482 / 100e9 * 1e3,
                                                          abs=1e-4)
    if not gpu_available():
        run = subprocess.run([sys.executable, script], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 1 and "no usable CuPy GPU" in run.stderr and not run.stdout


# --------------------------------------------------------------------- the store's defences
def test_store_listens_on_the_given_address_never_on_every_interface():
    with TCPStore("localhost", free_port(), is_server=True, timeout=5) as s:
        assert s._server.server_address[0] in ("127.0.0.1", "::1")
    with pytest.raises(ValueError, match="wildcard"):
        TCPStore("0.0.0.0", free_port(), is_server=True, timeout=5)
    if socket.has_ipv6:
        try:
            port = free_port("::1")
        except OSError:
            pytest.skip("no IPv6 loopback here")
        with TCPStore("::1", port, is_server=True, timeout=5) as s:
            assert s._server.server_address[0] == "::1"
            s.set("k", b"v")
            with TCPStore("::1", port, timeout=5) as c:
                assert c.get("k") == b"v"


def test_store_refuses_a_wrong_token_and_oversized_requests_in_one_line(capfd):
    port = free_port()
    with TCPStore("127.0.0.1", port, is_server=True, timeout=5, token="right") as server:
        with pytest.raises(ConnectionError, match="refused this process's token"):
            TCPStore("127.0.0.1", port, timeout=5, token="wrong")
        with TCPStore("127.0.0.1", port, timeout=5, token="right") as c:
            with pytest.raises(ValueError, match="at most 1024 bytes"):
                c.set("k" * 2000, b"v")
            with pytest.raises(ValueError, match="at most 16777216 bytes"):
                c.set("k", b"\0" * (16 << 20 | 1))
        # a raw client that skips the hello, then one that claims a terabyte value
        for payload in (b"MSK1S" + struct.pack(">I", 1) + b"k" + struct.pack(">Q", 1) + b"v",
                        b"MSK1H" + struct.pack(">I", 5) + b"right" +
                        b"MSK1S" + struct.pack(">I", 1) + b"k" + struct.pack(">Q", 1 << 40)):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(payload)
                raw.settimeout(5)
                while raw.recv(100):      # the server answers the hello, then hangs up
                    pass
        server.set("still", b"serving")
        assert server.get("still") == b"serving"
    err = capfd.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err and len(lines) == 3, err
    assert "a wrong token" in lines[0] and "before the hello" in lines[1]
    assert "a value of 1099511627776 bytes" in lines[2]


def test_nccl_comm_reduces_a_flat_tree_in_its_own_buffer_without_packing(monkeypatch):
    import minisam.distributed.nccl as nccl_mod
    from minisam.tree import FlatTree, flat_tree

    trees = [tree(seed=r) for r in range(2)]
    plain, errors = run_nccl_ranks(2, lambda r, comm: comm.allreduce_mean(trees[r]))
    assert errors == [None, None]

    def no_packing(*a, **k):
        raise AssertionError("a FlatTree was packed again")
    monkeypatch.setattr(nccl_mod, "flatten", no_packing)
    flat, errors = run_nccl_ranks(2, lambda r, comm: comm.allreduce_mean(flat_tree(trees[r])))
    assert errors == [None, None]
    for r in range(2):
        assert isinstance(flat[r], FlatTree) and list(flat[r]) == list(trees[0])
        for k in trees[0]:
            np.testing.assert_array_equal(flat[r][k], plain[r][k])
