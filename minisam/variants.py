"""SAM's variants, each a short function beside ``sam.train_step`` to read against it.

Each reuses SAM's two halves, ``sam_gradient`` (steps 1-3: the gradient at w + e) and
``descent`` (step 4: all-reduce, clip, the momentum step), and changes only what the
variant changes. The semantics switches of ``SAMConfig`` (weight decay, epsilon, BN
statistics, ASAM's scaling, restore, Nesterov) apply to every one of them.

* ``gsam_step``: GSAM (Zhuang et al., ICLR 2022): descend along g_s minus alpha times the
  part of g orthogonal to g_s, which also lowers the surrogate gap; rho follows lr
  (``gsam_rho``; ``gsam_official_schedule`` is the official example's exact wiring).
* ``looksam_step``: LookSAM (Liu et al., CVPR 2022): a full SAM step every k steps; in
  between one pass, plus the orthogonal part of g_s kept from the last full step.
* ``microbatch_step``: m-SAM inside a replica (Foret et al. sec. 4.1): the replica's batch
  cut into micro-batches of m examples, each with its own perturbation, their SAM
  gradients averaged; or, with synced perturbations, one perturbation from the whole
  batch's gradient (SAM-correct gradient accumulation).
"""
from __future__ import annotations

import math
from dataclasses import replace

from .distributed import group_mean
from .distributed.local import LocalComm
from .nn.loss import one_hot
from .sam import (SAMConfig, descent, loss_and_grad, perturbation, sam_gradient, step_metrics,
                  train_step)
from .tree import global_norm, inner, mean_in_rank_order

VARIANTS = ("sam", "gsam", "looksam")     # what ``minisam train --sam-variant`` runs


def gsam_rho(lr: float, lr_max: float, rho_max: float, rho_min: float, lr_min: float = 0.0):
    """GSAM's rho_t, proportional to the learning rate (gsam/scheduler.py
    ``ProportionScheduler``): (rho - rho_min) / (rho_max - rho_min) = (lr - lr_min) /
    (lr_max - lr_min); rho_max when the lr range is empty."""
    if lr_max > lr_min:
        return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    return rho_max


def gsam_step(model, params, state, momentum, images, labels, lr, cfg: SAMConfig, alpha: float,
              comm=LocalComm(), trace=None):
    """GSAM (Algorithm 1 of Zhuang et al.; juntang-zhuang/GSAM ``GSAM.gradient_decompose``).

    With g at w and g_s at w + e: cos = <g, g_s> / (||g|| ||g_s|| + eps), the part of g
    orthogonal to g_s is g_v = g - cos ||g|| g_s / (||g_s|| + eps), and the step descends
    along g_s - alpha g_v. rho is ``cfg.rho`` (the caller sets rho_t, ``gsam_rho``); eps is
    ``cfg.norm_eps`` (official: 1e-12). alpha = 0 is SAM."""
    t = {} if trace is None else trace
    g_s, state, params, ce, logits = sam_gradient(model, params, state, images, labels, cfg,
                                                  comm, t)
    g = t["grad"]
    n, n_s = global_norm(g), global_norm(g_s)
    cosine = inner(g, g_s) / (n * n_s + cfg.norm_eps)
    g_v = {k: g[k] - cosine * n * v / (n_s + cfg.norm_eps) for k, v in g_s.items()}
    grad = {k: v - alpha * g_v[k] for k, v in g_s.items()}
    params, momentum, grad = descent(params, momentum, grad, lr, cfg, comm, trace)
    return params, state, momentum, step_metrics(ce, logits, labels, grad, params)


