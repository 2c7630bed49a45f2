"""gpu_check step f_train: judge the short training runs from their run directories.

    train_check.py resume RUN FULL         is RUN (stopped by --max-steps, then --resume)
                                           bitwise equal to FULL (uninterrupted)? informational:
                                           always exit 0
    train_check.py metrics RUN=EPOCHS ...  each RUN's metrics.jsonl has EPOCHS records and
                                           only finite numbers; exit 1 otherwise"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

GROUPS = ("params/", "momentum/", "state/")


def resume(run: str, full: str) -> int:
    try:
        a = np.load(os.path.join(run, "checkpoint.npz"))
        b = np.load(os.path.join(full, "checkpoint.npz"))
        keys = sorted(k for k in a.files if k.startswith(GROUPS))
        if not keys or sorted(k for k in b.files if k.startswith(GROUPS)) != keys:
            raise ValueError("the checkpoints hold different parameter, momentum or state keys")
        worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0
                    for k in keys)
        same = all(np.array_equal(a[k], b[k]) for k in keys)
        print(f"GPU resume vs uninterrupted run: bitwise equal {same}, max abs diff {worst:.2e} "
              f"over {len(keys)} arrays")
    except Exception as e:  # noqa: BLE001 (informational)
        print(f"GPU resume vs uninterrupted run: not compared ({type(e).__name__}: {e})")
    return 0


def _numbers(v):
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)):
        yield float(v)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _numbers(x)
    elif isinstance(v, list):
        for x in v:
            yield from _numbers(x)


def metrics(specs) -> int:
    bad = 0
    for spec in specs:
        run, _, epochs = spec.rpartition("=")
        epochs = int(epochs)
        p = os.path.join(run, "metrics.jsonl")
        recs = []
        if os.path.exists(p):
            with open(p) as f:
                recs = [json.loads(line) for line in f if line.strip()]
        finite = all(math.isfinite(v) for r in recs for v in _numbers(r))
        ok = len(recs) == epochs and finite
        bad += not ok
        last = recs[-1] if recs else {}
        print(f"{os.path.basename(os.path.normpath(run))}: {len(recs)}/{epochs} epochs, "
              f"train loss {last.get('train_loss')}, test error {last.get('test_error_rate')}"
              f"{'' if finite else ', NOT FINITE'} -> {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "resume":
        return resume(argv[1], argv[2])
    if len(argv) >= 2 and argv[0] == "metrics" and all("=" in a for a in argv[1:]):
        return metrics(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
