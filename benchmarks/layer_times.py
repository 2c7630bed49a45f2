"""Where a SAM step's time goes, per layer kind: wall time of every leaf layer's forward and
backward, summed by class (Conv, BatchNorm, ReLU, ...), and the rest of ``train_step``
(loss, dual vector, clipping, the update) as what is left.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/layer_times.py --model wrn16_4 --batch-size 32 --steps 5

The timers wrap each leaf layer's methods, so the figures include Python's call overhead
(a few microseconds a call, negligible next to these layers). CPU only: on a GPU the calls
return before the kernels finish, so per-layer wall times would mean nothing without a sync.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minisam.models.wide_resnet import wide_resnet  # noqa: E402
from minisam.optim import nesterov_init  # noqa: E402
from minisam.sam import SAMConfig, train_step  # noqa: E402
from minisam.tree import flat_tree  # noqa: E402


def instrument(model, totals):
    """Wrap forward/backward of every leaf layer; totals[(class, "forward")] += seconds."""
    for _, layer in model.named_layers():
        if layer.children:
            continue
        kind = type(layer).__name__
        for method in ("forward", "backward"):
            f = getattr(layer, method)

            def timed(*a, _f=f, _key=(kind, method), **kw):
                t0 = time.perf_counter()
                out = _f(*a, **kw)
                totals[_key] += time.perf_counter() - t0
                return out
            setattr(layer, method, timed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="wrn16_4", help="WideResnet preset (default wrn16_4)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed SAM steps (default 5)")
    p.add_argument("--json", metavar="OUT.json", help="also write the breakdown as JSON")
    args = p.parse_args(argv)

    model = wide_resnet(args.model)
    params, state = flat_tree(model.get_params()), model.get_state()   # as the trainer
    momentum = nesterov_init(params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size)
    cfg = SAMConfig()
    for _ in range(args.warmup):
        params, state, momentum, _ = train_step(model, params, state, momentum, x, y, 0.1, cfg)
    totals = collections.defaultdict(float)
    instrument(model, totals)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        params, state, momentum, _ = train_step(model, params, state, momentum, x, y, 0.1, cfg)
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    rows = {f"{kind} {method}": v / args.steps * 1e3 for (kind, method), v in totals.items()}
    rows["rest of train_step"] = step_ms - sum(rows.values())
    print(f"{args.model}, batch {args.batch_size}: SAM step {step_ms:.0f} ms (mean of {args.steps})")
    for name, ms in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"  {name:24s} {ms:7.1f} ms  {100 * ms / step_ms:4.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
                       "sam_step_ms": round(step_ms, 1),
                       "ms_per_step": {k: round(v, 1) for k, v in rows.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
