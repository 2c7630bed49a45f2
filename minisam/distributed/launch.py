"""Start one process per GPU: ``python -m minisam.launch --nproc N -- <minisam args>``.

Each child runs ``python -m minisam <args>`` with the variables of ``distributed.env``
set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT,
MINISAM_LAUNCHED), which ``distributed.comm_from_env()`` reads to build an ``NcclComm``.
Only global rank 0 shows a progress bar and writes files; the trainer decides that from
its communicator's rank.

One node, 4 GPUs:        python -m minisam.launch --nproc 4 -- train --dataset cifar10 ...
Two nodes, 8 GPUs each:  on node 0 and node 1 (same command, --node-rank 0 and 1):
    python -m minisam.launch --nproc 8 --nnodes 2 --node-rank K \\
        --master-addr NODE0_IP --master-port 29500 -- train ...

Supervision: the children run in their own process groups; the launcher forwards
SIGINT and SIGTERM to them (so Ctrl-C reaches each rank once). When a rank exits with
a non-zero code, the launcher prints one line naming it, sends SIGTERM to the other
ranks, SIGKILLs whatever is left after ``--grace`` seconds, and exits non-zero. Ranks
on *other* nodes are not told: they block in their next NCCL call until the job
scheduler (or you) ends them. On Linux the children also get SIGTERM if the launcher
itself dies (``PR_SET_PDEATHSIG``), so they cannot outlive it.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from . import env as envvars
from .rendezvous import TOKEN_ENV, free_port


def _pdeathsig_preexec():
    """A preexec_fn asking Linux to SIGTERM the child when the launcher dies (else None)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def preexec():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    return preexec


def _exit_code(returncode: int) -> int:
    """A child's return code as a shell exit code (killed by signal s -> 128 + s)."""
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


def _signal_group(proc: subprocess.Popen, sig: int):
    try:
        os.killpg(proc.pid, sig)       # the child leads its own process group
    except (ProcessLookupError, PermissionError):
        pass