def looksam_step(model, params, state, momentum, images, labels, lr, cfg: SAMConfig,
                 step: int, k: int, alpha: float, g_v=None, comm=LocalComm(), trace=None):
    """LookSAM (Algorithm 1 of Liu et al.): on steps with ``step % k == 0`` a full SAM step,
    keeping g_v = g_s - <g_s, g> g / ||g||^2, the part of g_s orthogonal to g; on the others
    one pass at w and g + alpha (||g|| / ||g_v||) g_v. k = 1 is SAM.

    Returns (params, state, momentum, metrics, g_v), g_v to pass to the next step."""
    if step % k == 0 or g_v is None:
        t = {} if trace is None else trace
        g_s, state, params, ce, logits = sam_gradient(model, params, state, images, labels,
                                                      cfg, comm, t)
        g = t["grad"]
        proj = inner(g_s, g) / inner(g, g)          # once, not once per key
        g_v = {key: v - proj * g[key] for key, v in g_s.items()}
        grad = g_s
    else:
        model.set_state(state)
        _, ce, logits, g = loss_and_grad(model, params, images,
                                         one_hot(labels, model.config["num_outputs"]), cfg)
        state = model.get_state()
        scale = alpha * global_norm(g) / global_norm(g_v)
        grad = {key: v + scale * g_v[key] for key, v in g.items()}
    params, momentum, grad = descent(params, momentum, grad, lr, cfg, comm, trace)
    return params, state, momentum, step_metrics(ce, logits, labels, grad, params), g_v


def microbatch_step(model, params, state, momentum, images, labels, lr, cfg: SAMConfig,
                    m: int, comm=LocalComm(), trace=None):
    """m-SAM within one replica: micro-batches of m examples, as if each were a replica.

    Each micro-batch perturbs with its own gradient (m-sharpness, as the paper's replicas
    do), or, with ``cfg.sync_perturbations``, all of them with one perturbation from the
    mean gradient of every micro-batch of every replica: gradient accumulation done right
    for SAM. The SAM gradients are averaged in micro-batch order, and the BN running
    statistics are the mean of each micro-batch's update from the step's starting state
    (what averaging replicas' states gives). BN normalises with each micro-batch's own
    statistics, so m also sets BN's batch size."""
    n = images.shape[0]
    if not isinstance(m, int) or m < 1 or n % m:
        raise ValueError(f"micro-batch size must divide the replica's batch of {n}, got {m!r}")
    if cfg.restore != "copy" and cfg.rho > 0:
        raise ValueError("micro-batches restore w by copy only (restore='copy')")
    chunks = [slice(i, i + m) for i in range(0, n, m)]
    grads, states, ces, logits = [], [], [], []
    if not cfg.sync_perturbations or cfg.rho == 0:
        for c in chunks:
            g, s, _, ce, lg = sam_gradient(model, params, state, images[c], labels[c], cfg)
            grads.append(g), states.append(s), ces.append(ce), logits.append(lg)
    else:
        onehot = one_hot(labels, model.config["num_outputs"])
        firsts = []
        for c in chunks:                                  # 1. g at w on every micro-batch
            model.set_state(state)
            g = loss_and_grad(model, params, images[c], onehot[c], cfg)[3]
            firsts.append((g, model.get_state()))
        g = group_mean(comm, mean_in_rank_order([f[0] for f in firsts]), cfg.inner_group_size)
        e, _ = perturbation(g, params, cfg)               # 2. one e for the whole batch
        perturbed = {k: w + e[k] for k, w in params.items()}
        for c, (_, s) in zip(chunks, firsts):             # 3. g at w + e, micro-batch by micro
            model.set_state(s)
            _, ce, lg, g_s = loss_and_grad(model, perturbed, images[c], onehot[c], cfg)
            grads.append(g_s), ces.append(ce), logits.append(lg)
            states.append(model.get_state() if cfg.perturbed_bn_stats == "update" else s)
    state = mean_in_rank_order(states)
    grad = mean_in_rank_order(grads)
    params, momentum, grad = descent(params, momentum, grad, lr, cfg, comm, trace)
    return params, state, momentum, step_metrics(sum(ces) / len(ces), _concat(logits), labels,
                                                 grad, params)


class LookSAM:
    """``looksam_step`` with ``train_step``'s signature, for the Trainer: it counts its calls
    (the global step) and keeps its replica's g_v. ``carry()`` / ``load(step, carry)`` move
    both through a checkpoint, so a resumed run repeats an uninterrupted one exactly."""

    def __init__(self, k: int, alpha: float):
        self.k, self.alpha, self.calls, self.g_v = k, alpha, 0, None

    def __call__(self, model, params, state, momentum, images, labels, lr, cfg,
                 comm=LocalComm(), trace=None):
        *out, self.g_v = looksam_step(model, params, state, momentum, images, labels, lr, cfg,
                                      self.calls, self.k, self.alpha, self.g_v, comm, trace)
        self.calls += 1
        return tuple(out)

    def carry(self) -> dict:
        return {} if self.g_v is None else dict(self.g_v)

    def load(self, step: int, carry: dict):
        self.calls, self.g_v = step, (dict(carry) or None)


