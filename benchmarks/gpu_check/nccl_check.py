"""gpu_check step e_nccl: NcclComm against ThreadComm on the same two SAM steps of a WRN-10-2.

    nccl_check.py threads DIR   ThreadComm (threads on the GPU), R = 1 and 2, both sync modes
    nccl_check.py child DIR     one rank of an NcclComm job (start it with python -m minisam.launch)
    nccl_check.py compare DIR   DIR/n1 (world 1) and DIR/n2 (2 ranks) against DIR/threads

Every rank initialises its model with its own seed, starts from rank 0's parameters
(comm.broadcast) and takes its shard of one fixed global batch of 16 images (16x16x3).
With 2 ranks the NCCL sum a + b is the ThreadComm sum
(one addition commutes), so the results should agree to the last bit; the pass criterion
is a relative difference of at most 1e-5. A DIR/<n1|n2>.skipped file (its text: why) marks a
run that was not attempted. Results are DIR/<sub>/R<size>_sync<0|1>_rank<r>.npz."""
from __future__ import annotations

import os
import sys

import numpy as np

TOL = 1e-5
RUNS = ((1, "n1"), (2, "n2"))     # (world size, folder)


def problem():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
            rng.integers(0, 10, 16).astype(np.int32))


def run(rank, size, comm, sync, steps=2):
    import cupy as cp
    from minisam.backend import to_numpy
    from minisam.models import wide_resnet
    from minisam.optim import nesterov_init
    from minisam.sam import SAMConfig, train_step
    from minisam.tree import flat_tree
    x, y = problem()
    b = len(x) // size
    xs, ys = cp.asarray(x[rank * b:(rank + 1) * b]), cp.asarray(y[rank * b:(rank + 1) * b])
    # a different init on every rank, so that only comm.broadcast makes them agree
    model = wide_resnet("wrn10_2", num_outputs=10, in_channels=3, seed=rank)
    params = flat_tree(comm.broadcast({k: cp.asarray(v) for k, v in model.get_params().items()}, 0))
    state = {k: cp.asarray(v) for k, v in model.get_state().items()}
    mom = nesterov_init(params)
    cfg = SAMConfig(rho=0.05, sync_perturbations=sync)
    met = {}
    for _ in range(steps):
        params, state, mom, met = train_step(model, params, state, mom, xs, ys, 0.1, cfg, comm)
    out = {"params/" + k: to_numpy(v) for k, v in params.items()}
    out.update({"momentum/" + k: to_numpy(v) for k, v in mom.items()})
    out.update({"state/" + k: to_numpy(v) for k, v in state.items()})
    out.update({"metrics/" + k: to_numpy(v) for k, v in met.items()})
    return out


def result_name(size, sync, rank) -> str:
    return f"R{size}_sync{int(sync)}_rank{rank}.npz"


def save(d, size, sync, rank, res):
    os.makedirs(d, exist_ok=True)
    np.savez(os.path.join(d, result_name(size, sync, rank)), **res)


def diff(a, b):
    """(max abs difference, max relative difference, arrays that differ, arrays)."""
    worst_abs = worst_rel = 0.0
    ndiff = 0
    for k in a.files:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        e = float(np.max(np.abs(x - y))) if x.size else 0.0
        s = float(np.max(np.abs(x))) if x.size else 0.0
        worst_abs = max(worst_abs, e)
        worst_rel = max(worst_rel, e / s if s else e)
        ndiff += int(e > 0)
    return worst_abs, worst_rel, ndiff, len(a.files)


def compare(d) -> int:
    """Print one line per (size, sync, rank); return the number of problems."""
    bad = 0
    for size, sub in RUNS:
        marker = os.path.join(d, sub + ".skipped")
        if os.path.exists(marker):
            with open(marker) as f:
                print(f"NCCL R={size}: not run ({f.read().strip()})")
            continue
        for sync in (0, 1):
            ranks = []
            for r in range(size):
                ft = os.path.join(d, "threads", result_name(size, sync, r))
                fn = os.path.join(d, sub, result_name(size, sync, r))
                if not (os.path.exists(ft) and os.path.exists(fn)):
                    print(f"NCCL R={size} sync={sync} rank {r}: MISSING "
                          f"({'threads' if not os.path.exists(ft) else sub} result absent)")
                    bad += 1
                    continue
                a, b = np.load(ft), np.load(fn)
                if sorted(a.files) != sorted(b.files):
                    print(f"NCCL R={size} sync={sync} rank {r}: different keys -> FAIL")
                    bad += 1
                    continue
                ea, er, nd, n = diff(a, b)
                ok = er <= TOL
                bad += not ok
                ranks.append(b)
                print(f"NCCL vs ThreadComm R={size} sync_perturbations={bool(sync)} rank {r}: "
                      f"max abs {ea:.2e}, max rel {er:.2e}, {nd}/{n} arrays differ -> "
                      f"{'ok' if ok else 'FAIL'}{' (bitwise equal)' if nd == 0 else ''}")
            if len(ranks) == 2:
                same = all(np.array_equal(ranks[0][k], ranks[1][k])
                           for k in ranks[0].files if k.startswith("params/"))
                print(f"NCCL R=2 sync={bool(sync)}: parameters identical on both ranks: {same}")
                bad += not same
    print(f"compare: {'PASS' if not bad else f'FAIL ({bad} problem(s))'}")
    return bad


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("threads", "child", "compare"):
        print("usage: nccl_check.py threads|child|compare DIR", file=sys.stderr)
        return 2
    mode, d = argv
    if mode == "threads":
        from minisam.distributed.local import run_replicas
        for size in (1, 2):
            for sync in (False, True):
                results = run_replicas(size, lambda r, c: run(r, size, c, sync))
                for r, res in enumerate(results):
                    save(d, size, sync, r, res)
                print(f"threads: R={size} sync={sync}: done", flush=True)
        return 0
    if mode == "child":
        from minisam.distributed import comm_from_env
        comm = comm_from_env("gpu", nccl=True, timeout=60)
        print(f"rank {comm.rank}/{comm.size} on GPU {comm.device_id}", flush=True)
        for sync in (False, True):
            save(d, comm.size, sync, comm.rank, run(comm.rank, comm.size, comm, sync))
        comm.barrier()
        comm.close()
        print(f"rank {comm.rank}: done", flush=True)
        return 0
    return 1 if compare(d) else 0


if __name__ == "__main__":
    sys.exit(main())
