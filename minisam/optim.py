"""The base optimizer and its helpers, as small functions over flat parameter dicts.

Mirrors what sam_jax's ``flax_training`` uses: ``flax.optim.Momentum(beta=0.9,
nesterov=True)``, ``get_cosine_schedule`` and ``clip_by_global_norm``.
"""
from __future__ import annotations

import math

from .backend import get_xp
from .tree import global_norm, tree_map

__all__ = ["clip_by_global_norm", "constant_schedule", "cosine_schedule", "global_norm",
           "momentum_update", "nesterov_init", "nesterov_update"]


def clip_by_global_norm(grads: dict, max_norm: float):
    """sam_jax ``clip_by_global_norm``: unchanged if ||g|| < max_norm, else g / ||g|| * max_norm.

    Returns (clipped grads, norm before clipping). ``max_norm = 0`` disables clipping."""
    norm = global_norm(grads)
    if not max_norm:
        return grads, norm
    xp = get_xp(norm)
    keep = norm < max_norm  # stays on the device: no host sync, like jnp.where in the JAX code
    return tree_map(lambda g: xp.where(keep, g, g / norm * max_norm), grads), norm


def nesterov_init(params: dict) -> dict:
    """Momentum buffers, zero, one per parameter (one buffer if ``params`` is a FlatTree)."""
    return tree_map(lambda v: get_xp(v).zeros_like(v), params)


def nesterov_update(params: dict, grads: dict, momentum: dict, lr, beta=0.9):
    """flax ``Momentum(nesterov=True)``: m <- beta m + g;  w <- w - lr (g + beta m).

    Returns (new params, new momentum)."""
    new_m = tree_map(lambda m, g: beta * m + g, momentum, grads)
    new_p = tree_map(lambda w, g, m: w - lr * (g + beta * m), params, grads, new_m)
    return new_p, new_m


def momentum_update(params: dict, grads: dict, momentum: dict, lr, beta=0.9, nesterov=True):
    """``nesterov_update``, or with ``nesterov=False`` heavy-ball momentum as torch SGD does
    it (dampening 0): m <- beta m + g;  w <- w - lr m."""
    if nesterov:
        return nesterov_update(params, grads, momentum, lr, beta)
    new_m = tree_map(lambda m, g: beta * m + g, momentum, grads)
    return tree_map(lambda w, m: w - lr * m, params, new_m), new_m


def cosine_schedule(base_lr: float, num_epochs: int, steps_per_epoch: int):
    """sam_jax ``get_cosine_schedule``: lr(step) = base * (0.5 cos(pi step / T) + 0.5),
    T = num_epochs * steps_per_epoch, steps_per_epoch = floor(num_training_obs / batch)."""
    if steps_per_epoch < 1 or num_epochs < 1:
        raise ValueError(f"cosine schedule needs num_epochs >= 1 and steps_per_epoch >= 1, got "
                         f"{num_epochs} and {steps_per_epoch} (is the dataset smaller than a batch?)")
    total = num_epochs * steps_per_epoch

    def lr_fn(step: int) -> float:
        return base_lr * (0.5 * math.cos(math.pi * step / total) + 0.5)
    return lr_fn


def constant_schedule(base_lr: float):
    return lambda step: base_lr
