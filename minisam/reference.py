"""Run a reference case from the original JAX code and compare minisam with it, key by key.

A case is ``NAME.npz`` (the JAX run's arrays: inputs, initial parameters, and every
intermediate value of the first SAM step plus the parameters after each step) and
``NAME.json`` beside it (the manifest: ``config``, ``keys``, ``per_replica_keys``). The
case is rebuilt from the manifest's ``config`` alone, so any manifest of this schema
works: any WideResnet size, any number of replicas, synced or per-replica
perturbations, rho, label smoothing, weight decay, clipping, schedule and step count.

The error of a key is reported as max|ours - jax| (abs) and max|ours - jax| / max|jax|
(rel: relative to the array's scale, so values near zero do not blow it up).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np

from .backend import to_device, to_numpy, tree_to_device
from .models import WideResnet
from .distributed.local import run_replicas
from .optim import constant_schedule, cosine_schedule, nesterov_init
from .sam import SAMConfig, eval_step, train_step
from .tree import global_norm

REQUIRED_CONFIG = ("batch_size", "blocks_per_group", "channel_multiplier", "num_outputs",
                   "replicas", "sam_rho", "label_smoothing", "weight_decay",
                   "gradient_clipping", "learning_rate", "num_epochs", "steps_per_epoch",
                   "num_steps", "sync_perturbations")

# Tolerances on the relative error, by the last name of a key group.
VALUE_KEYS = ("logits_train", "logits_eval", "perturbed_logits", "loss", "cross_entropy",
              "perturbed_loss", "perturbed_cross_entropy", "train_loss", "weight_l2", "lr")
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4
EXACT_KEYS = ("optimizer_step", "train_error_rate")


def load_case(npz_path: str):
    """Return (arrays, manifest); the manifest is the .json beside the .npz."""
    if not str(npz_path).endswith(".npz"):
        raise ValueError(f"expected a reference case NAME.npz, got {npz_path!r}")
    if not os.path.exists(npz_path):
        raise FileNotFoundError(f"reference case {npz_path!r} not found; the shipped cases are "
                                "in reference_results/ (e.g. reference_results/wrn10x2_single.npz)")
    manifest_path = npz_path[:-4] + ".json"
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"manifest {manifest_path!r} not found: every case NAME.npz needs "
                                "its manifest NAME.json beside it")
    with open(manifest_path) as f:
        manifest = json.load(f)
    check_manifest(manifest, manifest_path)
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    for k in ("input/images", "input/labels"):
        if k not in arrays:
            raise ValueError(f"{npz_path}: missing array {k!r}; a case must hold its inputs")
    return arrays, manifest


def check_manifest(manifest: dict, where: str = "manifest"):
    cfg = manifest.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: missing the 'config' object; expected fields {REQUIRED_CONFIG}")
    missing = [k for k in REQUIRED_CONFIG if k not in cfg]
    if missing:
        raise ValueError(f"{where}: config lacks field(s) {missing}; a reference manifest needs "
                         f"all of {list(REQUIRED_CONFIG)}")
    if cfg["batch_size"] % cfg["replicas"]:
        raise ValueError(f"{where}: batch_size {cfg['batch_size']} is not divisible by "
                         f"replicas {cfg['replicas']}")


def _sync_modes(cfg):
    s = cfg["sync_perturbations"]
    return [bool(v) for v in s] if isinstance(s, (list, tuple)) else [bool(s)]


class _ReluTies:
    """Records ReLU inputs that sit within float32 noise of the kink, and can flip their side.

    A ReLU input of, say, -1e-6 is zero up to float32 rounding: JAX's rounding and ours
    may put it on different sides, and then one gradient entry flows in one code and not
    in the other. The forward values barely change, but the gradients differ at the 1e-2
    level. These ties are facts about float32, not bugs; ``verify`` finds them and reports
    the side the reference must have taken."""

    def __init__(self, tol, flips=()):
        self.tol, self.flips, self.found, self.where = tol, set(flips), [], None

    def install(self, model, tag):
        for path, relu in _all_relus(model):
            relu.forward = self._wrap(relu, relu.forward, tag, path)

    def _wrap(self, relu, forward, tag, i):
        calls = {}

        def wrapped(x, train=True):
            y = forward(x, train)
            key = (tag, self.where, i, calls.setdefault(self.where, 0))
            calls[self.where] += 1
            xn = to_numpy(x)
            for flat in np.flatnonzero(np.abs(xn) <= self.tol * max(1.0, float(np.abs(xn).max()))):
                site = key + (int(flat),)
                self.found.append((site, float(xn.flat[flat])))
                if site in self.flips:
                    idx = np.unravel_index(flat, x.shape)
                    relu.mask[idx] = ~relu.mask[idx]
            return y
        return wrapped


def _all_relus(model):
    """(path, ReLU) for every ReLU in the model, e.g. 'WideResnetGroup_2/WideResnetBlock_0/relu1'."""
    from .nn import ReLU
    return [(path, layer) for path, layer in model.named_layers() if isinstance(layer, ReLU)]


def run_case(arrays: dict, manifest: dict, device: str = "cpu", ties: _ReluTies | None = None) -> dict:
    """Rebuild the case from its config, run it, return {npz key: our value} (NumPy).

    ``ties``, if given, records near-kink ReLU inputs and flips the ones it names."""
    cfg = manifest["config"]
    images, labels = arrays["input/images"], arrays["input/labels"].astype(np.int32)
    R, B = int(cfg["replicas"]), int(cfg["batch_size"])
    if images.shape[0] != B:
        raise ValueError(f"input/images has {images.shape[0]} rows, config batch_size is {B}")
    init_params = {k[len("init/params/"):]: v for k, v in arrays.items() if k.startswith("init/params/")}
    init_state = {k[len("init/state/"):]: v for k, v in arrays.items() if k.startswith("init/state/")}
    schedule = (constant_schedule(cfg["learning_rate"]) if cfg.get("lr_schedule") == "constant"
                else cosine_schedule(cfg["learning_rate"], cfg["num_epochs"], cfg["steps_per_epoch"]))
    modes = _sync_modes(cfg)
    per_replica = set(manifest.get("per_replica_keys", []))
    has_prefix = any(k.startswith(("sync_true/", "sync_false/")) for k in arrays)
    out = {}

    def replica(rank, comm, sync):
        b = B // R
        x = to_device(images[rank * b:(rank + 1) * b], device)
        y = to_device(labels[rank * b:(rank + 1) * b], device)
        model = WideResnet(cfg["blocks_per_group"], cfg["channel_multiplier"], cfg["num_outputs"],
                           in_channels=images.shape[-1])
        model.set_params(init_params)  # shapes checked against the config's architecture
        if ties is not None:
            ties.install(model, (sync, rank))
        params, state = tree_to_device(init_params, device), tree_to_device(init_state, device)
        momentum = nesterov_init(params)
        sam = SAMConfig(rho=cfg["sam_rho"], weight_decay=cfg["weight_decay"],
                        label_smoothing=cfg["label_smoothing"],
                        gradient_clipping=cfg["gradient_clipping"], sync_perturbations=sync)
        res = {}
        logits_eval, _ = eval_step(model, params, state, x, y)
        res["init/logits_eval"] = logits_eval
        res["init/weight_l2"] = sum((w * w).sum() for w in params.values())
        for step in range(1, int(cfg["num_steps"]) + 1):
            lr = schedule(step - 1)
            trace = {} if step == 1 else None
            if ties is not None:
                ties.where = step
            params, state, momentum, metrics = train_step(
                model, params, state, momentum, x, y, lr, sam, comm, trace)
            if trace is not None:
                res.update(_trace_keys(trace, sam.rho > 0))
            s = f"step{step}/"
            res[s + "lr"] = np.float32(lr)
            res[s + "optimizer_step"] = np.int32(step)
            res.update({s + "metrics/" + k: v for k, v in metrics.items()})
            res.update({s + "params/" + k: v for k, v in params.items()})
            res.update({s + "momentum/" + k: v for k, v in momentum.items()})
            res.update({s + "state/" + k: v for k, v in state.items()})
        return {k: to_numpy(v) for k, v in res.items()}

    for sync in modes:
        prefix = f"sync_{str(sync).lower()}/" if has_prefix else ""
        results = run_replicas(R, lambda rank, comm: replica(rank, comm, sync))
        for k in results[0]:
            key = k if k.startswith("init/") else prefix + k
            if key in out:  # init/* is the same for every sync mode
                continue
            out[key] = (np.stack([r[k] for r in results]) if key in per_replica or
                        (R > 1 and k.startswith("init/") and k in per_replica) else results[0][k])
    return out


def _trace_keys(t: dict, sam: bool) -> dict:
    """Name the first step's intermediate values like the reference keys."""
    r = {"init/logits_train": t["logits"], "init/cross_entropy": t["cross_entropy"],
         "init/loss": t["loss"], "init/grad_norm": global_norm(t["grad"])}
    r.update({"init/grad/" + k: v for k, v in t["grad"].items()})
    r.update({"init/state_after_train_forward/" + k: v for k, v in t["state"].items()})
    if sam:
        r.update({"sam/grad_for_perturbation_norm": t["grad_for_perturbation_norm"],
                  "sam/perturbed_loss": t["perturbed_loss"],
                  "sam/perturbed_cross_entropy": t["perturbed_cross_entropy"],
                  "sam/perturbed_logits": t["perturbed_logits"],
                  "sam/grad_norm": global_norm(t["sam_grad"]),
                  "sam/grad_synced_norm": global_norm(t["grad_synced"]),
                  "sam/grad_clipped_norm": global_norm(t["grad_clipped"])})
        r.update({"sam/perturbation/" + k: v for k, v in t["perturbation"].items()})
        r.update({"sam/grad/" + k: v for k, v in t["sam_grad"].items()})
        r.update({"sam/grad_clipped/" + k: v for k, v in t["grad_clipped"].items()})
    return r


