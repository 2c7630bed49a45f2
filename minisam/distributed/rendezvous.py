"""A tiny TCP key-value store: how the processes of one job find each other.

NCCL needs every rank to call ``ncclCommInitRank`` with the same 128-byte unique id, made
by rank 0 (``ncclGetUniqueId``). NCCL does not say how to ship it; torchrun uses a TCP
store, MPI programs use ``MPI_Bcast``. Ours is the smallest store that does the job,
standard library only:

* rank 0 runs the server in a background thread on ``MASTER_ADDR:MASTER_PORT``;
* every rank (rank 0 included) talks to it through a client: ``set(key, bytes)``,
  ``get(key)`` (blocks until some rank has set the key), ``add(key, n)`` (an atomic
  counter) and ``barrier(name, world_size)`` built on the two.

Wire format, one request per message on a persistent connection (big-endian)::

    request : b"MSK1" | op (1 byte: S, G or A) | key length u32 | key utf-8
              | S: value length u64 | value   G: timeout f64   A: amount i64
    response: b"MSK1" | status (1 byte: 0 ok, 1 timed out) | payload length u64 | payload

The magic guards against talking to some other service on the same port. There is no
authentication: like torch's TCPStore, run it on a trusted network only.
"""
from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time

MAGIC = b"MSK1"
_OK, _TIMEOUT = 0, 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the rendezvous store closed the connection")
        buf += chunk
    return bytes(buf)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        store: _StoreServer = self.server  # type: ignore[assignment]
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = sock.recv(4, socket.MSG_WAITALL)
                if not head:
                    return                                 # client closed: done
                if head != MAGIC:
                    return                                 # a stranger: drop it
                op = _recv_exact(sock, 1)
                (klen,) = struct.unpack(">I", _recv_exact(sock, 4))
                key = _recv_exact(sock, klen).decode()
                if op == b"S":
                    (vlen,) = struct.unpack(">Q", _recv_exact(sock, 8))
                    value = _recv_exact(sock, vlen)
                    with store.cond:
                        store.data[key] = value
                        store.cond.notify_all()
                    status, payload = _OK, b""
                elif op == b"G":
                    (timeout,) = struct.unpack(">d", _recv_exact(sock, 8))
                    with store.cond:
                        found = store.cond.wait_for(lambda k=key: k in store.data, timeout)
                        payload = store.data.get(key, b"")
                    status = _OK if found else _TIMEOUT
                elif op == b"A":
                    (amount,) = struct.unpack(">q", _recv_exact(sock, 8))
                    with store.cond:
                        value = int(store.data.get(key, b"0")) + amount
                        store.data[key] = str(value).encode()
                        store.cond.notify_all()
                    status, payload = _OK, str(value).encode()
                else:
                    return
                sock.sendall(MAGIC + bytes([status]) + struct.pack(">Q", len(payload)) + payload)
        except (ConnectionError, OSError):
            return


class _StoreServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address):
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()
        super().__init__(address, _Handler)


def _bind_host(host: str) -> str:
    """Listen on loopback only when the job is local, else on every interface."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET)
        if infos and all(info[4][0].startswith("127.") for info in infos):
            return infos[0][4][0]
    except socket.gaierror:
        pass
    return "0.0.0.0"


class TCPStore:
    """Client of the rendezvous store at ``host:port``; with ``is_server`` it also serves it.

    ``timeout`` (seconds) bounds connecting and every blocking ``get``; a client retries the
    connection until then, so ranks may start in any order."""

    def __init__(self, host: str, port: int, is_server: bool = False, timeout: float = 300.0):
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self._server = None
        if is_server:
            try:
                self._server = _StoreServer((_bind_host(host), self.port))
            except OSError as e:
                raise RuntimeError(
                    f"rank 0 could not listen on port {self.port} for the rendezvous "
                    f"({e.strerror or e}); pick another MASTER_PORT") from e
            self.port = self._server.server_address[1]
            threading.Thread(target=self._server.serve_forever, args=(0.05,),
                             name="minisam-store", daemon=True).start()
        self._lock = threading.Lock()            # one request at a time per client
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as e:
                if time.monotonic() + delay > deadline:
                    raise TimeoutError(
                        f"could not reach the rendezvous store at {self.host}:{self.port} "
                        f"within {self.timeout:.0f}s ({e}); is rank 0 running, and are "
                        "MASTER_ADDR/MASTER_PORT the same on every rank?") from e
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _request(self, op: bytes, key: str, body: bytes, wait: float | None = None) -> bytes:
        k = key.encode()
        msg = MAGIC + op + struct.pack(">I", len(k)) + k + body
        with self._lock:
            self._sock.settimeout(None if wait is None else wait + 30.0)
            self._sock.sendall(msg)
            head = _recv_exact(self._sock, 4)
            if head != MAGIC:
                raise ConnectionError(f"{self.host}:{self.port} is not a minisam rendezvous "
                                      "store (wrong reply); pick another MASTER_PORT")
            status = _recv_exact(self._sock, 1)[0]
            (n,) = struct.unpack(">Q", _recv_exact(self._sock, 8))
            payload = _recv_exact(self._sock, n)
        if status == _TIMEOUT:
            raise TimeoutError(f"rendezvous: no rank set {key!r} within {wait:.0f}s; "
                               "did another rank fail to start?")
        return payload

    def set(self, key: str, value: bytes) -> None:
        self._request(b"S", key, struct.pack(">Q", len(value)) + bytes(value))

    def get(self, key: str, timeout: float | None = None) -> bytes:
        """The value of ``key``, waiting until a rank sets it (TimeoutError after ``timeout``)."""
        t = self.timeout if timeout is None else float(timeout)
        return self._request(b"G", key, struct.pack(">d", t), wait=t)

    def add(self, key: str, amount: int = 1) -> int:
        """Atomically add ``amount`` to the integer at ``key`` (0 if unset); return the sum."""
        return int(self._request(b"A", key, struct.pack(">q", int(amount))))

    def barrier(self, name: str, world_size: int, timeout: float | None = None) -> None:
        """Block until ``world_size`` callers have entered ``barrier(name, ...)``.

        A name is single-use; pass a fresh one (e.g. with a counter) for each barrier."""
        if self.add(f"barrier/{name}/count", 1) == world_size:
            self.set(f"barrier/{name}/open", b"1")
        self.get(f"barrier/{name}/open", timeout)

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
