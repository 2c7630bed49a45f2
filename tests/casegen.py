"""Reference cases made without JAX, to test the verification machinery itself.

``make_case`` writes NAME.npz + NAME.json in the schema of reference_results/ (see
reference_results/*.json), with minisam's own float64 run standing in for the reference:
each step is computed in float64 from the float32 state stored for the step before (as JAX
computes each step in float32 from its stored float32 state), so the float32 run is
compared with a computation that carries no float32 noise within a step. That is what a
many-replica, small-batch, several-step case needs to exercise the step-wise comparison,
the per-replica BN state and the tie search.

``plant`` puts that many ReLU ties into the first pass of step 1: it moves one batch-norm
bias so that one input of the first ReLU sits between the float64 value and the float32
value of itself, on opposite sides of zero (so float32 and the float64 "reference" take
different sides there, as JAX and minisam do at a real tie).
"""
import json
import os

import numpy as np

from minisam.models import WideResnet
from minisam.reference import run_case
from minisam.ties import ReluTies

FIRST_RELU = "WideResnetGroup_0/WideResnetBlock_0/relu1"
BIAS = "WideResnetGroup_0/WideResnetBlock_0/init_bn/bias"


def _config(name, blocks, width, classes, replicas, per_replica, steps, rho, ls, wd, clip,
            sync, lr, seed):
    return dict(name=name, batch_size=replicas * per_replica, blocks_per_group=blocks,
                channel_multiplier=width, num_outputs=classes, replicas=replicas, sam_rho=rho,
                label_smoothing=ls, weight_decay=wd, gradient_clipping=clip, learning_rate=lr,
                num_epochs=1, steps_per_epoch=steps, num_steps=steps, sync_perturbations=sync,
                data_seed=seed, init_seed=seed)


def _first_relu_inputs(arrays, manifest, dtype):
    """{rank: input of the first ReLU in step 1's first pass} for a run in ``dtype``."""
    rec = ReluTies(record=True)
    run_case(arrays, manifest, ties=rec, teacher=True, steps=[1], dtype=dtype,
             modes=[manifest["config"]["sync_perturbations"]])
    return {key[0][1]: x for key, x in rec.inputs.items()
            if key[1] == 1 and key[2] == FIRST_RELU and key[3] == 0}


def plant_ties(arrays, manifest, count):
    """Move ``init/params/BIAS`` so that ``count`` first-ReLU inputs (replica n % R, channel
    n) are ties that float32 and float64 put on opposite sides. Returns the planted sites as
    (rank, flat index into that ReLU's input)."""
    replicas = manifest["config"]["replicas"]
    sites = []
    for n in range(count):
        rank, channel = n % replicas, n
        full64 = _first_relu_inputs(arrays, manifest, np.float64)[rank]
        x64 = full64[..., channel]
        x32 = _first_relu_inputs(arrays, manifest, np.float32)[rank][..., channel]
        planted = None
        for flat in np.argsort(-np.abs(x32 - x64), axis=None)[:64]:  # noisiest first
            idx = np.unravel_index(flat, x64.shape)
            for shift in (0.5, 0.25, 0.75):
                bias = arrays[f"init/params/{BIAS}"].copy()
                bias[channel] = np.float32(bias[channel] - x64[idx] + shift * (x64[idx] - x32[idx]))
                trial = dict(arrays, **{f"init/params/{BIAS}": bias})
                a = _first_relu_inputs(trial, manifest, np.float64)[rank][..., channel][idx]
                b = _first_relu_inputs(trial, manifest, np.float32)[rank][..., channel][idx]
                if (a > 0) != (b > 0) and max(abs(a), abs(b)) < 1e-6:
                    arrays[f"init/params/{BIAS}"] = bias
                    planted = int(np.ravel_multi_index(idx + (channel,), full64.shape))
                    break
            if planted is not None:
                break
        if planted is None:
            raise RuntimeError(f"could not plant tie {n} in channel {channel}")
        sites.append((rank, planted))
    return sites


def make_case(directory, name="generated", *, blocks=1, width=1, classes=10, replicas=4,
              per_replica=3, image=8, steps=4, rho=0.1, ls=0.1, wd=5e-4, clip=5.0,
              sync=False, lr=0.1, plant=0, seed=0):
    """Write ``directory/name.npz`` and ``.json``; return (npz path, planted tie sites)."""
    cfg = _config(name, blocks, width, classes, replicas, per_replica, steps, rho, ls, wd,
                  clip, sync, lr, seed)
    rng = np.random.RandomState(seed)
    images = rng.standard_normal((cfg["batch_size"], image, image, 3)).astype(np.float32)
    labels = rng.randint(0, classes, size=cfg["batch_size"]).astype(np.int32)
    model = WideResnet(blocks, width, classes, seed=seed)
    arrays = {"input/images": images, "input/labels": labels}
    arrays.update({f"init/params/{k}": v for k, v in model.get_params().items()})
    arrays.update({f"init/state/{k}": v for k, v in model.get_state().items()})
    manifest = {"config": cfg, "per_replica_keys": [],
                "info": "made by tests/casegen.py: minisam's float64 run as the reference"}
    sites = plant_ties(arrays, manifest, plant) if plant else []
    # Like JAX, each step starts from exactly the float32 state stored for the step before:
    # float64 arithmetic within a step, float32 between steps.
    for step in range(1, steps + 1):
        out = run_case(arrays, manifest, dtype=np.float64, all_replicas=True, teacher=True,
                       steps=[step])
        for k, v in out.items():
            per = replicas > 1 and not np.all(v == v[:1])
            if per:
                manifest["per_replica_keys"].append(k)
            v = v if per else v[0]
            arrays[k] = v.astype(np.float32) if v.dtype == np.float64 else v
    manifest["keys"] = {k: list(v.shape) for k, v in arrays.items()}
    path = os.path.join(str(directory), name + ".npz")
    np.savez(path, **arrays)
    with open(path[:-4] + ".json", "w") as f:
        json.dump(manifest, f, indent=1)
    return path, sites