@dataclass
class Row:
    group: str
    n_keys: int
    max_abs: float
    max_rel: float
    tol: float
    kind: str  # "rel" or "abs"

    @property
    def ok(self) -> bool:
        return (self.max_rel if self.kind == "rel" else self.max_abs) <= self.tol


def _group(key: str, paths) -> str:
    for p in paths:
        if key.endswith("/" + p):
            return key[:-len(p)] + "*"
    return key


def compare(arrays: dict, ours: dict, manifest: dict):
    """One Row per key group (parameter paths folded into '*'), over every reference key
    minisam computes. Inputs and initial values are skipped: they are what we load.
    A reference key that minisam does not compute is an error (it would go unchecked)."""
    skip = ("input/", "init/params/", "init/state/")
    keys = [k for k in arrays if not k.startswith(skip)]
    missing = [k for k in keys if k not in ours]
    if missing:
        raise ValueError(f"minisam computed no value for {len(missing)} reference key(s), "
                         f"e.g. {missing[:3]}")
    paths = sorted({k.split("init/params/", 1)[1] for k in arrays if k.startswith("init/params/")} |
                   {k.split("init/state/", 1)[1] for k in arrays if k.startswith("init/state/")},
                   key=len, reverse=True)
    groups: dict[str, list] = {}
    for k in keys:
        a, b = np.asarray(ours[k], np.float64), np.asarray(arrays[k], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{k}: minisam gives shape {a.shape}, reference has {b.shape}")
        err = float(np.max(np.abs(a - b))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        groups.setdefault(_group(k, paths), []).append((err, err / scale if scale else err))
    rows = []
    for g, errs in groups.items():
        last = g.rstrip("/*").rsplit("/", 1)[-1]
        if last in EXACT_KEYS:
            kind, tol = "abs", 1e-6
        else:
            kind, tol = "rel", VALUE_RTOL if last in VALUE_KEYS else GRAD_RTOL
        rows.append(Row(g, len(errs), max(e for e, _ in errs), max(r for _, r in errs), tol, kind))
    return rows


TIE_TOL = 1e-6  # |relu input| <= TIE_TOL * max(1, max|input|) counts as a float32 tie


def verify(npz_path: str, device: str = "cpu", resolve_ties: bool = True):
    """Load, run and compare one case; returns (rows, ties flipped).

    If a group fails and ``resolve_ties``, the ReLU inputs within float32 noise of zero
    (ties) are tried on the other side of the kink, step by step and one at a time; a flip
    is kept only if it cuts that step's error at least tenfold. The flips kept are
    returned as [(site, value)] for the caller to print: nothing is hidden."""
    arrays, manifest = load_case(npz_path)
    ties = _ReluTies(TIE_TOL)
    rows = compare(arrays, run_case(arrays, manifest, device, ties), manifest)
    kept = []
    if not resolve_ties:
        return rows, kept
    for step in range(1, int(manifest["config"]["num_steps"]) + 1):
        score = _score(rows, step)
        candidates = sorted((t for t in ties.found if t[0][1] == step), key=lambda t: abs(t[1]))
        for site, value in candidates:
            if score == 0:
                break
            trial = _ReluTies(TIE_TOL, [s for s, _ in kept] + [site])
            trial_rows = compare(arrays, run_case(arrays, manifest, device, trial), manifest)
            if _score(trial_rows, step) < score - 1:
                score, rows, ties = _score(trial_rows, step), trial_rows, trial
                kept.append((site, value))
    return rows, kept


def _step_of(group: str) -> int:
    m = re.search(r"(?:^|/)step(\d+)/", group)
    return int(m.group(1)) if m else 1   # init/* and sam/* belong to the first step


def _score(rows, step):
    """How far a step is from passing: sum over its failing groups of log10(error / tol)."""
    return sum(max(0.0, np.log10(max(r.max_rel if r.kind == "rel" else r.max_abs, 1e-30) / r.tol))
               for r in rows if _step_of(r.group) == step)


def describe_tie(site, value) -> str:
    (sync, rank), step, relu, call, flat = site
    return (f"step {step}, replica {rank}, sync={sync}: ReLU {relu}, "
            f"{'first' if call == 0 else 'perturbed' if call == 1 else f'call {call}'} pass, "
            f"input element {flat} = {value:.3e}")


def format_rows(rows) -> str:
    lines = [f"{'key group':58s} {'keys':>4s} {'max abs err':>12s} {'max rel err':>12s} "
             f"{'tol':>8s}  result"]
    for r in rows:
        lines.append(f"{r.group:58s} {r.n_keys:4d} {r.max_abs:12.3e} {r.max_rel:12.3e} "
                     f"{r.tol:8.0e}{'a' if r.kind == 'abs' else ' '} {'pass' if r.ok else 'FAIL'}")
    return "\n".join(lines)


def format_summary(rows) -> str:
    """One line: PASS or FAIL, and the worst relative error on values and on gradients."""
    worst = {tol: max((r.max_rel for r in rows if r.kind == "rel" and r.tol == tol),
                      default=0.0) for tol in (VALUE_RTOL, GRAD_RTOL)}
    tol = {t: f"{t:.0e}".replace("e-0", "e-") for t in worst}   # 1e-5, not 1e-05
    return (f"-> {'PASS' if all(r.ok for r in rows) else 'FAIL'}: max rel err "
            f"{worst[VALUE_RTOL]:.2e} on values (tol {tol[VALUE_RTOL]}), {worst[GRAD_RTOL]:.2e} "
            f"on gradients/params/state (tol {tol[GRAD_RTOL]})")
