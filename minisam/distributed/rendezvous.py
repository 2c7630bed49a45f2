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

    request : b"MSK1" | op (1 byte: H, S, G or A) | key length u32 | key utf-8
              | S: value length u64 | value   G: timeout f64   A: amount i64
    response: b"MSK1" | status (1 byte: 0 ok, 1 timed out, 2 refused) | payload length u64
              | payload

The first request of a connection is the hello ``H`` whose key is the job's token
(``MINISAM_RDZV_TOKEN``, a random value the launcher gives every rank; with several nodes,
export the same one on each): the server refuses, with one line on its stderr, a client
without it, a request before it, a key over 1 KiB or a value over 16 MiB. The server
listens on the address it is given (loopback for a local job, IPv4 or IPv6), never on
every interface. Still, run it on a trusted network only, as torch's TCPStore.
"""
from __future__ import annotations

import hmac
import os
import socket
import socketserver
import struct
import sys
import threading
import time

MAGIC = b"MSK1"
_OK, _TIMEOUT, _REFUSED = 0, 1, 2
TOKEN_ENV = "MINISAM_RDZV_TOKEN"
MAX_KEY, MAX_VALUE = 1 << 10, 16 << 20


class _Refused(Exception):
    """A client broke the protocol: drop it, say why in one line."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    family, address = _listen_address(host)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _listen_address(host: str):
    """(family, address) the server binds: ``host`` itself, resolved; never a wildcard."""
    if host in ("", "0.0.0.0", "::", "*"):
        raise ValueError(f"MASTER_ADDR {host!r} is a wildcard; give the address of node 0 "
                         "that the other ranks reach (127.0.0.1 for one node): the store "
                         "listens on that address only")
    try:
        info = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"MASTER_ADDR {host!r} does not resolve ({e})") from None
    loop = [i for i in info if i[4][0].startswith("127.") or i[4][0] == "::1"]
    family, _, _, _, sockaddr = (loop or info)[0]
    return family, sockaddr[0]


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
        hello = False
        try:
            while True:
                head = sock.recv(4, socket.MSG_WAITALL)
                if not head:
                    return                                 # client closed: done
                if head != MAGIC:
                    raise _Refused("it does not speak the minisam store protocol")
                op = _recv_exact(sock, 1)
                (klen,) = struct.unpack(">I", _recv_exact(sock, 4))
                if klen > MAX_KEY:
                    raise _Refused(f"a key of {klen} bytes (at most {MAX_KEY})")
                key = _recv_exact(sock, klen).decode()
                if op == b"H":
                    if not hmac.compare_digest(key.encode(), store.token.encode()):
                        self._reply(_REFUSED, b"wrong token")
                        raise _Refused(f"a wrong token (every rank needs the same {TOKEN_ENV})")
                    hello, status, payload = True, _OK, b""
                elif not hello:
                    raise _Refused("a request before the hello")
                elif op == b"S":
                    (vlen,) = struct.unpack(">Q", _recv_exact(sock, 8))
                    if vlen > MAX_VALUE:
                        raise _Refused(f"a value of {vlen} bytes (at most {MAX_VALUE})")
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
                    raise _Refused(f"an unknown request {op!r}")
                self._reply(status, payload)
        except _Refused as e:
            print(f"minisam rendezvous: dropped a connection from {self.client_address[0]}: "
                  f"{e}", file=sys.stderr, flush=True)
        except (ConnectionError, OSError, ValueError, UnicodeDecodeError, OverflowError):
            return                                         # a client that went away

    def _reply(self, status: int, payload: bytes):
        self.request.sendall(MAGIC + bytes([status]) + struct.pack(">Q", len(payload)) + payload)


class _StoreServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, family, token: str):
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.token = token
        self.address_family = family
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):   # one line, never a traceback
        print(f"minisam rendezvous: dropped a connection from {client_address[0]}: "
              f"{sys.exc_info()[1]!r}", file=sys.stderr, flush=True)


class TCPStore:
    """Client of the rendezvous store at ``host:port``; with ``is_server`` it also serves it.

    ``timeout`` (seconds) bounds connecting and every blocking ``get``; a client retries the
    connection until then, so ranks may start in any order."""

    def __init__(self, host: str, port: int, is_server: bool = False, timeout: float = 300.0,
                 token: str | None = None):
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self.token = os.environ.get(TOKEN_ENV, "") if token is None else token
        self._server = None
        if is_server:
            family, address = _listen_address(host)
            try:
                self._server = _StoreServer((address, self.port), family, self.token)
            except OSError as e:
                raise RuntimeError(
                    f"rank 0 could not listen on port {self.port} for the rendezvous "
                    f"({e.strerror or e}); pick another MASTER_PORT") from e
            self.port = self._server.server_address[1]
            threading.Thread(target=self._server.serve_forever, args=(0.05,),
                             name="minisam-store", daemon=True).start()
        self._lock = threading.Lock()            # one request at a time per client
        self._sock = self._connect()
        self._request(b"H", self.token, b"", wait=0.0)   # the job's token first

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
        if len(k) > MAX_KEY:
            raise ValueError(f"rendezvous keys are at most {MAX_KEY} bytes, got {len(k)}")
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
        if status == _REFUSED:
            raise ConnectionError(f"the rendezvous store at {self.host}:{self.port} refused this "
                                  f"process's token: every rank needs the same {TOKEN_ENV} "
                                  "(the launcher sets it; with several nodes export one value "
                                  "on every node)")
        if status == _TIMEOUT:
            raise TimeoutError(f"rendezvous: no rank set {key!r} within {wait:.0f}s; "
                               "did another rank fail to start?")
        return payload

    def set(self, key: str, value: bytes) -> None:
        if len(value) > MAX_VALUE:
            raise ValueError(f"rendezvous values are at most {MAX_VALUE} bytes, got {len(value)}")
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