class GSAM:
    """``gsam_step`` with ``train_step``'s signature, for the Trainer: rho follows lr
    (``gsam_rho``), or, given ``rho_at(step)``, a schedule by step (the official example's,
    whose first step does not follow its lr); it counts its calls for that."""

    def __init__(self, alpha: float, rho_min: float | None, lr_max: float, rho_at=None):
        self.alpha, self.rho_min, self.lr_max, self.rho_at, self.calls = (
            alpha, rho_min, lr_max, rho_at, 0)

    def __call__(self, model, params, state, momentum, images, labels, lr, cfg,
                 comm=LocalComm(), trace=None):
        rho = (self.rho_at(self.calls) if self.rho_at is not None else
               gsam_rho(lr, self.lr_max, cfg.rho, cfg.rho if self.rho_min is None
                        else self.rho_min))
        self.calls += 1
        return gsam_step(model, params, state, momentum, images, labels, lr,
                         replace(cfg, rho=rho), self.alpha, comm, trace)

    def carry(self) -> dict:
        return {}

    def load(self, step: int, carry: dict):
        self.calls = step


def step_function(variant: str = "sam", micro_batch: int = 0, gsam_alpha: float = 0.0,
                  rho_min: float | None = None, lr_max: float = 1.0, looksam_k: int = 5,
                  looksam_alpha: float = 0.7, rho_at=None):
    """A function with ``train_step``'s signature that runs ``variant`` (the Trainer's one
    way to call any of them): SAM, micro-batch m-SAM if ``micro_batch``, a ``GSAM`` (rho
    following lr from ``cfg.rho`` at ``lr_max`` down to ``rho_min``, default constant, or
    ``rho_at(step)``), or a ``LookSAM`` (one per replica: it holds that replica's g_v)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; expected one of {VARIANTS}")
    if micro_batch and variant != "sam":
        raise ValueError("micro-batches (m-SAM) go with the plain SAM step only")
    if variant == "looksam":
        return LookSAM(looksam_k, looksam_alpha)
    if variant == "sam":
        if not micro_batch:
            return train_step

        def micro(model, params, state, momentum, images, labels, lr, cfg, comm=LocalComm(),
                  trace=None):
            return microbatch_step(model, params, state, momentum, images, labels, lr, cfg,
                                   micro_batch, comm, trace)
        return micro

    return GSAM(gsam_alpha, rho_min, lr_max, rho_at)


def _concat(arrays):
    from .backend import get_xp
    return get_xp(arrays[0]).concatenate(arrays, axis=0)


def gsam_official_schedule(base_lr: float, total_steps: int, rho_max: float, rho_min: float):
    """(lr, rho) that step k (1, 2, ...) of juntang-zhuang/GSAM's ``example/train.py`` uses:
    ``CosineScheduler(T_max=total_steps, max_value=base_lr, min_value=0)`` stepped after
    each optimizer step, ``ProportionScheduler`` on it, ``GSAM.update_rho_t`` after each.

    Before its first ``step()`` the CosineScheduler reports its init_value, 0.0, and has
    not touched the optimizer, so step 1 runs at the optimizer's own lr (base_lr) with the
    rho that a reported lr of 0 gives: rho_min. Its first ``step()`` (t = 0) gives base_lr;
    later calls the cosine at t - 0 = 1, 2, ...: step k >= 2 runs at
    base_lr (cos(pi (k - 2) / T) + 1) / 2, one step behind ``optim.cosine_schedule``."""
    def at(k: int):
        if k < 1:
            raise ValueError(f"steps count from 1, got {k}")
        if k == 1:
            return base_lr, gsam_rho(0.0, base_lr, rho_max, rho_min)
        t = k - 2
        lr = base_lr if t == 0 else base_lr * (math.cos(t / total_steps * math.pi) + 1.0) / 2.0
        return lr, gsam_rho(lr, base_lr, rho_max, rho_min)
    return at