def launch(nproc: int, argv: Sequence[str], *, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None,
           child_cmd: Sequence[str] | None = None, env: dict | None = None,
           grace: float = 10.0, log=None) -> int:
    """Run ``nproc`` ranks of ``child_cmd + argv`` on this node; return the job's exit code.

    ``child_cmd`` defaults to ``[sys.executable, "-m", "minisam"]``, so ``argv`` is a minisam
    command line such as ``["train", "--dataset", "cifar10"]``. ``master_port=None`` picks a
    free port (one node only; several nodes must agree on one). ``env`` is the base
    environment (default ``os.environ``). Returns 0 when every rank exits 0; otherwise the
    first failing rank's code (128 + signal if it was killed), or 128 + signal when the
    launcher itself was interrupted. Messages go to ``log`` (default stderr), one line each.
    """
    log = sys.stderr if log is None else log
    base_env = dict(os.environ if env is None else env)
    if base_env.get(envvars.LAUNCHED) == "1":
        raise RuntimeError("minisam.launch was called from a launched rank; each rank must run "
                           "the command itself (drop --gpus/--nproc from the child command)")
    for name, v, lo in (("nproc", nproc, 1), ("nnodes", nnodes, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be in [0, nnodes={nnodes}), got {node_rank}")
    if master_port is None:
        if nnodes > 1:
            raise ValueError("with several nodes, pass the same --master-port on every node")
        master_port = free_port(master_addr)
    if not 0 < int(master_port) < 65536:
        raise ValueError(f"master_port must be in 1..65535, got {master_port}")
    if not base_env.get(TOKEN_ENV):
        if nnodes > 1:
            raise ValueError(f"with several nodes, export the same {TOKEN_ENV} on every node "
                             "(e.g. the output of `python -c \"import secrets; "
                             "print(secrets.token_hex(16))\"`): only ranks that know it may "
                             "join the rendezvous")
        import secrets
        base_env[TOKEN_ENV] = secrets.token_hex(16)     # this job's ranks, and no one else
    cmd = list(child_cmd) if child_cmd is not None else [sys.executable, "-m", "minisam"]
    cmd += list(argv)
    world = nproc * nnodes

    def say(msg):
        print(f"minisam.launch: {msg}", file=log, flush=True)

    # Signals arriving while children start are remembered and forwarded below.
    pending: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM)
    old_handlers = {}
    try:
        for s in handled:
            old_handlers[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
    except ValueError:            # not the main thread: no forwarding, still supervised
        old_handlers = {}

    procs: list[subprocess.Popen] = []
    preexec = _pdeathsig_preexec()
    try:
        for local_rank in range(nproc):
            rank = node_rank * nproc + local_rank
            v = envvars
            child_env = dict(base_env, **{
                v.RANK: str(rank), v.WORLD_SIZE: str(world), v.LOCAL_RANK: str(local_rank),
                v.LOCAL_WORLD_SIZE: str(nproc), v.NODE_RANK: str(node_rank),
                v.MASTER_ADDR: master_addr, v.MASTER_PORT: str(master_port), v.LAUNCHED: "1"})
            procs.append(subprocess.Popen(cmd, env=child_env, start_new_session=True,
                                          preexec_fn=preexec))
        return _supervise(procs, node_rank * nproc, pending, grace, say)
    except BaseException:
        for p in procs:                       # never leave orphans behind
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
        for p in procs:
            p.wait()
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


def _supervise(procs, first_rank, pending, grace, say) -> int:
    """Wait for the children; on a failure or a signal stop the rest. Returns the exit code."""
    n = len(procs)
    codes: list[int | None] = [None] * n
    outcome = 0                 # exit code once something went wrong
    stopping_since = None       # when we sent SIGTERM (or forwarded a signal)
    killed = False
    while True:
        for i, p in enumerate(procs):
            if codes[i] is None and (rc := p.poll()) is not None:
                codes[i] = rc
                if rc != 0 and stopping_since is None:
                    alive = sum(c is None for c in codes)
                    say(f"rank {first_rank + i} (pid {p.pid}) {_describe(rc)}; "
                        f"stopping the other {alive} rank(s)")
                    outcome = _exit_code(rc) or 1
                    for q, c in zip(procs, codes):
                        if c is None:
                            _signal_group(q, signal.SIGTERM)
                    stopping_since = time.monotonic()
        if all(c is not None for c in codes):
            return outcome
        while pending:
            sig = pending.pop(0)
            name = signal.Signals(sig).name
            if stopping_since is not None and sig == signal.SIGINT and not killed:
                say(f"second {name}: killing the remaining ranks")
                for q, c in zip(procs, codes):
                    if c is None:
                        _signal_group(q, signal.SIGKILL)
                killed = True
                continue
            if stopping_since is None:
                say(f"got {name}; forwarding it to {sum(c is None for c in codes)} rank(s)")
                outcome = 128 + sig
                stopping_since = time.monotonic()
            for q, c in zip(procs, codes):
                if c is None:
                    _signal_group(q, sig)
        if (stopping_since is not None and not killed
                and time.monotonic() - stopping_since > grace):
            left = [first_rank + i for i, c in enumerate(codes) if c is None]
            say(f"rank(s) {left} still running {grace:g}s after being asked to stop; "
                "sending SIGKILL")
            for q, c in zip(procs, codes):
                if c is None:
                    _signal_group(q, signal.SIGKILL)
            killed = True
        time.sleep(0.02)


def relaunch_on_gpus(nproc: int, argv: Sequence[str], device: str | None) -> int:
    """``minisam train --gpus N ...``: run the same command (without ``--gpus``) as N ranks,
    one per GPU, adding ``--device gpu`` unless a device was given."""
    if nproc < 1:
        raise ValueError(f"--gpus must be >= 1, got {nproc}")
    if os.environ.get(envvars.LAUNCHED) == "1":
        raise ValueError("--gpus given inside a launched rank; each rank runs the plain command")
    if device == "cpu":
        raise ValueError("--gpus runs one process per GPU; drop --device cpu (use --replicas "
                         "for thread replicas on the CPU)")
    out, skip = [], False
    for a in argv:                      # drop "--gpus N" and "--gpus=N"
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return launch(nproc, out + ([] if device else ["--device", "gpu"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisam.launch",
        description="Run a minisam command as N processes, one per GPU, with RANK, WORLD_SIZE, "
                    "LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (NCCL data parallelism). "
                    "Put the minisam command after --.",
        epilog="example: python -m minisam.launch --nproc 4 -- train --dataset cifar10 "
               "--device gpu")
    p.add_argument("--nproc", type=int, required=True, metavar="N",
                   help="processes (GPUs) on this node")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="number of nodes (1)")
    p.add_argument("--node-rank", type=int, default=0, metavar="K",
                   help="this node's index in 0..M-1 (0)")
    p.add_argument("--master-addr", default="127.0.0.1", metavar="A",
                   help="address of node 0, where rank 0 serves the rendezvous (127.0.0.1)")
    p.add_argument("--master-port", type=int, default=None, metavar="P",
                   help="rendezvous port (default: a free port; required with several nodes)")
    p.add_argument("--grace", type=float, default=10.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL when stopping ranks (10)")
    p.add_argument("--raw", action="store_true",
                   help="run the command after -- as given instead of `python -m minisam ...`")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    parser = build_parser()
    args = parser.parse_args(head)
    if not tail:
        parser.error("nothing to run: put the command after --, e.g. "
                     "`python -m minisam.launch --nproc 2 -- train --dataset cifar10`")
    if not args.raw and tail[0] == "minisam":     # `-- minisam train ...` means `-- train ...`
        tail = tail[1:]
    try:
        return launch(args.nproc, [] if args.raw else tail, nnodes=args.nnodes,
                      node_rank=args.node_rank, master_addr=args.master_addr,
                      master_port=args.master_port, grace=args.grace,
                      child_cmd=tail if args.raw else None)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"minisam.launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
