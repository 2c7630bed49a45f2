"""Run a reference case from the original JAX code and compare minisam with it, key by key.

A case is ``NAME.npz`` (the JAX run's arrays: inputs, initial parameters, and every
intermediate value of the first SAM step plus the parameters after each step) and
``NAME.json`` beside it (the manifest: ``config``, ``keys``, ``per_replica_keys``). The
case is rebuilt from the manifest's ``config`` alone, so any manifest of this schema
works: any WideResnet size, any number of replicas, synced or per-replica
perturbations, rho, label smoothing, weight decay, clipping, schedule and step count.

A second schema holds cases from PyTorch implementations (``reference_results/davda54_*``,
from davda54/sam's own optimizer class): one replica, the same batch every step, lr and
rho per step, and the manifest's ``config`` naming the semantics (weight-decay mode, norm
epsilon, adaptive convention, the perturbed pass's BN stats, restore); ``torch_sam_config``
maps them onto ``SAMConfig``'s switches, and the keys are that schema's
(``grad/``, ``perturbation/``, ``sam_grad/``, ``stepK/...``).

``run_case`` runs it chained (every step from our own previous state) or step-wise (every
step from the reference's own state after the step before); ``compare`` gives one row per
key group. The error of a key is reported as max|ours - jax| (abs) and max|ours - jax| /
max|jax| (rel: relative to the array's scale, so values near zero do not blow it up).
``minisam.verify`` decides pass or fail and resolves float32 ties.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .backend import to_device, to_numpy
from .models import WideResnet
from .distributed.local import run_replicas
from .optim import constant_schedule, cosine_schedule, nesterov_init
from .sam import SAMConfig, eval_step, train_step
from .tree import flat_tree, global_norm, mean_in_rank_order

REQUIRED_CONFIG = ("batch_size", "blocks_per_group", "channel_multiplier", "num_outputs",
                   "replicas", "sam_rho", "label_smoothing", "weight_decay",
                   "gradient_clipping", "learning_rate", "num_epochs", "steps_per_epoch",
                   "num_steps", "sync_perturbations")

# Tolerances on the relative error, by the last name of a key group.
VALUE_KEYS = ("logits_train", "logits_eval", "perturbed_logits", "loss", "cross_entropy",
              "perturbed_loss", "perturbed_cross_entropy", "train_loss", "weight_l2", "lr")
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4
EXACT_KEYS = ("optimizer_step", "train_error_rate")
# PyTorch cases store the perturbation as fl(w + e) - w: one float32 rounding of w + e,
# up to half an ulp of |w| (|w| < 2 here: 1.2e-7), which is large next to a tensor whose
# e is tiny. So its error is taken relative to max(max|e|, this floor): at the 1e-4
# tolerance, 3e-7 absolute at least, about two such ulps (the case's README suggests 3e-7).
TORCH_PERTURBATION_SCALE_FLOOR = 3e-3


def load_case(npz_path: str):
    """Return (arrays, manifest); the manifest is the .json beside the .npz. Both are
    checked: one ValueError naming the file and the field for anything malformed."""
    from .rundir import read_npz
    if not str(npz_path).endswith(".npz"):
        raise ValueError(f"expected a reference case NAME.npz, got {npz_path!r}")
    if not os.path.exists(npz_path):
        raise FileNotFoundError(f"reference case {npz_path!r} not found; the shipped cases are "
                                "in reference_results/ (e.g. reference_results/wrn10x2_single.npz)")
    manifest_path = npz_path[:-4] + ".json"
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"manifest {manifest_path!r} not found: every case NAME.npz needs "
                                "its manifest NAME.json beside it")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e})") from None
    check_manifest(manifest, manifest_path)
    arrays = read_npz(npz_path, "a reference case")
    for k in ("input/images", "input/labels"):
        if k not in arrays:
            raise ValueError(f"{npz_path}: missing array {k!r}; a case must hold its inputs")
    return arrays, manifest


TORCH_CONFIG = ("batch_size", "blocks_per_group", "channel_multiplier", "num_outputs",
                "replicas", "num_steps", "label_smoothing", "weight_decay", "weight_decay_mode",
                "gradient_clipping", "momentum", "nesterov", "grad_norm_eps", "adaptive",
                "bn_running_stats_pass2", "restore", "lr_per_step", "rho_per_step")


def is_torch_case(manifest: dict) -> bool:
    """A case of the PyTorch schema (per-step lr and rho, semantics named in the config)."""
    return "lr_per_step" in manifest.get("config", {})


def torch_sam_config(cfg: dict) -> SAMConfig:
    """The SAMConfig of a PyTorch case's config (its rho: the first step's)."""
    adaptive = cfg["adaptive"] or "none"
    adaptive = adaptive.split()[0] if adaptive.split()[0] in ("davda54", "asam") else adaptive
    return SAMConfig(
        rho=cfg["rho_per_step"][0], weight_decay=cfg["weight_decay"],
        label_smoothing=cfg["label_smoothing"], gradient_clipping=cfg["gradient_clipping"],
        momentum=cfg["momentum"], nesterov=cfg["nesterov"],
        weight_decay_in=cfg["weight_decay_mode"].split()[0], norm_eps=cfg["grad_norm_eps"],
        perturbed_bn_stats={"update": "update", "keep": "discard"}.get(
            cfg["bn_running_stats_pass2"], cfg["bn_running_stats_pass2"]),
        adaptive=adaptive, asam_eta=cfg.get("asam_eta", 0.01),
        restore=cfg["restore"].split()[0])


def _check_torch_manifest(cfg: dict, where: str):
    missing = [k for k in TORCH_CONFIG if k not in cfg]
    if missing:
        raise ValueError(f"{where}: config lacks field(s) {missing}; a PyTorch-schema manifest "
                         f"needs all of {list(TORCH_CONFIG)}")
    if cfg["replicas"] != 1 or cfg["batch_size"] < 1:
        raise ValueError(f"{where}: a PyTorch-schema case has one replica and a batch, got "
                         f"replicas {cfg['replicas']!r}, batch_size {cfg['batch_size']!r}")
    if cfg.get("variant", "sam") != "sam":
        raise ValueError(f"{where}: the case runs variant {cfg['variant']!r}; minisam verify "
                         "runs PyTorch-schema cases of plain SAM (and its switches) so far")
    for k in ("lr_per_step", "rho_per_step"):
        if not (isinstance(cfg[k], list) and len(cfg[k]) == cfg["num_steps"]):
            raise ValueError(f"{where}: config field {k!r} must list one value per step "
                             f"({cfg['num_steps']}), got {cfg[k]!r}")
    try:
        torch_sam_config(cfg)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: config names semantics minisam has no switch for: {e}") \
            from None


INT_CONFIG = ("batch_size", "blocks_per_group", "channel_multiplier", "num_outputs", "replicas",
              "num_epochs", "steps_per_epoch", "num_steps")


def check_manifest(manifest, where: str = "manifest"):
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: a manifest is a JSON object, got a {type(manifest).__name__}")
    cfg = manifest.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: missing the 'config' object; expected fields {REQUIRED_CONFIG}")
    if is_torch_case(manifest):
        return _check_torch_manifest(cfg, where)
    missing = [k for k in REQUIRED_CONFIG if k not in cfg]
    if missing:
        raise ValueError(f"{where}: config lacks field(s) {missing}; a reference manifest needs "
                         f"all of {list(REQUIRED_CONFIG)}")
    for k in REQUIRED_CONFIG:
        v, ok = cfg[k], True
        if k in INT_CONFIG:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        elif k == "sync_perturbations":
            ok = isinstance(v, bool) or (isinstance(v, list) and v and
                                         all(isinstance(x, bool) for x in v))
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        if not ok:
            want = ("a positive integer" if k in INT_CONFIG else "true/false or a list of them"
                    if k == "sync_perturbations" else "a number >= 0")
            raise ValueError(f"{where}: config field {k!r} must be {want}, got {v!r}")
    if cfg["batch_size"] % cfg["replicas"]:
        raise ValueError(f"{where}: batch_size {cfg['batch_size']} is not divisible by "
                         f"replicas {cfg['replicas']}")
    if not isinstance(manifest.get("per_replica_keys", []), list):
        raise ValueError(f"{where}: 'per_replica_keys' must be a list of keys")


def sync_modes(cfg):
    s = cfg.get("sync_perturbations", False)    # PyTorch cases: one replica, unsynced
    return [bool(v) for v in s] if isinstance(s, (list, tuple)) else [bool(s)]


def run_case(arrays: dict, manifest: dict, device: str = "cpu", ties=None, *,
             teacher: bool = False, steps=None, modes=None, dtype=np.float32,
             all_replicas: bool = False, posted: dict | None = None,
             alone: int | None = None) -> dict:
    """Rebuild the case from its config, run it, return {npz key: our value} (NumPy).

    teacher:  False (chained): every step starts from our own previous step, as a run
              would. True (step-wise, "teacher-forced"): step k starts from the reference's
              parameters, momentum and per-replica BN state after step k-1, so every step
              is an independent check of the whole SAM step.
    steps, modes: run only these steps (teacher-forced, any subset; chained, 1..K) and
              sync modes (default: all of the case).
    dtype:    numpy.float64 runs the case in double precision from the same float32 start.
    ties:     a ``ties.ReluTies`` that watches every ReLU (and flips the sites it names).
    all_replicas: stack every key over replicas (default: only the manifest's
              per-replica keys; the others are taken from replica 0).
    posted, alone: ``posted`` (a dict) records the trees every replica posts to each
              collective; a later run with ``alone=r`` and that record runs replica r only,
              the others' trees replayed: bitwise the full run's result as long as what
              changed in replica r reaches the others only through the last collective.
              Per-replica keys then hold replica r's value alone."""
    cfg = manifest["config"]
    if is_torch_case(manifest):
        return _run_torch_case(arrays, cfg, device, ties, teacher, steps, dtype)
    images, labels = arrays["input/images"], arrays["input/labels"].astype(np.int32)
    R, B, K = int(cfg["replicas"]), int(cfg["batch_size"]), int(cfg["num_steps"])
    if images.shape[0] != B:
        raise ValueError(f"input/images has {images.shape[0]} rows, config batch_size is {B}")
    steps = list(range(1, K + 1)) if steps is None else sorted(steps)
    if not teacher and steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"a chained run starts at step 1 and runs every step; got {steps}")
    init = {p: _tree(arrays, f"init/{p}/") for p in ("params", "state")}
    schedule = (constant_schedule(cfg["learning_rate"]) if cfg.get("lr_schedule") == "constant"
                else cosine_schedule(cfg["learning_rate"], cfg["num_epochs"], cfg["steps_per_epoch"]))
    per_replica = set(manifest.get("per_replica_keys", []))
    has_prefix = any(k.startswith(("sync_true/", "sync_false/")) for k in arrays)
    out = {}

    def start(prefix, step, rank):
        """(params, state, momentum) a step-wise step starts from (numpy)."""
        if step == 1:
            return init["params"], init["state"], None
        s = f"{prefix}step{step - 1}/"
        state = _tree(arrays, s + "state/")
        if R > 1 and f"{s}state/{next(iter(state))}" in per_replica:
            state = {k: v[rank] for k, v in state.items()}
        return _tree(arrays, s + "params/"), state, _tree(arrays, s + "momentum/")

    def talk(comm, sync, step, rank):
        if alone is not None:
            return _Replay(rank, R, [posted[(sync, step, r)] for r in range(R)])
        if posted is not None:
            posted[(sync, step, rank)] = []
            return _Recorded(comm, posted[(sync, step, rank)])
        return comm

    def replica(rank, comm, sync, prefix):
        b = B // R
        x = to_device(images[rank * b:(rank + 1) * b], device, dtype)
        y = to_device(labels[rank * b:(rank + 1) * b], device)
        model = WideResnet(cfg["blocks_per_group"], cfg["channel_multiplier"], cfg["num_outputs"],
                           in_channels=images.shape[-1])
        model.set_params(init["params"])  # shapes checked against the config's architecture
        if ties is not None:
            ties.install(model, (sync, rank))
        sam = SAMConfig(rho=cfg["sam_rho"], weight_decay=cfg["weight_decay"],
                        label_smoothing=cfg["label_smoothing"],
                        gradient_clipping=cfg["gradient_clipping"], sync_perturbations=sync)
        res, params = {}, None
        for step in steps:
            if params is None or teacher:
                p0, s0, m0 = start(prefix, step, rank)
                params, state = _on(p0, device, dtype), _on(s0, device, dtype)
                momentum = nesterov_init(params) if m0 is None else _on(m0, device, dtype)
            if step == 1:
                if ties is not None:
                    ties.set_step((sync, rank), None)
                res["init/logits_eval"] = eval_step(model, params, state, x, y)[0]
                res["init/weight_l2"] = sum((w * w).sum() for w in params.values())
            lr = schedule(step - 1)
            trace = {} if step == 1 else None
            if ties is not None:
                ties.set_step((sync, rank), step)
            params, state, momentum, metrics = train_step(
                model, params, state, momentum, x, y, lr, sam, talk(comm, sync, step, rank), trace)
            if trace is not None:
                res.update(_trace_keys(trace, sam.rho > 0))
            s = f"step{step}/"
            res[s + "lr"] = np.float32(lr)
            res[s + "optimizer_step"] = np.int32(step)
            res.update({s + "metrics/" + k: v for k, v in metrics.items()})
            for part, tree in (("params", params), ("momentum", momentum), ("state", state)):
                res.update({f"{s}{part}/{k}": v for k, v in tree.items()})
        return {k: to_numpy(v) for k, v in res.items()}

    for sync in sync_modes(cfg) if modes is None else modes:
        prefix = f"sync_{str(sync).lower()}/" if has_prefix else ""
        if alone is not None:
            results = [replica(alone, None, sync, prefix)]
        else:
            results = run_replicas(R, lambda rank, comm: replica(rank, comm, sync, prefix))
        for k in results[0]:
            key = k if k.startswith("init/") else prefix + k
            if key in out:  # init/* is the same for every sync mode
                continue
            stack = (all_replicas or key in per_replica) and alone is None
            out[key] = np.stack([r[k] for r in results]) if stack else results[0][k]
    return out


def _run_torch_case(arrays, cfg, device, ties, teacher, steps, dtype) -> dict:
    """``run_case`` for the PyTorch schema: the same batch every step, lr and rho per step."""
    from dataclasses import replace
    K = int(cfg["num_steps"])
    steps = list(range(1, K + 1)) if steps is None else sorted(steps)
    if not teacher and steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"a chained run starts at step 1 and runs every step; got {steps}")
    x = to_device(arrays["input/images"], device, dtype)
    y = to_device(arrays["input/labels"].astype(np.int32), device)
    model = WideResnet(cfg["blocks_per_group"], cfg["channel_multiplier"], cfg["num_outputs"],
                       in_channels=x.shape[-1])
    tag = (False, 0)
    if ties is not None:
        ties.install(model, tag)
    base, res, params = torch_sam_config(cfg), {}, None
    for step in steps:
        if params is None or teacher:
            s = "init/" if step == 1 else f"step{step - 1}/"
            params = _on(_tree(arrays, s + "params/"), device, dtype)
            state = _on(_tree(arrays, s + "state/"), device, dtype)
            momentum = (nesterov_init(params) if step == 1 else
                        _on(_tree(arrays, s + "momentum/"), device, dtype))
        if ties is not None:
            ties.set_step(tag, step)
        lr, rho = cfg["lr_per_step"][step - 1], cfg["rho_per_step"][step - 1]
        trace, before = {}, params
        params, state, momentum, _ = train_step(model, params, state, momentum, x, y, lr,
                                                replace(base, rho=rho), trace=trace)
        if step == 1:
            res["init/logits_train"] = trace["logits"]
            for name, tree in (("grad", trace["grad"]), ("sam_grad", trace["sam_grad"]),
                               ("step1/state_after_pass1", trace["state"]),
                               ("perturbation",   # stored as fl(w + e) - w, so computed so
                                {k: (w + trace["perturbation"][k]) - w for k, w in before.items()})):
                res.update({f"{name}/{k}": v for k, v in tree.items()})
        s = f"step{step}/"
        res.update({s + "loss": trace["cross_entropy"],
                    s + "perturbed_loss": trace["perturbed_cross_entropy"],
                    s + "grad_norm": trace["grad_for_perturbation_norm"],
                    s + "lr": np.float64(lr), s + "rho": np.float64(rho)})
        for part, tree in (("params", params), ("momentum", momentum), ("state", state)):
            res.update({f"{s}{part}/{k}": v for k, v in tree.items()})
    return {k: to_numpy(v) for k, v in res.items()}


class _Recorded:
    """A replica's communicator that also keeps every tree the replica posts."""

    def __init__(self, comm, log: list):
        self.comm, self.log, self.rank, self.size = comm, log, comm.rank, comm.size

    def allreduce_mean(self, tree):
        self.log.append(tree)
        return self.comm.allreduce_mean(tree)


class _Replay:
    """A lone replica's communicator: the other replicas' trees come from a recording."""

    def __init__(self, rank: int, size: int, logs: list):
        self.rank, self.size, self.logs, self.calls = rank, size, logs, 0

    def allreduce_mean(self, tree):
        trees = [tree if r == self.rank else self.logs[r][self.calls] for r in range(self.size)]
        self.calls += 1
        return mean_in_rank_order([{k: t[k] for k in tree} for t in trees])


def _tree(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _on(tree: dict, device: str, dtype) -> dict:
    """``tree`` on ``device`` in ``dtype``, as one buffer like the trainer's (tree.FlatTree)."""
    return flat_tree({k: to_device(v, device, dtype) for k, v in tree.items()})


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
    torch = is_torch_case(manifest)
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
        if torch and k.startswith("perturbation/"):
            scale = max(scale, TORCH_PERTURBATION_SCALE_FLOOR)
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
